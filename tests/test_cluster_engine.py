"""Two cluster nodes in one process, over the real three-server JetStream cluster: the
shards split between them, a crowd through both engines sells exactly the stock, and
when one node leaves the other serves its shards with every acknowledged hold there."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import msgpack
import pytest
import trio
from nats_cluster import NatsCluster

from engine.api import Engine
from engine.cluster.journal import JOURNAL_STREAM, journal_subject
from engine.cluster.nats import open_nats
from engine.cluster.node import ClusterNode, ClusterShard, open_cluster_engine
from engine.config import EngineConfig
from engine.router import shard_for_sku
from engine.shard import Batch, EngineClosed
from protocol.messages import OK, PutSku, Reply, Reserve, Stock

SHARDS = 8
REPLICAS = 3
LEASE_SECONDS = 1.0
SETTLE_SECONDS = 30.0
_clusters = itertools.count()


@asynccontextmanager
async def node(
    nats_cluster: NatsCluster, name: str, config: EngineConfig | None = None
) -> AsyncIterator[tuple[Engine, ClusterNode]]:
    async with (
        open_nats(nats_cluster.urls, name=name, connect_seconds=10.0) as nats,
        open_cluster_engine(
            nats, config or EngineConfig(shards=SHARDS), name, replicas=REPLICAS, lease_seconds=LEASE_SECONDS
        ) as (
            engine,
            cluster,
        ),
    ):
        yield engine, cluster


async def serving_everything(*nodes: ClusterNode) -> None:
    """Until the nodes serve every shard between them, each about its share."""
    with trio.fail_after(SETTLE_SECONDS):
        while True:
            local = [{shard for shard in range(SHARDS) if node.engine.is_local(shard)} for node in nodes]
            if set().union(*local) == set(range(SHARDS)) and all(len(mine) >= SHARDS // len(nodes) for mine in local):
                return
            await trio.sleep(0.05)


@pytest.fixture
def fresh_cluster_names(nats_cluster: NatsCluster) -> str:
    """Each test runs its own names: the journal stream and owner bucket are shared, so SKUs differ."""
    return f"run{next(_clusters)}"


async def test_two_nodes_sell_exactly_the_stock_and_a_node_leaving_loses_nothing(
    nats_cluster: NatsCluster, fresh_cluster_names: str
) -> None:
    prefix = fresh_cluster_names
    skus = [f"{prefix}-SKU-{number}" for number in range(6)]
    assert len({shard_for_sku(sku, SHARDS) for sku in skus}) > 1
    async with AsyncExitStack() as stack:
        engine_a, node_a = await stack.enter_async_context(node(nats_cluster, f"{prefix}-a"))
        async with node(nats_cluster, f"{prefix}-b") as (engine_b, node_b):
            await serving_everything(node_a, node_b)
            assert all(reply.ok for reply in await engine_a.execute([PutSku(sku, 20, 1) for sku in skus]))
            # 50 buyers per SKU, half through each node: 20 win each SKU.
            replies = {}
            for index in range(50):
                engine = engine_a if index % 2 else engine_b
                batch = [Reserve(sku, f"buyer-{index}", 1, f"key-{sku}-{index}") for sku in skus]
                for command, reply in zip(batch, await engine.execute(batch), strict=True):
                    replies[command.key] = reply
            statuses = [reply.status for reply in replies.values()]
            assert statuses.count("ok") == 20 * len(skus)
            assert statuses.count("sold_out") == 30 * len(skus)
        # node-b left (it handed its shards off): node-a serves everything.
        await serving_everything(node_a)
        for sku in skus:
            stock = await engine_a.stock(sku)
            assert (stock.held, stock.available) == (20, 0)
        # Every acknowledged hold is there: a retry with its key returns it.
        for index in range(50):
            for sku in skus:
                first = replies[f"key-{sku}-{index}"]
                again = await engine_a.reserve(sku, buyer=f"buyer-{index}", key=f"key-{sku}-{index}")
                if first.ok:
                    assert (again.status, again.reservation) == ("ok", first.reservation)
                else:
                    assert again.status == "sold_out"


async def test_an_owner_snapshots_names_it_in_the_lease_purges_and_the_next_owner_recovers_from_it(
    nats_cluster: NatsCluster, fresh_cluster_names: str
) -> None:
    prefix = fresh_cluster_names
    config = EngineConfig(shards=SHARDS, snapshot_records_min=20)
    sku = f"{prefix}-HOT"
    shard = shard_for_sku(sku, SHARDS)
    async with AsyncExitStack() as stack:
        engine_a, node_a = await stack.enter_async_context(node(nats_cluster, f"{prefix}-a", config))
        async with node(nats_cluster, f"{prefix}-b", config) as (_, node_b):
            await serving_everything(node_a, node_b)
            owner = node_a if engine_a.is_local(shard) else node_b
            actor = owner._serving[shard][0]
            assert all(reply.ok for reply in await engine_a.execute([PutSku(sku, 500, 1)]))
            replies = {}
            for index in range(120):
                replies[index] = await engine_a.reserve(sku, buyer=f"buyer-{index}", key=f"key-{index}")
            # The owner snapshots once 20 records and half the holds have gone by.
            with trio.fail_after(SETTLE_SECONDS):
                while True:
                    if actor.statistics().snapshots >= 1 and not actor._snapshot_running:
                        break
                    await trio.sleep(0.05)
            covered = actor.snapshot_sequence
            assert covered is not None
            entry = await owner.keeper.bucket.get(f"shard.{shard}")
            assert entry is not None
            assert msgpack.unpackb(entry[0]) == [owner.node, actor.journal.epoch, covered]
            # The messages it covers are purged: the subject starts at the snapshot.
            first = await owner.nats.read(JOURNAL_STREAM, journal_subject(shard), 1, count_max=1)
            assert first[0][0] == covered
            remaining = await engine_a.stock(sku)
        # node-b left; if it owned the shard, node-a recovered it from the snapshot (the
        # journal before it is gone, so nothing else could give the same book).
        await serving_everything(node_a)
        assert await engine_a.stock(sku) == remaining
        for index, first_reply in replies.items():
            again = await engine_a.reserve(sku, buyer=f"buyer-{index}", key=f"key-{index}")
            assert (again.status, again.reservation) == (first_reply.status, first_reply.reservation)
    # Whoever owned it last handed it off naming the snapshot: a third node recovers the same book.
    async with node(nats_cluster, f"{prefix}-c", config) as (engine_c, node_c):
        await serving_everything(node_c)
        assert await engine_c.stock(sku) == remaining


class NextOwner:
    """Stands for the shard's handle after a hand-off: answers every command `ok`."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def hand_over(self, batch: Batch) -> None:
        self.batches.append(batch)
        batch.resolve([Reply(OK) for _ in batch.commands])


async def test_a_batch_that_meets_a_handed_off_shard_goes_on_to_its_next_owner_not_back_as_busy() -> None:
    next_owner = NextOwner()
    actor = ClusterShard(0, EngineConfig(shards=1), journal=None, successor=lambda: next_owner)  # type: ignore[arg-type]
    actor.mailbox.close()  # what `ClusterNode.release` does once the engine routes elsewhere
    batch = Batch([Stock("SKU")])
    await actor.hand_over(batch)
    assert next_owner.batches == [batch]
    assert [reply.status for reply in await batch.wait()] == [OK]
    # A shard with nowhere else to send it (the engine closing) still says so.
    alone = ClusterShard(0, EngineConfig(shards=1), journal=None, successor=lambda: alone)  # type: ignore[arg-type]
    alone.mailbox.close()
    with pytest.raises(EngineClosed):
        await alone.hand_over(Batch([Stock("SKU")]))
