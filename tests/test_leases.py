"""The lease plan: nodes that each follow it, in any order, end with every shard owned by
a live node and each node holding its fair share; joins and deaths re-balance."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cluster.leases import Lease, LeasePlan, fair_shares, plan


def settle(shards: int, owners: dict[int, Lease | None], live: list[str], generator: random.Random) -> int:
    """Let the live nodes follow their plans, one at a time in random order, until none
    changes anything; a take is a create in the bucket (it fails if someone holds the
    shard). Returns the rounds it took."""
    for rounds in range(1, 4 * shards + 8):
        changed = False
        for node in generator.sample(live, len(live)):
            step = plan(node, shards, owners, live)
            for shard in step.take:
                lease = owners.get(shard)
                if lease is None or lease.node not in live:  # the create wins
                    epoch = 0 if lease is None else lease.epoch
                    owners[shard] = Lease(node, epoch + 1)
                    changed = True
            for shard in step.hand_off:
                assert owners[shard] == Lease(node, owners[shard].epoch)  # type: ignore[union-attr]
                owners[shard] = None
                changed = True
        if not changed:
            return rounds
    raise AssertionError(f"no steady state: {owners}")


def assert_balanced(shards: int, owners: dict[int, Lease | None], live: list[str]) -> None:
    assert all(owners[shard] is not None and owners[shard].node in live for shard in range(shards))  # type: ignore[union-attr]
    counts = {node: sum(1 for lease in owners.values() if lease and lease.node == node) for node in live}
    assert counts == fair_shares(shards, live)
    for node in live:
        assert plan(node, shards, owners, live) == LeasePlan((), ())


def test_fair_shares_split_as_evenly_as_can_be_and_every_node_computes_the_same() -> None:
    assert fair_shares(8, ["b", "a"]) == {"a": 4, "b": 4}
    assert fair_shares(8, ["c", "a", "b"]) == {"a": 3, "b": 3, "c": 2}
    assert fair_shares(2, ["a", "b", "c"]) == {"a": 1, "b": 1, "c": 0}
    assert fair_shares(8, []) == {}


def test_a_node_alone_takes_every_shard() -> None:
    assert plan("a", 4, {}, []) == LeasePlan((0, 1, 2, 3), ())


def test_a_lease_of_a_node_that_is_not_live_is_free_to_take() -> None:
    owners = {0: Lease("gone", 3), 1: Lease("a", 1)}
    assert plan("a", 2, owners, ["a"]).take == (0,)


def test_a_node_over_its_share_hands_off_only_what_a_live_node_can_take() -> None:
    owners: dict[int, Lease | None] = {shard: Lease("a", 1) for shard in range(8)}
    assert plan("a", 8, owners, ["a"]) == LeasePlan((), ())
    assert plan("a", 8, owners, ["a", "b"]) == LeasePlan((), (7, 6, 5, 4))
    # While shards are free, b takes those first: a hands off only the rest of b's need.
    owners[7] = None
    assert plan("a", 8, owners, ["a", "b"]).hand_off == (6, 5, 4)


@settings(max_examples=200, deadline=None)
@given(
    shards=st.integers(min_value=1, max_value=24),
    nodes=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_nodes_following_the_plan_settle_balanced_through_joins_and_deaths(shards: int, nodes: int, seed: int) -> None:
    generator = random.Random(seed)
    names = [f"node-{index}" for index in range(nodes + 1)]
    owners: dict[int, Lease | None] = {}
    live = names[:nodes]
    settle(shards, owners, live, generator)
    assert_balanced(shards, owners, live)
    # A node joins: shards move to it without anyone restarting.
    live = names
    settle(shards, owners, live, generator)
    assert_balanced(shards, owners, live)
    # A node dies: the others take its shards.
    dead = generator.choice(live)
    lost = [shard for shard in range(shards) if owners[shard].node == dead]  # type: ignore[union-attr]
    live = [name for name in live if name != dead]
    settle(shards, owners, live, generator)
    assert_balanced(shards, owners, live)
    assert all(owners[shard].node != dead for shard in lost)  # type: ignore[union-attr]
