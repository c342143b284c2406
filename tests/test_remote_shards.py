"""Shards owned by another engine: the routing the cluster builds on.

Two engines in one trio run split four shards between them; each reaches the other's
shards through a `RemoteShard` over an in-process transport that hands the payload to
the owner's `Engine.answer_remote` (the cluster puts NATS requests in its place). Every
reply must be the one a single engine gives, nothing is sold twice, and an owner that
cannot be reached, or no longer owns the shard, answers `unavailable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from engine.api import Engine, open_engine
from engine.config import EngineConfig
from engine.remote import RemoteShard, ShardUnreachable
from engine.router import shard_for_sku
from protocol.limits import CLUSTER_FORWARDS_IN_FLIGHT_MAX, Limits
from protocol.messages import Command, Confirm, PutSku, Register, Reserve, Stock

SHARDS = 4
EPOCH = 1_700_000_000.0
SKUS = [f"SKU-{number}" for number in range(8)]


class InProcessTransport:
    """Hands a payload to the engine that owns the shard; fails while `down` holds it."""

    def __init__(self) -> None:
        self.owners: dict[int, Engine] = {}
        self.down: set[int] = set()
        self.broken: set[int] = set()  # a fault of the transport's own, not an unreachable owner
        self.requests = 0

    async def request(self, shard: int, payload: bytes) -> bytes:
        self.requests += 1
        await trio.lowlevel.checkpoint()
        if shard in self.broken:
            raise RuntimeError(f"the transport for shard {shard} is broken")
        owner = self.owners.get(shard)
        if owner is None or shard in self.down:
            raise ShardUnreachable(f"no owner answers for shard {shard}")
        return await owner.answer_remote(payload)


def config(clock: trio.testing.MockClock) -> EngineConfig:
    return EngineConfig(shards=SHARDS, wall_clock=lambda: EPOCH + clock.current_time(), limits=Limits())


@asynccontextmanager
async def split_engines(clock: trio.testing.MockClock) -> AsyncIterator[tuple[Engine, Engine, InProcessTransport]]:
    """Engine `a` owns shards 0 and 1, `b` owns 2 and 3; each routes the others to the owner."""
    transport = InProcessTransport()
    limits = Limits()
    async with open_engine(config(clock)) as a, open_engine(config(clock)) as b, trio.open_nursery() as nursery:
        for shard in range(SHARDS):
            owner, other = (a, b) if shard < 2 else (b, a)
            transport.owners[shard] = owner
            other.assign(shard, RemoteShard(shard, transport, nursery, limits))
        yield a, b, transport
        nursery.cancel_scope.cancel()


def crowd() -> list[list[Command]]:
    """Batches of reserves over every SKU (some buyers twice, some with keys reused), and stocks."""
    batches: list[list[Command]] = []
    for round_ in range(6):
        batch: list[Command] = [
            Reserve(SKUS[(round_ + index) % len(SKUS)], f"buyer-{index % 7}", 1, f"key-{round_ % 3}-{index}")
            for index in range(10)
        ]
        batch.append(Stock(SKUS[round_ % len(SKUS)]))
        batches.append(batch)
    return batches


def setup() -> list[Command]:
    return [PutSku(sku, stock=3, per_buyer_limit=2, registration_required=sku == SKUS[0]) for sku in SKUS] + [
        Register(SKUS[0], ["buyer-1", "buyer-2"])
    ]


async def test_two_engines_sharing_the_shards_answer_as_one_engine_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert {shard_for_sku(sku, SHARDS) for sku in SKUS} == set(range(SHARDS))  # every shard has SKUs
    async with open_engine(config(autojump_clock)) as single:
        expected = [await single.execute(setup())]
        expected += [await single.execute(batch) for batch in crowd()]
        expected_stock = [await single.stock(sku) for sku in SKUS]
    autojump_clock.jump(-autojump_clock.current_time())  # the same wall-clock times again
    async with split_engines(autojump_clock) as (a, b, transport):
        # Through either engine, alternately: every part for the other's shards is forwarded.
        got = [await a.execute(setup())]
        for index, batch in enumerate(crowd()):
            got.append(await (a if index % 2 else b).execute(batch))
        assert got == expected
        assert [await b.stock(sku) for sku in SKUS] == expected_stock
        assert [await a.stock(sku) for sku in SKUS] == expected_stock
        assert transport.requests > 0
        # A hold made through one engine is confirmed through the other.
        reservation = next(reply.reservation for batch in got[1:] for reply in batch if reply.status == "ok")
        assert reservation is not None
        buyer = next(
            command.buyer
            for batch, replies in zip(crowd(), got[1:], strict=True)
            for command, reply in zip(batch, replies, strict=True)
            if reply.status == "ok" and reply.reservation == reservation  # type: ignore[union-attr]
        )
        assert (await a.execute([Confirm(reservation, buyer)]))[0].status == "ok"  # type: ignore[union-attr]
        assert (await b.execute([Confirm(reservation, buyer)]))[0].status == "ok"  # a retry: still ok


async def test_an_owner_that_cannot_be_reached_answers_unavailable_and_a_retry_with_the_key_returns_the_hold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with split_engines(autojump_clock) as (a, b, transport):
        remote_sku = next(sku for sku in SKUS if shard_for_sku(sku, SHARDS) >= 2)
        local_sku = next(sku for sku in SKUS if shard_for_sku(sku, SHARDS) < 2)
        assert all(reply.ok for reply in await a.execute([PutSku(remote_sku, 5), PutSku(local_sku, 5)]))
        first = await a.reserve(remote_sku, buyer="u", key="k")
        assert first.status == "ok"
        transport.down.add(shard_for_sku(remote_sku, SHARDS))
        replies = await a.execute([Reserve(remote_sku, "u", 1, "k"), Reserve(local_sku, "v", 1), Stock(remote_sku)])
        assert [reply.status for reply in replies] == ["unavailable", "ok", "unavailable"]
        assert replies[0].error is not None
        assert "retry with the same key" in replies[0].error
        transport.down.clear()
        again = await a.reserve(remote_sku, buyer="u", key="k")
        assert (again.status, again.reservation) == ("ok", first.reservation)
        assert (await b.stock(remote_sku)).held == 1


async def test_an_owner_answers_only_for_the_shards_it_owns(autojump_clock: trio.testing.MockClock) -> None:
    async with split_engines(autojump_clock) as (a, b, transport):
        remote_sku = next(sku for sku in SKUS if shard_for_sku(sku, SHARDS) >= 2)
        assert (await b.put_sku(remote_sku, stock=5)).ok
        # `a` believes `b` owns the shard while `b` has handed it back to `a`: neither
        # forwards what it was sent, so the request is answered unavailable, not looped.
        shard = shard_for_sku(remote_sku, SHARDS)
        b.assign(shard, a._handles[shard])
        transport.owners[shard] = b
        reply = await a.reserve(remote_sku, buyer="u", key="k")
        assert reply.status == "unavailable"
        assert transport.requests == 1


async def test_a_fault_in_forwarding_answers_that_batch_unavailable_and_the_engine_serves_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with split_engines(autojump_clock) as (a, _, transport):
        remote_sku = next(sku for sku in SKUS if shard_for_sku(sku, SHARDS) >= 2)
        local_sku = next(sku for sku in SKUS if shard_for_sku(sku, SHARDS) < 2)
        assert all(reply.ok for reply in await a.execute([PutSku(remote_sku, 5), PutSku(local_sku, 5)]))
        transport.broken.add(shard_for_sku(remote_sku, SHARDS))
        replies = await a.execute([Reserve(remote_sku, "u", 1, "k"), Reserve(local_sku, "v", 1)])
        assert [reply.status for reply in replies] == ["unavailable", "ok"]
        assert "forwarding a batch to its owner failed" in caplog.text
        transport.broken.clear()
        assert (await a.reserve(remote_sku, buyer="u", key="k")).status == "ok"


async def test_batches_waiting_for_a_remote_owner_go_together_and_each_gets_its_own_replies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with split_engines(autojump_clock) as (a, _, transport):
        remote_skus = [sku for sku in SKUS if shard_for_sku(sku, SHARDS) == 2]
        assert remote_skus
        # Each SKU a different stock, so a reply says whose it is.
        stocks = {sku: 10 + index for index, sku in enumerate(remote_skus)}
        assert all(reply.ok for reply in await a.execute([PutSku(sku, stocks[sku]) for sku in remote_skus]))
        requests_before = transport.requests
        callers = 40
        answers: dict[int, list] = {}

        async def caller(index: int) -> None:
            skus = [remote_skus[(index + offset) % len(remote_skus)] for offset in range(10)]
            replies = await a.execute([Stock(sku) for sku in skus])
            answers[index] = list(zip(skus, replies, strict=True))

        async with trio.open_nursery() as nursery:
            for index in range(callers):
                nursery.start_soon(caller, index)
        # 40 batches of 10 fit in one request of 1,000 commands: never one request per batch.
        assert transport.requests - requests_before <= CLUSTER_FORWARDS_IN_FLIGHT_MAX
        assert sorted(answers) == list(range(callers))
        for pairs in answers.values():
            assert [(reply.status, reply.available) for _, reply in pairs] == [("ok", stocks[sku]) for sku, _ in pairs]
