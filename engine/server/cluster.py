"""Opening the engine of a cluster node for `soldout serve` (the server's [cluster] table).

Connects to NATS (a clear one-line error after a bounded wait when it is unreachable),
checks the config against the cluster (replicas within the JetStream servers present; the
shard count the cluster recorded first), and opens the cluster engine. The stats reply
then carries the cluster view: this node, each shard's owner, the live nodes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack

from engine.api import Engine
from engine.cluster import ClusterUnavailable
from engine.cluster.nats import KeyExists, Nats, NatsError, NatsUnavailable, open_nats
from engine.cluster.node import ClusterNode, open_cluster_engine
from engine.cluster.ownership import OWNERS_BUCKET
from engine.server.config import ConfigError, ServerConfig
from engine.shard import CommitObserver
from protocol.limits import CLUSTER_CONNECT_SECONDS_MAX

SHARD_COUNT_KEY = "cluster.shards"


def cluster_view(cluster: ClusterNode) -> dict[str, Any]:
    """The `cluster` map of the stats reply (SPEC.md)."""
    keeper = cluster.keeper
    assert keeper is not None
    owners = {str(shard): keeper.owners.get(shard) for shard in range(keeper.shards)}
    return {"node": cluster.node, "owners": owners, "nodes": list(keeper.live_nodes)}


async def _check_against_the_cluster(nats: Nats, config: ServerConfig) -> None:
    assert config.cluster is not None
    servers = await nats.jetstream_servers()
    if config.cluster.replicas > servers:
        raise ConfigError(
            f"cluster.replicas ({config.cluster.replicas}) is above the {servers} JetStream servers present"
        )
    # The first node records the shard count; every later one must agree.
    bucket = await nats.key_value(OWNERS_BUCKET, replicas=config.cluster.replicas)
    shards = config.engine.shards
    try:
        await bucket.create(SHARD_COUNT_KEY, msgpack.packb(shards))
    except KeyExists:
        entry = await bucket.get(SHARD_COUNT_KEY)
        recorded = msgpack.unpackb(entry[0]) if entry is not None else shards
        if recorded != shards:
            raise ConfigError(
                f"engine.shards ({shards}) differs from the cluster's ({recorded}): every node must use {recorded}"
            ) from None


@asynccontextmanager
async def open_node_engine(
    config: ServerConfig, commit_observer: CommitObserver | None = None
) -> AsyncIterator[tuple[Engine, ClusterNode]]:
    cluster = config.cluster
    assert cluster is not None
    try:
        async with open_nats(
            cluster.nats_urls, name=f"soldout-{cluster.node}", connect_seconds=CLUSTER_CONNECT_SECONDS_MAX
        ) as nats:
            await _check_against_the_cluster(nats, config)
            async with open_cluster_engine(
                nats,
                config.engine,
                cluster.node,
                replicas=cluster.replicas,
                lease_seconds=cluster.lease_seconds,
                owns_shards=cluster.owns_shards,
                commit_observer=commit_observer,
            ) as (engine, node):
                yield engine, node
    except NatsUnavailable as error:
        raise ClusterUnavailable(str(error)) from None
    except NatsError as error:
        raise ClusterUnavailable(f"NATS: {error}") from None
