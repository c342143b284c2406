"""Shard ownership by lease against a real three-server JetStream cluster: nodes split the
shards, a node that stops renewing loses them to the others, a node that joins gets its
share without a restart, and every new owner of a shard holds a higher epoch."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import pytest
import trio
from nats_cluster import NatsCluster

from engine.cluster.leases import fair_shares
from engine.cluster.nats import Nats, open_nats
from engine.cluster.ownership import LeaseKeeper

REPLICAS = 3
SHARDS = 8
LEASE_SECONDS = 1.0
# Well past a lease and the rounds it takes to notice one has lapsed.
SETTLE_SECONDS = 20.0
_buckets = itertools.count()


@pytest.fixture
async def nats(nats_cluster: NatsCluster) -> AsyncIterator[Nats]:
    async with open_nats(nats_cluster.urls, name="soldout-ownership-test", connect_seconds=10.0) as client:
        yield client


class Serving:
    """What each node serves, as the keepers' callbacks say; and every (shard, epoch) taken."""

    def __init__(self) -> None:
        self.shards: dict[str, set[int]] = defaultdict(set)
        self.epochs: dict[int, list[int]] = defaultdict(list)
        self._changed = trio.Event()

    def _change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait (bounded) until `condition` holds; it is checked again at every change."""
        with trio.fail_after(SETTLE_SECONDS):
            while not condition():
                await self._changed.wait()

    def callbacks(self, node: str) -> dict:
        async def acquire(shard: int, epoch: int) -> bool:
            for others in self.shards.values():
                assert shard not in others, f"{node} took shard {shard} while another node serves it"
            self.shards[node].add(shard)
            self.epochs[shard].append(epoch)
            self._change()
            return True

        async def release(shard: int) -> None:
            self.shards[node].discard(shard)
            self._change()

        return {"acquire": acquire, "release": release}


async def settled(serving: Serving, nodes: list[str]) -> None:
    """Wait until the nodes serve every shard between them, each its fair share."""
    shares = fair_shares(SHARDS, nodes)

    def balanced() -> bool:
        counts = {node: len(serving.shards[node]) for node in nodes}
        return counts == shares and set().union(*(serving.shards[node] for node in nodes)) == set(range(SHARDS))

    await serving.until(balanced)


async def test_nodes_split_the_shards_and_fail_over_and_rebalance(nats: Nats) -> None:
    bucket = await nats.key_value(f"owners{next(_buckets)}", replicas=REPLICAS)
    serving = Serving()

    def keeper(node: str) -> LeaseKeeper:
        return LeaseKeeper(bucket, node, SHARDS, LEASE_SECONDS, **serving.callbacks(node))

    async with trio.open_nursery() as nursery:
        a, b = keeper("node-a"), keeper("node-b")
        scopes = {}
        for node in (a, b):
            scope = trio.CancelScope()
            scopes[node.node] = scope

            async def run(node: LeaseKeeper = node, scope: trio.CancelScope = scope) -> None:
                with scope:
                    await node.run()

            nursery.start_soon(run)
        await settled(serving, ["node-a", "node-b"])
        # node-b dies (stops renewing, releases nothing): node-a takes its shards over.
        lost = set(serving.shards["node-b"])
        scopes["node-b"].cancel()
        serving.shards["node-b"].clear()  # a dead process serves nothing
        await settled(serving, ["node-a"])
        for shard in lost:
            assert serving.epochs[shard] == sorted(serving.epochs[shard])
            assert len(set(serving.epochs[shard])) == len(serving.epochs[shard])  # a new, higher epoch
        # node-c joins: node-a hands shards off to it, without a restart.
        c = keeper("node-c")
        nursery.start_soon(c.run)
        await settled(serving, ["node-a", "node-c"])
        assert sorted(a.live_nodes) == ["node-a", "node-c"]
        # Every shard's owners, in order, held rising epochs.
        for shard in range(SHARDS):
            assert serving.epochs[shard] == sorted(set(serving.epochs[shard]))
        nursery.cancel_scope.cancel()


async def test_a_node_that_cannot_renew_steps_down_before_its_lease_runs_out(nats: Nats) -> None:
    bucket = await nats.key_value(f"owners{next(_buckets)}", replicas=REPLICAS)
    serving = Serving()
    keeper = LeaseKeeper(bucket, "node-a", SHARDS, LEASE_SECONDS, **serving.callbacks("node-a"))
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        await settled(serving, ["node-a"])
        # Another writer takes shard 3's key (as a node that saw the lease lapse would):
        # node-a's next renewal fails, and it stops serving that shard at once.
        entry = await bucket.get("shard.3")
        assert entry is not None
        await bucket.update("shard.3", b"\x92\xa6node-z\x01", entry[1])
        await serving.until(lambda: 3 not in serving.shards["node-a"])
        assert 3 not in keeper.held
        nursery.cancel_scope.cancel()
