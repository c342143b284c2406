"""Batches and their groups: a caller waiting for several shards wakes once, after the last answer."""

from __future__ import annotations

import trio
import trio.testing

from engine import EngineConfig, open_engine
from engine.router import shard_for_sku
from engine.shard import Batch, BatchGroup
from protocol.messages import OK, PutSku, Reply, Reserve

ANSWER = [Reply(OK)]


async def test_a_group_waits_for_its_last_batch_and_each_batch_keeps_its_replies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    group = BatchGroup()
    batches = [Batch([Reserve(f"S{index}", "b")], group) for index in range(3)]
    woken: list[float] = []

    async def waiter() -> None:
        await group.wait()
        woken.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        for delay, batch in zip([1, 2, 3], batches, strict=True):
            await trio.sleep(delay - trio.current_time())
            assert not woken
            batch.resolve([Reply(OK, reservation=f"0-{delay}")])
    assert woken == [3]
    assert [batch.replies[0].reservation for batch in batches] == ["0-1", "0-2", "0-3"]


async def test_a_group_whose_batches_are_answered_already_does_not_park(autojump_clock: trio.testing.MockClock) -> None:
    group = BatchGroup()
    Batch([Reserve("S", "b")], group).resolve(ANSWER)
    with trio.fail_after(1):
        await group.wait()


async def test_a_cancelled_group_waiter_stops_waiting_and_a_late_answer_goes_nowhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    group = BatchGroup()
    batch = Batch([Reserve("S", "b")], group)
    with trio.move_on_after(1) as scope:
        await group.wait()
    assert scope.cancelled_caught
    batch.resolve(ANSWER)  # nobody waits: nothing to wake, nothing raised
    assert group.pending == 0


async def test_a_frame_for_many_shards_gets_every_reply_in_request_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    skus = [f"SKU-{number}" for number in range(12)]
    async with open_engine(EngineConfig(shards=4)) as engine:
        await engine.execute([PutSku(sku, 1, 1, 60) for sku in skus])
        assert len({shard_for_sku(sku, 4) for sku in skus}) == 4
        replies = await engine.execute([Reserve(sku, "b") for sku in skus] + [Reserve(sku, "c") for sku in skus])
    assert [reply.status for reply in replies] == ["ok"] * 12 + ["sold_out"] * 12
    assert [int(reply.reservation.split("-")[0]) for reply in replies[:12]] == [shard_for_sku(sku, 4) for sku in skus]  # type: ignore[union-attr]
