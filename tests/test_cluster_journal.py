"""A shard's journal in JetStream, against a real three-server cluster: a new owner
fences the old one and recovers every acknowledged commit; a snapshot plus the journal
after it gives the same book as the whole journal; a retried commit is stored once."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats_cluster import NatsCluster

from engine.book import Book
from engine.cluster.journal import (
    JOURNAL_STREAM,
    SNAPSHOT_BUCKET,
    Fenced,
    ShardJournal,
    decode_snapshot,
    encode_snapshot,
    ensure_storage,
    journal_subject,
    snapshot_name,
)
from engine.cluster.journal_format import JournalMessageCorrupt
from engine.cluster.nats import Nats, open_nats
from protocol.limits import Limits
from protocol.messages import Cancel, PutSku, Reserve

REPLICAS = 3
LIMITS = Limits()
NOW = 1_700_000_000.0
# Each test journals its own shard number, so they share the stream without meeting.
_shards = itertools.count(100)


@pytest.fixture
async def nats(nats_cluster: NatsCluster) -> AsyncIterator[Nats]:
    async with open_nats(nats_cluster.urls, name="soldout-journal-test", connect_seconds=10.0) as client:
        await ensure_storage(client, REPLICAS)
        yield client


def journal(nats: Nats, shard: int, epoch: int, node: str) -> ShardJournal:
    return ShardJournal(nats, shard, epoch, node, LIMITS, replicas=REPLICAS)


def decide(book: Book, *commands: Any) -> tuple[list[Any], list[tuple]]:
    records: list[tuple] = []
    replies = book.execute(list(commands), NOW, records)
    return replies, records


async def test_a_new_owner_recovers_every_commit_and_the_old_one_is_fenced(nats: Nats) -> None:
    shard = next(_shards)
    old = journal(nats, shard, 1, "node-a")
    live = (await old.take_over()).book
    acknowledged = []
    for command in (PutSku("A", 3, 3), Reserve("A", "u", 1, "k1"), Reserve("A", "v", 2, "k2")):
        replies, records = decide(live, command)
        await old.commit(records)
        acknowledged.append(replies[0])
    assert [reply.status for reply in acknowledged] == ["ok", "ok", "ok"]
    # node-b wins the lease for epoch 2: it fences node-a, then reads everything node-a acknowledged.
    new = journal(nats, shard, 2, "node-b")
    recovered = await new.take_over()
    assert recovered.book.to_snapshot() == live.to_snapshot()
    # node-a, paused through all that, decides one more batch: its append is refused.
    _, records = decide(live, Cancel(acknowledged[1].reservation, "u"))
    with pytest.raises(Fenced):
        await old.commit(records)
    # The new owner goes on; the refused batch is nowhere in the journal.
    replies, records = decide(recovered.book, Reserve("A", "w", 1))
    assert replies[0].status == "sold_out"  # node-a's cancel never happened
    again = await journal(nats, shard, 3, "node-c").take_over()
    assert again.book.to_snapshot() == recovered.book.to_snapshot()
    assert again.book.skus["A"].held == 3


async def test_a_retried_commit_is_stored_once(nats: Nats) -> None:
    shard = next(_shards)
    owner = journal(nats, shard, 1, "node-a")
    book = (await owner.take_over()).book
    _, records = decide(book, PutSku("A", 5, 5), Reserve("A", "u", 1))
    first = await owner.commit(records)
    # The ack was lost, say: the same commit again is a duplicate, at the same sequence.
    assert await owner.retry_commit(records) == first
    assert await nats.last_sequence(JOURNAL_STREAM, journal_subject(shard)) == first
    recovered = await journal(nats, shard, 2, "node-b").take_over()
    assert recovered.book.skus["A"].held == 1


async def test_a_snapshot_and_the_journal_after_it_give_the_same_book_as_the_whole_journal(nats: Nats) -> None:
    shard = next(_shards)
    owner = journal(nats, shard, 1, "node-a")
    book = (await owner.take_over()).book
    _, records = decide(book, PutSku("A", 50, 5))
    await owner.commit(records)
    for index in range(12):
        _, records = decide(book, Reserve("A", f"buyer-{index}", 1, f"key-{index}"))
        await owner.commit(records)
        if index == 5:
            covered = owner.last_sequence
            await owner.snapshot(covered, book.to_snapshot())
    from_start = await journal(nats, shard, 2, "node-b").take_over()
    from_snapshot = await journal(nats, shard, 3, "node-c").take_over(covered)
    assert from_snapshot.book.to_snapshot() == from_start.book.to_snapshot()
    assert from_snapshot.book.to_snapshot() == book.to_snapshot()
    # Once the snapshot is recorded, the messages it covers may go: recovery still agrees.
    await journal(nats, shard, 3, "node-c").purge_before(covered)
    after_purge = await journal(nats, shard, 4, "node-d").take_over(covered)
    assert after_purge.book.to_snapshot() == book.to_snapshot()
    # Without the snapshot the purged start is a gap in the chain: refused, never replayed around.
    with pytest.raises(JournalMessageCorrupt, match="gap"):
        await journal(nats, shard, 5, "node-e").take_over()


async def test_a_damaged_or_missing_snapshot_is_refused_not_trusted(nats: Nats) -> None:
    shard = next(_shards)
    book = Book(shard, LIMITS)
    decide(book, PutSku("A", 5, 5))
    data = encode_snapshot(7, 1, book.to_snapshot())
    assert decode_snapshot(shard, data, LIMITS)[:2] == (7, 1)
    for position in (0, 5, 13, len(data) - 1):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(JournalMessageCorrupt):
            decode_snapshot(shard, bytes(damaged), LIMITS)
    with pytest.raises(JournalMessageCorrupt, match="names another shard"):
        decode_snapshot(shard + 1, data, LIMITS)
    await nats.put_object(SNAPSHOT_BUCKET, snapshot_name(shard, 7), data[:-3], replicas=REPLICAS)
    with pytest.raises(JournalMessageCorrupt):
        await journal(nats, shard, 1, "node-a").take_over(7)
    with pytest.raises(JournalMessageCorrupt, match="missing"):
        await journal(nats, shard, 1, "node-a").take_over(8)
