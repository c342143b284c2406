"""A shard's journal and snapshots in JetStream: what its owner commits to, and recovers from.

The journal of shard n is the subject `soldout.journal.<n>` of one replicated stream; its
snapshot is the object `shard-<n>` of one replicated object store. The owner of the
shard's lease for `epoch`:

1. appends a takeover message, expecting the subject's last sequence to be the one it
   read: from then on an append by any former owner fails (JetStream error 10071,
   `Fenced` here), so nothing it acknowledges can come after what this owner reads;
2. rebuilds the book from the newest snapshot and the messages after it, up to the
   takeover (`recover`);
3. commits each group commit as one publish carrying `Nats-Msg-Id` shard:epoch:batch (a
   retried publish is stored once) and the expected last sequence, and releases the
   batch's replies only once JetStream acknowledged it (a quorum of replicas holds it).

A snapshot is an object named by the sequence it covers (`shard-<n>-<sequence>`), written
by the owner; which one is current is recorded by the caller under the shard's lease (a
compare-and-set that a former owner's write cannot win), and only then are the messages
before it purged. So a paused former owner that writes a snapshot late can never make a
recovery start from an older point whose messages are gone. Every snapshot is checked
(magic, length, CRC, shard) before it is trusted.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from engine.book import Book, Record
from engine.cluster.journal_format import (
    JournalMessageCorrupt,
    encode_commit,
    encode_takeover,
    message_id,
    replay,
)
from engine.cluster.nats import Nats, WrongLastSequence
from protocol.limits import CLUSTER_REPLAY_READ_MESSAGES_MAX, Limits

JOURNAL_STREAM = "soldout_journal"
SNAPSHOT_BUCKET = "soldout_snapshots"
SNAPSHOT_MAGIC = b"SJSN"
SNAPSHOT_HEADER = struct.Struct("<4sQI")  # magic, body length, CRC-32 of the body


def journal_subject(shard: int) -> str:
    return f"soldout.journal.{shard}"


def snapshot_name(shard: int, sequence: int) -> str:
    return f"shard-{shard}-{sequence}"


class Fenced(Exception):
    """Another node took the shard over: this owner's append was refused, and it must stop serving it."""


@dataclass(frozen=True, slots=True)
class Recovered:
    book: Book
    sequence: int  # the last journal sequence the book holds (the takeover's)


async def ensure_storage(nats: Nats, replicas: int) -> None:
    """The journal stream exists (one subject per shard)."""
    await nats.ensure_stream(JOURNAL_STREAM, ["soldout.journal.*"], replicas=replicas)


def encode_snapshot(sequence: int, epoch: int, state: dict[str, Any]) -> bytes:
    """A book's state (`Book.to_snapshot()`) as the snapshot covering journal `sequence`."""
    body = msgpack.packb({"sequence": sequence, "epoch": epoch, "book": state}, use_bin_type=True)
    return SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, len(body), zlib.crc32(body)) + body


def decode_snapshot(shard: int, data: bytes, limits: Limits) -> tuple[int, int, Book]:
    """(sequence, epoch, book) of a snapshot object; JournalMessageCorrupt when it fails a check."""
    where = -1  # a snapshot is not a journal message: no sequence to name
    if len(data) < SNAPSHOT_HEADER.size:
        raise JournalMessageCorrupt(where, f"snapshot of shard {shard} is {len(data)} bytes, shorter than its header")
    magic, length, crc = SNAPSHOT_HEADER.unpack_from(data)
    body = data[SNAPSHOT_HEADER.size :]
    if magic != SNAPSHOT_MAGIC or length != len(body) or zlib.crc32(body) != crc:
        raise JournalMessageCorrupt(where, f"snapshot of shard {shard} fails its checks (magic, length or CRC)")
    try:
        document: dict[str, Any] = msgpack.unpackb(body, raw=False)
        book = Book.from_snapshot(document["book"], limits)
        sequence, epoch = document["sequence"], document["epoch"]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as error:
        raise JournalMessageCorrupt(where, f"snapshot of shard {shard} does not hold a book: {error}") from None
    if book.shard != shard or type(sequence) is not int or type(epoch) is not int:
        raise JournalMessageCorrupt(where, f"snapshot of shard {shard} names another shard or no position")
    return sequence, epoch, book


