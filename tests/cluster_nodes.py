"""`soldout serve` cluster nodes as real processes, for the tests that start them.

Every process test of the session shares the NATS cluster's owner bucket, which records
the shard count the first node used (`cluster.shards`): they all use SHARDS.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from wire_helpers import REPOSITORY, process_environment

from protocol.client import open_client

SHARDS = 8
LEASE_SECONDS = 1.5
START_SECONDS = 60.0
RETRY_SECONDS = 20.0  # how long a reserve answered `unavailable` is retried with its key
NODE_TEMPLATE = """
[server]
metrics_port = 0
[engine]
shards = {shards}
[cluster]
nats_urls = {urls}
node = "{node}"
replicas = 3
lease_seconds = {lease_seconds}
"""


@dataclass
class NodeProcess:
    directory: Path
    node: str
    urls: list[str]
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    output: Path = field(init=False)

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / f"{self.node}.toml"
        urls = "[" + ", ".join(f'"{url}"' for url in self.urls) + "]"
        config.write_text(NODE_TEMPLATE.format(shards=SHARDS, urls=urls, node=self.node, lease_seconds=LEASE_SECONDS))
        self.output = self.directory / f"{self.node}.log"
        with self.output.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--config", str(config), "--port", "0"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=str(REPOSITORY),
                env=process_environment(),
            )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            for line in self.output.read_bytes().splitlines():
                if line.startswith(b"soldout serving "):
                    self.url = line.split()[-1].decode()
                    return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"{self.node} did not start: {self.output.read_text(errors='replace')}")

    def stop(self, signal_number: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal_number)
            self.process.wait(START_SECONDS)
        self.process = None


async def cluster_view(url: str) -> dict[str, Any]:
    async with open_client(url, reconnect_attempts=3) as admin:
        return (await admin.stats())["cluster"]  # type: ignore[no-any-return]


async def until(condition: Any, seconds: float) -> float:
    """Poll `condition()` (async) until true; returns how long it took."""
    started = trio.current_time()
    with trio.fail_after(seconds):
        while True:
            if await condition():
                return trio.current_time() - started
            await trio.sleep(0.1)  # another process's state: polled


async def owner_counts(url: str) -> dict[str | None, int]:
    """How many shards each node owns, as the node at `url` sees the owner bucket."""
    counts: dict[str | None, int] = {}
    for owner in (await cluster_view(url))["owners"].values():
        counts[owner] = counts.get(owner, 0) + 1
    return counts
