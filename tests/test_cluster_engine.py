"""Two cluster nodes in one process, over the real three-server JetStream cluster: the
shards split between them, a crowd through both engines sells exactly the stock, and
when one node leaves the other serves its shards with every acknowledged hold there."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from nats_cluster import NatsCluster

from engine.api import Engine
from engine.cluster.nats import open_nats
from engine.cluster.node import ClusterNode, open_cluster_engine
from engine.config import EngineConfig
from engine.router import shard_for_sku
from protocol.messages import PutSku, Reserve

SHARDS = 8
REPLICAS = 3
LEASE_SECONDS = 1.0
SETTLE_SECONDS = 30.0
_clusters = itertools.count()


@asynccontextmanager
async def node(nats_cluster: NatsCluster, name: str) -> AsyncIterator[tuple[Engine, ClusterNode]]:
    async with (
        open_nats(nats_cluster.urls, name=name, connect_seconds=10.0) as nats,
        open_cluster_engine(
            nats, EngineConfig(shards=SHARDS), name, replicas=REPLICAS, lease_seconds=LEASE_SECONDS
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
