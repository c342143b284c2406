"""A two-node cluster answers exactly as one node does: the same command sequences (every
kind, good and bad, in batches that span shards) go through both cluster nodes as
gateways, each owning half the shards and forwarding the rest over NATS, and through a
single in-memory engine; every reply must be the same (status, precedence, error text,
counts, expiry), and so must the whole state at the end.

Reservation ids are the engines' to choose, and the cluster's shards carry other tests'
holds, so ids are paired as the two engines hand them out and translated on the way."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
from cluster_harness import ClusterLoop, unique_name
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model import View, observe_engine
from nats_cluster import NatsCluster
from wire_helpers import SettableWallClock

from engine import EngineConfig, open_engine
from engine.api import Engine
from protocol.messages import (
    AnyReply,
    Cancel,
    Command,
    Confirm,
    GetHold,
    GetSku,
    PutSku,
    Register,
    Reserve,
    Stock,
)

SHARDS = 8
SKUS = ("band", "phone", "tv", "pad")
BUYERS = ("ann", "bob", "cy")
KEYS = ("k1", "k2", "é" * 128)
# Ids neither engine hands out here: a shard there is not, a number never reached, no id at all.
FOREIGN = ("9-1", "0-999999", "nonsense", "1-")
ORDERS = (None, None, "po-1", "po-2")


@pytest.fixture
def cluster(nats_cluster: NatsCluster) -> Any:
    clock = SettableWallClock()
    loop = ClusterLoop(nats_cluster.urls, EngineConfig(shards=SHARDS, wall_clock=clock, snapshot_records_min=4))
    try:
        for name in (unique_name("diff-a"), unique_name("diff-b")):
            loop.run(loop.join, name)
        loop.run(loop.settle)
        assert len(loop.nodes) == 2
        yield loop, clock
    finally:
        loop.close()


# A reference to a hold: the n-th most recent pair of ids, or a foreign id.
reservation_refs = st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8), st.sampled_from(FOREIGN))
skus = st.integers(0, len(SKUS) - 1)
buyers = st.sampled_from(BUYERS)
own_buyer = st.sampled_from([True, True, True, False])  # mostly the hold's own buyer, so holds do end
windows = st.sampled_from([None, None, -10.0, 20.0])
# Every setting of a SKU (the first put_sku of each), or some of them (a change).
full_settings = st.fixed_dictionaries(
    {
        "stock": st.integers(0, 6),
        "per_buyer_limit": st.integers(1, 3),
        "hold_seconds": st.sampled_from([5, 30, 100.5]),
        "opens_in": st.sampled_from([None, None, None, None, -10.0, 20.0]),
        "closes_in": st.sampled_from([None, None, None, None, 15.0, 60.0, -5.0]),
        "registration_required": st.sampled_from([False, False, True]),
    }
)
settings_changes = st.fixed_dictionaries(
    {},
    optional={
        "stock": st.integers(0, 5),
        "per_buyer_limit": st.integers(1, 3),
        "hold_seconds": st.sampled_from([5, 30, 100.5]),
        "opens_in": windows,
        "closes_in": st.sampled_from([None, 15.0, 60.0, -5.0]),
        "registration_required": st.sampled_from([False, False, True]),
    },
)
BAD = (
    ("reserve", "buyer", ""),
    ("reserve", "qty", 0),
    ("reserve", "qty", 1001),
    ("reserve", "key", "x" * 300),
    ("reserve", "sku", "é" * 129),
    ("put", "stock", -1),
    ("put", "per_buyer_limit", 0),
    ("put", "hold_seconds", math.inf),
    ("put", "opens_at", -1.0),
    ("put", "registration_required", "yes"),
    ("register", "buyers", ["ann", ""]),
    ("confirm", "buyer", ""),
    ("stock", "sku", ""),
)
quantities = st.sampled_from([1, 1, 1, 2, 3])
keys = st.sampled_from((None, None, *KEYS))
# Each kind of command, the common ones drawn more often.
COMMANDS: dict[str, tuple[int, st.SearchStrategy[tuple[Any, ...]]]] = {
    "reserve": (6, st.tuples(st.just("reserve"), skus, buyers, quantities, keys)),
    "confirm": (2, st.tuples(st.just("confirm"), reservation_refs, buyers, own_buyer, st.sampled_from(ORDERS))),
    "cancel": (2, st.tuples(st.just("cancel"), reservation_refs, buyers, own_buyer)),
    "hold": (1, st.tuples(st.just("hold"), reservation_refs, buyers, own_buyer)),
    "put": (1, st.tuples(st.just("put"), skus, settings_changes)),
    "register": (1, st.tuples(st.just("register"), skus, st.lists(buyers, max_size=3))),
    "stock": (1, st.tuples(st.just("stock"), skus)),
    "get": (1, st.tuples(st.just("get"), skus)),
    "bad": (1, st.tuples(st.just("bad"), st.sampled_from(BAD), skus, buyers)),
}
commands = st.sampled_from([kind for kind, (weight, _) in COMMANDS.items() for _ in range(weight)]).flatmap(
    lambda kind: COMMANDS[kind][1]
)
gateways = st.integers(0, 1)
STEPS: dict[str, tuple[int, st.SearchStrategy[tuple[int, Any]]]] = {
    # (gateway, a batch of commands), or (-1, seconds) for the clock moving on.
    "batch": (6, st.tuples(gateways, st.lists(commands, min_size=1, max_size=6))),
    "restock": (
        1,
        st.tuples(gateways, st.lists(st.tuples(st.just("put"), skus, full_settings), min_size=1, max_size=2)),
    ),
    "time": (1, st.tuples(st.just(-1), st.sampled_from([0.5, 3.0, 10.0, 40.0]))),
}
steps = st.lists(
    st.sampled_from([kind for kind, (weight, _) in STEPS.items() for _ in range(weight)]).flatmap(
        lambda kind: STEPS[kind][1]
    ),
    min_size=10,
    max_size=40,
)
# Every SKU on sale first, through either gateway.
first_puts = st.tuples(*(st.tuples(st.just("put"), st.just(sku), full_settings) for sku in range(len(SKUS))))
examples = st.tuples(gateways, first_puts).flatmap(lambda first: steps.map(lambda rest: [first, *rest]))


class Pairing:
    """The cluster's reservation ids and the single node's, paired as they are handed out."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self.to_single: dict[str, str] = {}
        self.owners: dict[str, str] = {}  # buyer of each paired hold (by the single node's id)

    def pick(self, ref: int | str) -> tuple[str, str]:
        if isinstance(ref, str):
            return ref, ref
        if not self.pairs:
            return FOREIGN[ref % len(FOREIGN)], FOREIGN[ref % len(FOREIGN)]
        return self.pairs[-1 - (ref - 1) % len(self.pairs)]

    def translate(self, reply: AnyReply, single: AnyReply) -> AnyReply:
        """The cluster's reply in the single node's ids (pairing a new hold's two ids)."""
        reservation = getattr(reply, "reservation", None)
        if reservation is None:
            return reply
        if reservation not in self.to_single:
            other = getattr(single, "reservation", None)
            if other is None or other in self.to_single.values():
                return reply  # no new id there to pair with: the replies differ anyway
            self.to_single[reservation] = other
            self.pairs.append((reservation, other))
        return dataclasses.replace(reply, reservation=self.to_single[reservation])  # type: ignore[type-var]