class ShardJournal:
    """One owner's hold on one shard's journal, for one epoch of its lease."""

    def __init__(self, nats: Nats, shard: int, epoch: int, node: str, limits: Limits, *, replicas: int) -> None:
        self.nats = nats
        self.shard = shard
        self.epoch = epoch
        self.node = node
        self.limits = limits
        self.replicas = replicas
        self.subject = journal_subject(shard)
        self.last_sequence = 0  # of the subject, as this owner last appended or read it
        self._batches = 0

    async def take_over(self, snapshot_sequence: int | None = None) -> Recovered:
        """Fence former owners, then rebuild the book up to the takeover, from the snapshot
        covering `snapshot_sequence` (the current one, as the lease records it) or from
        the start. Raises Fenced if another node appended in between."""
        expected = await self.nats.last_sequence(JOURNAL_STREAM, self.subject)
        try:
            sequence = await self.nats.publish(
                self.subject,
                encode_takeover(self.epoch, self.node, expected),
                msg_id=message_id(self.shard, self.epoch, 0),
                expected_last_subject_sequence=expected,
            )
        except WrongLastSequence as error:
            raise Fenced(f"shard {self.shard}: another node appended while epoch {self.epoch} took over") from error
        self.last_sequence = sequence
        book, epoch = await self._rebuild(snapshot_sequence, up_to=sequence)
        if epoch != self.epoch:
            raise JournalMessageCorrupt(sequence, f"shard {self.shard}'s journal does not end in epoch {self.epoch}")
        return Recovered(book, sequence)

    async def _rebuild(self, snapshot_sequence: int | None, *, up_to: int) -> tuple[Book, int]:
        """The snapshot and the journal after it, up to sequence `up_to`: (book, epoch at the end)."""
        start, epoch, book = 1, 0, Book(self.shard, self.limits)
        position = 0
        if snapshot_sequence is not None:
            data = await self.nats.get_object(SNAPSHOT_BUCKET, snapshot_name(self.shard, snapshot_sequence))
            if data is None:
                raise JournalMessageCorrupt(snapshot_sequence, f"the snapshot of shard {self.shard} is missing")
            covered, epoch, book = decode_snapshot(self.shard, data, self.limits)
            if covered != snapshot_sequence:
                raise JournalMessageCorrupt(snapshot_sequence, f"the snapshot of shard {self.shard} covers {covered}")
            position, start = covered, covered + 1
        while start <= up_to:
            messages = await self.nats.read(
                JOURNAL_STREAM, self.subject, start, count_max=CLUSTER_REPLAY_READ_MESSAGES_MAX
            )
            messages = [(sequence, payload) for sequence, payload in messages if sequence <= up_to]
            if not messages:
                break
            replayed = replay(book, messages, epoch, position)
            epoch, position = replayed.epoch, replayed.sequence
            start = position + 1
        if position != up_to:
            raise JournalMessageCorrupt(up_to, f"shard {self.shard}'s journal ends at {position}, before it")
        book.check_invariants()
        return book, epoch

    async def commit(self, records: list[Record]) -> int:
        """Append one group commit; returns its sequence once JetStream acknowledged it.

        Raises Fenced when a newer owner appended since (nothing of this batch is stored).
        A publish that fails otherwise (no quorum, a timeout) raises NatsError with the
        outcome unknown: `retry_commit` stores it at most once.
        """
        self._batches += 1
        return await self._publish(self._batches, records)

    async def retry_commit(self, records: list[Record]) -> int:
        """The last commit again, after a failure whose outcome is unknown (same message id)."""
        return await self._publish(self._batches, records)

    async def _publish(self, batch: int, records: list[Record]) -> int:
        try:
            sequence = await self.nats.publish(
                self.subject,
                encode_commit(self.epoch, batch, self.last_sequence, records),
                msg_id=message_id(self.shard, self.epoch, batch),
                expected_last_subject_sequence=self.last_sequence,
            )
        except WrongLastSequence as error:
            raise Fenced(f"shard {self.shard}: a newer owner took over from epoch {self.epoch}") from error
        self.last_sequence = max(self.last_sequence, sequence)
        return sequence

    async def snapshot(self, covered: int, state: dict[str, Any]) -> None:
        """Store a book's state as the snapshot covering journal sequence `covered`, for
        the caller to record under the lease before `purge_before`.

        `state` is `Book.to_snapshot()` taken right after the commit at `covered` (this
        journal's `last_sequence` then), before the next batch was decided; it is encoded
        here in a worker thread."""
        data = await trio.to_thread.run_sync(encode_snapshot, covered, self.epoch, state)
        await self.nats.put_object(SNAPSHOT_BUCKET, snapshot_name(self.shard, covered), data, replicas=self.replicas)

    async def delete_snapshot(self, sequence: int) -> None:
        """Remove a snapshot no lease names any more."""
        await self.nats.delete_object(SNAPSHOT_BUCKET, snapshot_name(self.shard, sequence), replicas=self.replicas)

    async def purge_before(self, sequence: int) -> None:
        """Drop the journal messages a recorded snapshot covers (it keeps `sequence` itself)."""
        await self.nats.purge(JOURNAL_STREAM, self.subject, keep_from_sequence=sequence)
