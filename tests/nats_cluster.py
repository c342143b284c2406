"""The session's three-server JetStream cluster (bench.nats_cluster starts and stops it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.nats_cluster import NatsCluster, NatsServer, running_cluster

__all__ = ["NatsCluster", "NatsServer", "nats_cluster"]


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One running three-server JetStream cluster for the whole session."""
    with running_cluster(tmp_path_factory.mktemp("nats-cluster")) as cluster:
        yield cluster
