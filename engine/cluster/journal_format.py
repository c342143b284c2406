"""The messages of a shard's journal in a cluster, and the rule that replays them.

In a cluster a shard's journal is a JetStream subject (one per shard) instead of a file;
each message is one of:

- a **commit**: the records of one group commit, by the owner of `epoch`, its `batch`-th;
- a **takeover**: the first message a node appends when it wins the shard's lease for
  `epoch`, before it reads the journal and serves. An append by a former owner fails
  after it (JetStream refuses an append whose expected last sequence is stale), so
  everything the former owner ever had acknowledged comes before the takeover.

Every message names the sequence of the one before it on the subject (`previous`: the
expected last sequence it was appended with, so JetStream stored it only right after
that one). Replay follows the chain from where it starts (0 for the whole journal, a
snapshot's sequence after it): a message missing, or a purged start with no snapshot to
cover it, breaks the chain and is refused, never replayed around.

Each payload carries a CRC-32 of its body and is checked before it is trusted, as every
file soldout reads back is. `replay` rebuilds a book from the messages after a snapshot
and refuses a journal whose epochs run backwards. Pure: no I/O.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from engine.book import Book, Record

MAGIC = b"SJM1"
HEADER = struct.Struct("<4sI")  # magic, CRC-32 of the body
COMMIT = 1
TAKEOVER = 2


class JournalMessageCorrupt(Exception):
    """A journal message fails its checks: soldout will not guess what it held."""

    def __init__(self, sequence: int, reason: str) -> None:
        super().__init__(f"journal message {sequence} is corrupt: {reason}")
        self.sequence = sequence


@dataclass(frozen=True, slots=True)
class Commit:
    epoch: int
    batch: int
    previous: int  # the sequence of the message before it on the subject (0: the first)
    records: list[Record]


@dataclass(frozen=True, slots=True)
class Takeover:
    epoch: int
    node: str
    previous: int


@dataclass(frozen=True, slots=True)
class Replayed:
    epoch: int  # the ownership the messages end in
    sequence: int  # the last message applied (where the chain goes on)


def _framed(body: Any) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(MAGIC, zlib.crc32(packed)) + packed


def encode_commit(epoch: int, batch: int, previous: int, records: list[Record]) -> bytes:
    return _framed([COMMIT, epoch, batch, previous, records])


def encode_takeover(epoch: int, node: str, previous: int) -> bytes:
    return _framed([TAKEOVER, epoch, node, previous])


def message_id(shard: int, epoch: int, batch: int) -> str:
    """The `Nats-Msg-Id` of a commit: a retried publish of the same batch is stored once."""
    return f"{shard}:{epoch}:{batch}"


def decode(sequence: int, payload: bytes) -> Commit | Takeover:
    if len(payload) < HEADER.size:
        raise JournalMessageCorrupt(sequence, f"{len(payload)} bytes is shorter than its header")
    magic, crc = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise JournalMessageCorrupt(sequence, f"magic {magic!r} is not {MAGIC!r}")
    body = payload[HEADER.size :]
    if zlib.crc32(body) != crc:
        raise JournalMessageCorrupt(sequence, "its checksum does not match")
    try:
        fields = msgpack.unpackb(body, raw=False, use_list=False)
        kind = fields[0]
        if kind == COMMIT:
            _, epoch, batch, previous, records = fields
            if (
                type(epoch) is not int
                or type(batch) is not int
                or type(previous) is not int
                or type(records) is not tuple
            ):
                raise ValueError("a commit is (epoch, batch, previous, records)")
            return Commit(epoch, batch, previous, list(records))
        if kind == TAKEOVER:
            _, epoch, node, previous = fields
            if type(epoch) is not int or type(node) is not str or type(previous) is not int:
                raise ValueError("a takeover is (epoch, node, previous)")
            return Takeover(epoch, node, previous)
        raise ValueError(f"unknown kind {kind!r}")
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as error:
        raise JournalMessageCorrupt(sequence, str(error)) from None


def replay(book: Book, messages: Iterable[tuple[int, bytes]], epoch: int = 0, previous: int = 0) -> Replayed:
    """Apply the commits of `messages` ((sequence, payload), in order) to `book`.

    `epoch` and `previous` are where the messages start: a snapshot's epoch and
    sequence, or 0 and 0 for the whole journal. Returns where they end. Each message
    must follow the one before it (its `previous`), and every commit must be the current
    owner's: one of an epoch before the last takeover (the fencing failed), or of an
    epoch whose takeover was never written, is refused as corrupt rather than replayed;
    so is a takeover whose epoch does not rise, and a gap in the chain.
    """
    for sequence, payload in messages:
        message = decode(sequence, payload)
        if message.previous != previous:
            raise JournalMessageCorrupt(
                sequence,
                f"it follows message {message.previous}, not {previous}: the journal has a gap "
                "(a message lost, or purged with no snapshot covering it)",
            )
        previous = sequence
        if type(message) is Takeover:
            if message.epoch <= epoch:
                raise JournalMessageCorrupt(sequence, f"takeover of epoch {message.epoch} after epoch {epoch}")
            epoch = message.epoch
        elif message.epoch != epoch:
            raise JournalMessageCorrupt(
                sequence, f"a commit of epoch {message.epoch} while epoch {epoch} owns the shard"
            )
        else:
            book.replay(message.records)  # type: ignore[union-attr]
    return Replayed(epoch, previous)
