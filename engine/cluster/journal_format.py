"""The messages of a shard's journal in a cluster, and the rule that replays them.

In a cluster a shard's journal is a JetStream subject (one per shard) instead of a file;
each message is one of:

- a **commit**: the records of one group commit, by the owner of `epoch`, its `batch`-th;
- a **takeover**: the first message a node appends when it wins the shard's lease for
  `epoch`, before it reads the journal and serves. An append by a former owner fails
  after it (JetStream refuses an append whose expected last sequence is stale), so
  everything the former owner ever had acknowledged comes before the takeover.

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
    records: list[Record]


@dataclass(frozen=True, slots=True)
class Takeover:
    epoch: int
    node: str


def _framed(body: Any) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(MAGIC, zlib.crc32(packed)) + packed


def encode_commit(epoch: int, batch: int, records: list[Record]) -> bytes:
    return _framed([COMMIT, epoch, batch, records])


def encode_takeover(epoch: int, node: str) -> bytes:
    return _framed([TAKEOVER, epoch, node])


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
            _, epoch, batch, records = fields
            if type(epoch) is not int or type(batch) is not int or type(records) is not tuple:
                raise ValueError("a commit is (epoch, batch, records)")
            return Commit(epoch, batch, list(records))
        if kind == TAKEOVER:
            _, epoch, node = fields
            if type(epoch) is not int or type(node) is not str:
                raise ValueError("a takeover is (epoch, node)")
            return Takeover(epoch, node)
        raise ValueError(f"unknown kind {kind!r}")
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as error:
        raise JournalMessageCorrupt(sequence, str(error)) from None


def replay(book: Book, messages: Iterable[tuple[int, bytes]], epoch: int = 0) -> int:
    """Apply the commits of `messages` ((sequence, payload), in order) to `book`.

    `epoch` is the ownership the messages start in (a snapshot's, or 0 for the whole
    journal). Returns the epoch they end in. Every commit must be the current owner's:
    one of an epoch before the last takeover (the fencing failed), or of an epoch whose
    takeover was never written, is refused as corrupt rather than replayed; so is a
    takeover whose epoch does not rise.
    """
    for sequence, payload in messages:
        message = decode(sequence, payload)
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
    return epoch
