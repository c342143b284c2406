"""The cluster journal's messages: checked before they are trusted, and replayed only in
the order fencing guarantees (a takeover first, then the new owner's commits alone)."""

from __future__ import annotations

import pytest

from engine.book import Book
from engine.cluster.journal_format import (
    JournalMessageCorrupt,
    Replayed,
    decode,
    encode_commit,
    encode_takeover,
    message_id,
    replay,
)
from protocol.messages import PutSku, Reserve

NOW = 1_700_000_000.0


def records_of(book: Book, *commands: object) -> list[tuple]:
    records: list[tuple] = []
    book.execute(list(commands), NOW, records)  # type: ignore[arg-type]
    return records


def test_a_journal_of_takeovers_and_commits_replays_to_the_same_book() -> None:
    live = Book(shard=2)
    first = records_of(live, PutSku("A", 5, 2))
    second = records_of(live, Reserve("A", "u", 2, "k"))
    third = records_of(live, Reserve("A", "v", 1))
    messages = [
        (1, encode_takeover(1, "node-a", 0)),
        (2, encode_commit(1, 1, 1, first)),
        (3, encode_commit(1, 2, 2, second)),
        (4, encode_takeover(2, "node-b", 3)),  # node-a died; node-b took the shard over
        (5, encode_commit(2, 1, 4, third)),
    ]
    rebuilt = Book(shard=2)
    assert replay(rebuilt, messages) == Replayed(epoch=2, sequence=5)
    rebuilt.check_invariants()
    assert rebuilt.to_snapshot() == live.to_snapshot()
    # From a snapshot taken at sequence 3 (in epoch 1), the rest gives the same book.
    snapshot_book = Book(shard=2)
    replay(snapshot_book, messages[:3])
    resumed = Book.from_snapshot(snapshot_book.to_snapshot())
    assert replay(resumed, messages[3:], epoch=1, previous=3) == Replayed(epoch=2, sequence=5)
    assert resumed.to_snapshot() == live.to_snapshot()


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([(1, encode_takeover(2, "b", 0)), (2, encode_commit(1, 9, 1, []))], "a commit of epoch 1 while epoch 2"),
        ([(1, encode_commit(1, 1, 0, []))], "a commit of epoch 1 while epoch 0"),
        ([(1, encode_takeover(2, "b", 0)), (2, encode_takeover(2, "c", 1))], "takeover of epoch 2 after epoch 2"),
        # A message lost between 2 and 4: the chain breaks there.
        ([(1, encode_takeover(1, "a", 0)), (2, encode_commit(1, 1, 1, [])), (4, encode_commit(1, 3, 3, []))], "gap"),
        # The start purged with no snapshot to cover it: the first message follows one never read.
        ([(9, encode_commit(1, 5, 8, []))], "follows message 8, not 0"),
    ],
)
def test_a_journal_out_of_fencing_order_or_with_a_gap_is_refused(
    messages: list[tuple[int, bytes]], reason: str
) -> None:
    with pytest.raises(JournalMessageCorrupt, match=reason):
        replay(Book(), messages)


def test_every_damaged_message_is_refused_naming_its_sequence() -> None:
    payload = encode_commit(1, 1, 0, [(1, "A", 5, 1, 900, None, None, False)])
    for position in range(len(payload)):
        damaged = bytearray(payload)
        damaged[position] ^= 0x10
        with pytest.raises(JournalMessageCorrupt, match="message 7 is corrupt"):
            decode(7, bytes(damaged))
    for length in range(len(payload)):
        with pytest.raises(JournalMessageCorrupt):
            decode(7, payload[:length])


def test_a_commit_is_identified_by_shard_epoch_and_batch() -> None:
    assert message_id(3, 2, 17) == "3:2:17"
    assert decode(1, encode_takeover(4, "node-a", 0)).node == "node-a"  # type: ignore[union-attr]
