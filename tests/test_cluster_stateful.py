"""The engine-against-model state machine (tests/test_engine_stateful.py), driving a cluster.

The same rules and the same whole-state check after every step, against cluster nodes
over the real three-server JetStream cluster: each call goes through one node's engine
as gateway (taking turns, so a shard is reached locally and over NATS), and the state
is read from the books of whichever nodes own the SKUs' shards.

The reopen rule becomes a hand-over: a node leaves, a node joins, or one replaces
another (with time passing meanwhile), so shards move and their new owners recover
the books from the shards' journals (and from snapshots, taken often here:
`snapshot_records_min` is small); then every answer and the whole state must still be
the model's. Time is the harness's stepped wall clock, which only the rules move: NATS
needs trio's real clock, so no MockClock here.

The journal stream and owner bucket are the session's, so each run of the machine
names SKUs of its own, and nodes are named once each.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from cluster_harness import ClusterLoop, unique_name
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from model import Model, assert_same_reply
from nats_cluster import NatsCluster
from test_engine_stateful import SKUS, EngineAgainstModel, sku_settings
from wire_helpers import SettableWallClock

from engine import Engine, EngineConfig
from engine.router import shard_for_sku

T = TypeVar("T")
SHARDS = 8
NODES_MAX = 3
HAND_OVER_EVERY_STEPS = 10


class ClusterAgainstModel(EngineAgainstModel):
    # Set by the test before it runs the machine: the nodes live across its runs.
    loop: ClusterLoop
    wall: SettableWallClock
    moves_with_holds = 0  # hand-overs that moved a shard holding some run's holds

    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.prefix = unique_name("sm")
        self.model = Model(shards=SHARDS)
        self.reservations: list[str] = []
        self.turn = 0
        self.steps = 0
        self.moved_a_hold = False
        self.directory = ""  # no data directory: the journals are the cluster's
        self.engine_thread = None
        self.config = self.loop.config

    def now(self) -> float:
        return self.wall()

    def sku_name(self, sku: str) -> str:
        return f"{self.prefix}-{sku}"

    @initialize(first_skus=st.lists(sku_settings, min_size=len(SKUS) - 1, max_size=len(SKUS) - 1))
    def open(self, first_skus: list[dict[str, Any]]) -> None:  # type: ignore[override]
        """All SKUs but the last on sale; the last may come later."""
        for sku, setup in zip(SKUS, first_skus, strict=False):
            self.put_sku(sku, setup)

    @property
    def engine(self) -> Engine:
        """The next node's engine, in turn: every call goes through some node as gateway."""
        engines = [engine for engine, _ in self.loop.nodes.values()]
        self.turn += 1
        return engines[self.turn % len(engines)]

    def call(self, function: Callable[..., Awaitable[T]], *args: Any, **keywords: Any) -> T:
        """Await an engine method in its node's context (the node's NATS loop lives there)."""
        engine = function.__self__  # type: ignore[attr-defined]
        name = next(name for name, (node_engine, _) in self.loop.nodes.items() if node_engine is engine)
        return self.loop.run(self.loop.on, name, functools.partial(function, **keywords), *args)

    def teardown(self) -> None:
        # The nodes serve the next run too; this run moved a shard with a hold on it at least once.
        if not self.moved_a_hold:
            self.hand_over_a_hold()
            self.check_state()

    @rule(seconds=st.sampled_from([0.5, 3.0, 10.0, 40.0]))
    def advance_time(self, seconds: float) -> None:
        """Holds run out and sale windows open and close as the clock moves."""
        self.wall.advance(seconds)

    @rule(move=st.sampled_from(["replace", "leave", "join"]), closed_for=st.sampled_from([0.0, 0.0, 7.0, 50.0]))
    def reopen(self, move: str, closed_for: float) -> None:  # type: ignore[override]
        """Shards move: a node leaves (handing its shards off), joins, or replaces another.

        The new owners recover the books from the journals (and snapshots); time may pass
        meanwhile, and holds that ran out by then expire as the shards are taken over.
        """
        self.move_shards(move, closed_for)

    def move_shards(self, move: str, closed_for: float) -> None:
        before = self.owners_of_my_holds()
        names = list(self.loop.nodes)
        # The node leaving is the one serving most shards with this run's holds, if any.
        leaving = max(names, key=lambda name: sum(owner == name for owner in before.values()))
        # A lone node is replaced rather than left: one node at least serves the shards.
        if move == "replace" or len(names) == 1 or (move == "join" and len(names) < NODES_MAX):
            self.loop.run(self.loop.join, unique_name("sm-node"))
        if move != "join":
            self.loop.run(self.loop.leave, leaving)
        self.wall.advance(closed_for)
        self.loop.run(self.loop.settle)
        after = self.owners_of_my_holds()
        moved = sum(before[shard] != after[shard] for shard in before)
        self.moved_a_hold = self.moved_a_hold or moved > 0
        ClusterAgainstModel.moves_with_holds += moved

    def hand_over_a_hold(self) -> None:
        """A hold of this run (made and checked here if need be) moves with its shard's owner leaving."""
        sku = self.sku_name("hand-over")
        if sku not in self.model.skus:
            self._put_sku(
                {
                    "sku": sku,
                    "stock": 1000,
                    "per_buyer_limit": 1000,
                    "hold_seconds": 900,
                    "opens_at": None,
                    "closes_at": None,
                    "registration_required": False,
                }
            )
        self._reserve(sku, "ann", 1, None)
        self.move_shards("replace", 0.0)

    def owners_of_my_holds(self) -> dict[int, str]:
        """The node serving each shard that holds some of this run's holds."""
        shards = {shard_for_sku(hold.sku, SHARDS) for hold in self.model.holds.values()}
        return {
            shard: next(name for name, (engine, _) in self.loop.nodes.items() if engine.is_local(shard))
            for shard in shards
        }

    @invariant()
    def same_state_as_the_model(self) -> None:
        # Hypothesis leaves some rules out of some runs: hand-overs happen every few steps
        # whatever it chose, so every run moves shards.
        self.steps += 1
        if self.steps % HAND_OVER_EVERY_STEPS == 0:
            self.hand_over_a_hold()
        self.check_state()

    def check_state(self) -> None:
        now = self.now()
        self.model.expire(now)
        self.model.check_invariants()
        mine = set(map(self.sku_name, SKUS)) | set(self.model.skus)
        for sku in sorted(mine):
            actual = self.call(self.engine.stock, sku)
            assert_same_reply(actual, self.model.stock(sku, now), ("stock", sku))
        # The stock calls were a batch for every SKU's shard: what was due has expired.
        actual = self.loop.run_sync(self.loop.observe, mine.__contains__)
        expected = self.model.view()
        assert actual.skus == expected.skus, "the cluster's SKUs differ from the model's"
        assert actual.holds == expected.holds, "the cluster's holds differ from the model's"


@pytest.fixture
def cluster(nats_cluster: NatsCluster) -> Iterator[tuple[ClusterLoop, SettableWallClock]]:
    wall = SettableWallClock()
    # A small snapshot_records_min: shards snapshot often (where the holds they carry allow).
    loop = ClusterLoop(nats_cluster.urls, EngineConfig(shards=SHARDS, wall_clock=wall, snapshot_records_min=4))
    try:
        for _ in range(2):
            loop.run(loop.join, unique_name("sm-node"))
        loop.run(loop.settle)
        yield loop, wall
    finally:
        loop.close()


def test_a_cluster_answers_as_the_model_across_hand_overs(cluster: tuple[ClusterLoop, SettableWallClock]) -> None:
    ClusterAgainstModel.loop, ClusterAgainstModel.wall = cluster
    ClusterAgainstModel.moves_with_holds = 0
    run_state_machine_as_test(
        ClusterAgainstModel,
        settings=settings(
            max_examples=6,
            stateful_step_count=20,
            deadline=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    # Shards moved with holds on them: their new owners recovered real books.
    assert ClusterAgainstModel.moves_with_holds > 0
