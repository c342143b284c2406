"""The [cluster] table and the --cluster / --node flags: a config error names its key, and
NATS out of reach at start is one line on stderr after a bounded wait, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from wire_helpers import REPOSITORY, process_environment

from engine.server.config import ClusterConfig, ConfigError, ServerConfig, parse_server_config, with_overrides

GOOD = {"nats_urls": ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"], "node": "node-a"}


def test_a_cluster_table_is_read_with_its_defaults() -> None:
    config = parse_server_config({"engine": {"shards": 16}, "cluster": GOOD})
    assert config.cluster == ClusterConfig(("nats://127.0.0.1:4222", "nats://127.0.0.1:4223"), "node-a", 3, 3.0, True)
    assert parse_server_config({}).cluster is None


@pytest.mark.parametrize(
    ("cluster", "engine", "key"),
    [
        ({"node": "a"}, {}, "cluster.nats_urls"),
        ({"nats_urls": []}, {}, "cluster.nats_urls"),
        ({"nats_urls": ["http://host:4222"], "node": "a"}, {}, "cluster.nats_urls"),
        ({"nats_urls": ["nats://host:port"], "node": "a"}, {}, "cluster.nats_urls"),
        ({"nats_urls": ["nats://127.0.0.1:4222"]}, {}, "cluster.node"),
        ({**GOOD, "node": "a b"}, {}, "cluster.node"),
        ({**GOOD, "replicas": 0}, {}, "cluster.replicas"),
        ({**GOOD, "replicas": 7}, {}, "cluster.replicas"),
        ({**GOOD, "lease_seconds": 0}, {}, "cluster.lease_seconds"),
        ({**GOOD, "owns_shards": "no"}, {}, "cluster.owns_shards"),
        ({**GOOD, "leader": "me"}, {}, "cluster.leader"),
        (GOOD, {"data_dir": "data"}, "engine.data_dir"),
    ],
)
def test_a_cluster_config_error_names_the_key(cluster: dict[str, Any], engine: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_server_config({"engine": engine, "cluster": cluster})


def test_the_flags_override_the_table_or_make_one() -> None:
    config = with_overrides(ServerConfig(), cluster_urls="nats://10.0.0.1:4222,nats://10.0.0.2:4222", node="n1")
    assert config.cluster == ClusterConfig(("nats://10.0.0.1:4222", "nats://10.0.0.2:4222"), "n1")
    renamed = with_overrides(config, node="n2")
    assert renamed.cluster == ClusterConfig(("nats://10.0.0.1:4222", "nats://10.0.0.2:4222"), "n2")
    with pytest.raises(ConfigError, match="--cluster and --node go together"):
        with_overrides(ServerConfig(), node="n1")
    with pytest.raises(ConfigError, match="--cluster"):
        with_overrides(ServerConfig(), cluster_urls="localhost:4222", node="n1")


def test_nats_out_of_reach_at_start_is_one_line_after_a_bounded_wait(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe closes
    completed = subprocess.run(
        [
            *(sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--metrics-port", "0"),
            *("--cluster", f"nats://127.0.0.1:{port}", "--node", "lonely", "--log-level", "ERROR"),
        ],
        capture_output=True,
        text=True,
        cwd=str(REPOSITORY),
        env=process_environment(),
        timeout=60,
    )
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("soldout: NATS unavailable at nats://127.0.0.1:")
    assert "Traceback" not in completed.stderr
