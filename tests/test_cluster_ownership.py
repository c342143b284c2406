"""Shard ownership by lease against a real three-server JetStream cluster: nodes split the
shards, a node that stops renewing loses them to the others, a node that joins gets its
share without a restart, and every new owner of a shard holds a higher epoch."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest
import trio
import trio.testing
from nats_cluster import NatsCluster

from engine.cluster.leases import fair_shares
from engine.cluster.nats import KeyExists, Nats, WrongRevision, open_nats
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
        async def acquire(shard: int, epoch: int, snapshot: int | None) -> bool:
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


async def test_a_slow_takeover_does_not_hold_up_the_renewals_of_the_shards_already_served(nats: Nats) -> None:
    """Recovering a shard can take longer than a lease (a long journal to replay): the
    other shards' leases are renewed meanwhile, so the node never steps down from them."""
    bucket = await nats.key_value(f"owners{next(_buckets)}", replicas=REPLICAS)
    serving = Serving()
    callbacks = serving.callbacks("node-a")
    slow_shard: list[int] = []
    released: list[int] = []
    recovered = trio.Event()

    async def acquire(shard: int, epoch: int, snapshot: int | None) -> bool:
        if not slow_shard and len(serving.shards["node-a"]) == SHARDS - 1:
            slow_shard.append(shard)  # the last one to be taken replays for three leases
            await trio.sleep(LEASE_SECONDS * 3)
            recovered.set()
        return await callbacks["acquire"](shard, epoch, snapshot)

    async def release(shard: int) -> None:
        released.append(shard)
        await callbacks["release"](shard)

    keeper = LeaseKeeper(bucket, "node-a", SHARDS, LEASE_SECONDS, acquire=acquire, release=release)
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        with trio.fail_after(SETTLE_SECONDS):
            await recovered.wait()
        await settled(serving, ["node-a"])
        assert released == [], f"node-a stepped down from {released} while one takeover ran"
        assert sorted(keeper.held) == list(range(SHARDS))
        nursery.cancel_scope.cancel()


async def test_only_the_current_owner_can_name_a_snapshot_in_the_lease(nats: Nats) -> None:
    bucket = await nats.key_value(f"owners{next(_buckets)}", replicas=REPLICAS)
    serving = Serving()
    keeper = LeaseKeeper(bucket, "node-a", SHARDS, LEASE_SECONDS, **serving.callbacks("node-a"))
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        await settled(serving, ["node-a"])
        assert await keeper.record_snapshot(2, 41)
        recorded_at = keeper.held[2].revision
        # The renewals after it carry the snapshot on.
        with trio.fail_after(SETTLE_SECONDS):
            while True:
                entry = await bucket.get("shard.2")
                assert entry is not None
                if entry[1] > recorded_at:
                    break
                await trio.sleep(LEASE_SECONDS / 6)
        owner, epoch, snapshot = msgpack.unpackb(entry[0])
        assert (owner, snapshot) == ("node-a", 41)
        # Another node took shard 5 over: node-a may not name a snapshot for it any more.
        entry = await bucket.get("shard.5")
        assert entry is not None
        await bucket.update("shard.5", msgpack.packb(["node-z", 999, 7]), entry[1])
        assert not await keeper.record_snapshot(5, 50)
        entry = await bucket.get("shard.5")
        assert entry is not None
        assert msgpack.unpackb(entry[0]) == ["node-z", 999, 7]
        # A handed-off lease keeps naming the snapshot, for the next owner to recover from.
        await keeper.hand_off(2)
        entry = await bucket.get("shard.2")
        assert entry is not None
        assert msgpack.unpackb(entry[0]) == ["", epoch, 41]
        nursery.cancel_scope.cancel()


async def test_a_gateway_only_node_is_live_but_owns_no_share_so_every_shard_has_an_owner(nats: Nats) -> None:
    bucket = await nats.key_value(f"owners{next(_buckets)}", replicas=REPLICAS)
    serving = Serving()
    owner = LeaseKeeper(bucket, "node-a", SHARDS, LEASE_SECONDS, **serving.callbacks("node-a"))
    gateway = LeaseKeeper(
        bucket, "gateway-g", SHARDS, LEASE_SECONDS, owns_shards=False, **serving.callbacks("gateway-g")
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        await nursery.start(owner.run)
        await settled(serving, ["node-a"])
        # Well past the rounds that would hand shards off to a share counted for the gateway.
        await trio.sleep(LEASE_SECONDS * 2)
        assert sorted(serving.shards["node-a"]) == list(range(SHARDS))
        assert not serving.shards["gateway-g"]
        assert owner.live_nodes == ["gateway-g", "node-a"]  # the cluster view lists it
        assert all(gateway.owners[shard] == "node-a" for shard in range(SHARDS))
        nursery.cancel_scope.cancel()


class HangingBucket:
    """An in-memory bucket with the adapter's semantics whose writes can be made to hang
    (a NATS server that stops answering without closing the connection)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[bytes, int]] = {}
        self.revision = 0
        self.hang = False

    async def _write(self, key: str, value: bytes) -> int:
        if self.hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        self.revision += 1
        self.entries[key] = (value, self.revision)
        return self.revision

    async def create(self, key: str, value: bytes) -> int:
        if key in self.entries:
            raise KeyExists(key)
        return await self._write(key, value)

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        if key not in self.entries or self.entries[key][1] != last_revision:
            raise WrongRevision(key)
        return await self._write(key, value)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        await trio.lowlevel.checkpoint()
        return self.entries.get(key)

    async def keys(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return list(self.entries)


async def test_a_renewal_that_hangs_still_steps_the_node_down_within_two_thirds_of_a_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = HangingBucket()
    serving = Serving()
    keeper = LeaseKeeper(bucket, "node-a", SHARDS, LEASE_SECONDS, **serving.callbacks("node-a"))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        await settled(serving, ["node-a"])
        bucket.hang = True
        hung_at = trio.current_time()
        await serving.until(lambda: not serving.shards["node-a"])
        # Served no longer than 2/3 of a lease past the last renewal sent, which was before the hang.
        assert trio.current_time() - hung_at <= LEASE_SECONDS * 2 / 3 + 1e-9
        nursery.cancel_scope.cancel()