def build(step: tuple[Any, ...], names: list[str], pairing: Pairing, now: float) -> tuple[Command, Command]:
    """One abstract command as (the cluster's, the single node's)."""
    kind = step[0]
    if kind == "put":
        change = dict(step[2])
        for name, offset in (("opens_at", "opens_in"), ("closes_at", "closes_in")):
            if offset in change:
                value = change.pop(offset)
                change[name] = None if value is None else now + value
        command: Command = PutSku(names[step[1]], **change)
        return command, command
    if kind == "register":
        command = Register(names[step[1]], list(step[2]))
        return command, command
    if kind == "reserve":
        command = Reserve(names[step[1]], step[2], step[3], step[4])
        return command, command
    if kind == "stock":
        command = Stock(names[step[1]])
        return command, command
    if kind == "get":
        command = GetSku(names[step[1]])
        return command, command
    if kind == "bad":
        (operation, field, value), sku, buyer = step[1], names[step[2]], step[3]
        good: dict[str, Command] = {
            "reserve": Reserve(sku, buyer, 1, None),
            "put": PutSku(sku, 3, 1, 30, None, None, False),
            "register": Register(sku, [buyer]),
            "confirm": Confirm(pairing.pick(1)[1], buyer),
            "stock": Stock(sku),
        }
        command = dataclasses.replace(good[operation], **{field: value})  # type: ignore[type-var]
        if operation == "confirm":
            return dataclasses.replace(command, reservation=pairing.pick(1)[0]), command  # type: ignore[type-var]
        return command, command
    clustered, single = pairing.pick(step[1])
    buyer = pairing.owners.get(single, step[2]) if step[3] else step[2]
    if kind == "confirm":
        return Confirm(clustered, buyer, step[4]), Confirm(single, buyer, step[4])
    if kind == "cancel":
        return Cancel(clustered, buyer), Cancel(single, buyer)
    return GetHold(clustered, buyer), GetHold(single, buyer)


def translated_view(view: View, to_single: dict[str, str]) -> View:
    """A cluster view in the single node's reservation ids."""
    return View(
        skus={
            sku: (*state[:7], {key: to_single.get(number, number) for key, number in state[7].items()})  # type: ignore[misc]
            for sku, state in view.skus.items()
        },
        holds={to_single.get(number, number): hold for number, hold in view.holds.items()},
    )


async def same_answers(
    loop: ClusterLoop, clock: SettableWallClock, sequence: list[tuple[Any, ...]], prefix: str
) -> None:
    names = [f"{prefix}-{sku}" for sku in SKUS]
    gateways: list[tuple[str, Engine]] = [(name, engine) for name, (engine, _) in loop.nodes.items()]
    pairing = Pairing()
    async with open_engine(EngineConfig(shards=SHARDS, wall_clock=clock)) as single:
        for gateway, batch in sequence:
            if gateway < 0:
                clock.advance(batch)
                continue
            built = [build(step, names, pairing, clock()) for step in batch]
            name, engine = gateways[gateway]
            clustered = await loop.on(name, engine.execute, [pair[0] for pair in built])
            reference = await single.execute([pair[1] for pair in built])
            for (command, _), reply, expected in zip(built, clustered, reference, strict=True):
                assert pairing.translate(reply, expected) == expected, (command, reply, expected)
                if isinstance(command, Reserve) and expected.ok:
                    pairing.owners[expected.reservation] = command.buyer  # type: ignore[union-attr,index]
        # The whole state too: counts through `stock` (which expires what is due) and the books.
        for name in names:
            through, engine = gateways[0]
            assert await loop.on(through, engine.execute, [Stock(name)]) == await single.execute([Stock(name)])
        mine: Callable[[str], bool] = lambda sku: sku in names  # noqa: E731
        clustered_view = translated_view(loop.observe(mine), pairing.to_single)
        single_view = observe_engine(single)
        assert clustered_view.skus == {sku: state for sku, state in single_view.skus.items() if mine(sku)}
        assert clustered_view.holds == single_view.holds


def test_two_cluster_nodes_answer_every_sequence_as_one_node_does(cluster: Any) -> None:
    loop, clock = cluster

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    @given(sequence=examples)
    def same_as_one_node(sequence: list[tuple[Any, ...]]) -> None:
        loop.run(same_answers, loop, clock, sequence, unique_name("diff"))

    same_as_one_node()
    # Both gateways forwarded to the other's shards: the sequences crossed the cluster.
    assert all(0 < sum(engine.is_local(shard) for shard in range(SHARDS)) < SHARDS for engine, _ in loop.nodes.values())
