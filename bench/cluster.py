"""The processes of a cluster bench run: three NATS servers (bench/nats_cluster.py) and N
`soldout serve` nodes on loopback, each owning its fair share of the shards, what is read
from them (each role's CPU, each node's stats and cluster view), and the owner kill with
its failover probe.

Roles, for the CPU figures: every node is a gateway (its clients' requests, forwarded to
a shard's owner over NATS when it is not the owner) and an owner (its shards). With the
crowd on one SKU, sending the crowd only to the nodes that do not own its shard splits
them: those nodes are the gateway side, the owner takes no client traffic.

(`owns_shards = false` gateway-only nodes are not used: the lease plan counts their
heartbeats as live nodes, so the owners stop below all the shards.)

Every process started here is stopped by its pid when the block ends, also on failure
or Ctrl-C: the nodes with SIGTERM (a killed one is already gone), then the NATS servers.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.nats_cluster import NatsCluster
from bench.orchestrator import BenchError, ServerProcess, machine_busy_cpu_seconds, process_cpu_seconds

NODE = "node"  # gateway and owner at once
OWNER = "owner"
GATEWAY = "gateway"
NATS = "nats"
DEFAULT_SHARDS = 8
DEFAULT_LEASE_SECONDS = 1.5
REPLICAS = 3
# How long the shards may take to be owned, each owner at its fair share, after the nodes start.
SETTLE_SECONDS_MAX = 60.0
POLL_SECONDS = 0.1
# The failover probe asks each of the killed owner's shards this often until it answers.
PROBE_SECONDS = 0.02
FAILOVER_SECONDS_MAX = 60.0
# Names tried to find one probe SKU on each shard.
PROBE_NAMES_MAX = 1000


@dataclass
class Node:
    name: str
    server: ServerProcess

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        return self.server.pid


@dataclass
class SpawnedCluster:
    nats: NatsCluster
    nodes: list[Node]
    shards: int
    lease_seconds: float
    token: str
    admin_token: str
    # pid -> CPU seconds read just before the bench killed it.
    cpu_at_kill: dict[int, float] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def alive(self) -> list[Node]:
        return [node for node in self.nodes if node.server.running]

    def nats_pids(self) -> list[int]:
        return [server.process.pid for server in self.nats.servers if server.process is not None]

    def cpu_seconds(self, pids: Sequence[int]) -> float:
        """CPU of these processes; a killed one counts what it had spent when it was killed."""
        total = 0.0
        for pid in pids:
            seconds = process_cpu_seconds(pid)
            total += seconds if seconds is not None else self.cpu_at_kill.get(pid, 0.0)
        return total

    def kill(self, node: Node) -> None:
        seconds = process_cpu_seconds(node.pid)
        if seconds is not None:
            self.cpu_at_kill[node.pid] = seconds
        node.server.kill()


def node_config_text(
    *, node: str, nats_urls: Sequence[str], shards: int, lease_seconds: float, token: str, admin: str
) -> str:
    urls = ", ".join(f'"{url}"' for url in nats_urls)
    return (
        '[server]\nhost = "127.0.0.1"\nport = 0\nmetrics_port = false\n'
        f"[engine]\nshards = {shards}\n"
        f'[cluster]\nnats_urls = [{urls}]\nnode = "{node}"\nreplicas = {REPLICAS}\n'
        f"lease_seconds = {lease_seconds}\n"
        f'[auth]\nfrontend_tokens = ["{token}"]\nadmin_tokens = ["{admin}"]\n'
    )


@contextlib.contextmanager
def spawned_cluster(
    nodes: int, *, shards: int = DEFAULT_SHARDS, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> Iterator[SpawnedCluster]:
    """Three NATS servers and `nodes` soldout nodes, the shards settled at their fair
    shares; everything stopped after."""
    token = "front-" + secrets.token_hex(8)
    admin = "admin-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="soldout-cluster-") as directory, contextlib.ExitStack() as stack:
        root = Path(directory)
        nats = NatsCluster(root / "nats")
        stack.callback(nats.stop)
        try:
            nats.start()
        except AssertionError as error:
            raise BenchError(f"the NATS cluster did not start: {error}") from None
        cluster = SpawnedCluster(nats, [], shards, lease_seconds, token, admin)
        for name in (f"node-{number + 1}" for number in range(nodes)):
            config = root / f"{name}.toml"
            config.write_text(
                node_config_text(
                    node=name,
                    nats_urls=nats.urls,
                    shards=shards,
                    lease_seconds=lease_seconds,
                    token=token,
                    admin=admin,
                )
            )
            command = [sys.executable, "-m", "engine.cli", "serve", "--config", str(config), "--log-level", "WARNING"]
            server = ServerProcess(f"node {name}", command, "soldout serving ", root)
            server.start()
            stack.callback(server.stop)
            cluster.nodes.append(Node(name, server))
        wait_settled(cluster)
        yield cluster


def fair_shares(shards: int, owners: int) -> list[int]:
    size, extra = divmod(shards, owners)
    return sorted([size + 1] * extra + [size] * (owners - extra))


def wait_settled(cluster: SpawnedCluster, seconds: float = SETTLE_SECONDS_MAX) -> dict[str, Any]:
    """Until every shard has an owner, each node its fair share, and every node sees the
    same owners (a node routes by its own view); the cluster view then."""
    nodes = cluster.alive()
    names = [node.name for node in nodes]
    expected = fair_shares(cluster.shards, len(nodes))
    deadline = time.monotonic() + seconds
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(BenchError):
            views = [cluster_view(cluster, node)["owners"] for node in nodes]
            view = {"owners": views[0]}
            held = list(views[0].values())
            agreed = all(other == views[0] for other in views[1:])
            if agreed and None not in held and sorted(held.count(name) for name in names) == expected:
                return view
        time.sleep(POLL_SECONDS)  # another process's state: polled, with a deadline
    raise BenchError(f"the shards did not settle among {names} in {seconds:.0f} s: {view.get('owners')}")


def admin(cluster: SpawnedCluster, node: Node, work: Callable[[Any], Any]) -> Any:
    import trio

    from bench.targets import AdminError, soldout_admin

    try:
        return trio.run(soldout_admin, node.url, cluster.admin_token, work)
    except AdminError as error:
        raise BenchError(str(error)) from None


def node_stats(cluster: SpawnedCluster, node: Node) -> dict[str, Any]:
    async def stats(client: Any) -> dict[str, Any]:
        return await client.stats()  # type: ignore[no-any-return]

    return admin(cluster, node, stats)  # type: ignore[no-any-return]


def cluster_view(cluster: SpawnedCluster, node: Node) -> dict[str, Any]:
    return node_stats(cluster, node)["cluster"]  # type: ignore[no-any-return]


def owners_by_node(view: dict[str, Any]) -> dict[str, list[int]]:
    """node -> the shards it owns ("(none)" for shards without an owner)."""
    by_node: dict[str, list[int]] = {}
    for shard, owner in sorted(view["owners"].items(), key=lambda item: int(item[0])):
        by_node.setdefault(owner or "(none)", []).append(int(shard))
    return by_node


def owners_text(view: dict[str, Any]) -> str:
    return "; ".join(f"{node}: shards {', '.join(map(str, shards))}" for node, shards in owners_by_node(view).items())


class RoleCpu:
    """CPU seconds each role spent over one run (a Meter for run_drivers): `roles` maps a
    role to its nodes; the NATS servers are a role of their own."""

    def __init__(self, cluster: SpawnedCluster, roles: dict[str, Sequence[Node]]) -> None:
        self.cluster = cluster
        self.pids = {role: [node.pid for node in nodes] for role, nodes in roles.items()}
        self.pids[NATS] = cluster.nats_pids()
        self._before: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self._machine_before: float | None = None
        self.machine_seconds: float | None = None

    def start(self) -> None:
        self._before = {role: self.cluster.cpu_seconds(pids) for role, pids in self.pids.items() if pids}
        self._machine_before = machine_busy_cpu_seconds()

    def stop(self) -> None:
        machine = machine_busy_cpu_seconds()
        if machine is not None and self._machine_before is not None:
            self.machine_seconds = machine - self._machine_before
        self.seconds = {
            role: self.cluster.cpu_seconds(self.pids[role]) - before for role, before in self._before.items()
        }


def probe_skus(shards: Sequence[int], shard_count: int, tag: str) -> dict[int, str]:
    """One SKU name on each of these shards, by the engine's own routing: shard -> SKU."""
    from engine.router import shard_for_sku

    found: dict[int, str] = {}
    for number in range(PROBE_NAMES_MAX):
        sku = f"PROBE-{tag}-{number}"
        found.setdefault(shard_for_sku(sku, shard_count), sku)
        if set(shards) <= set(found):
            return {shard: found[shard] for shard in shards}
    raise BenchError(f"no probe SKU found for shards {sorted(set(shards) - set(found))}")


@dataclass
class Failover:
    """The kill of a shard owner during the run, and how long until its shards answered again."""

    victim: str
    hot_shard: int
    owners_before: dict[str, Any]
    after_seconds: float
    # Shard -> seconds from the kill to its first answer that was not `unavailable`.
    answered_after: dict[int, float] = field(default_factory=dict)
    # Probe replies `unavailable` (and other statuses) while waiting.
    probe_statuses: dict[str, int] = field(default_factory=dict)
    owners_after: dict[str, Any] | None = None
    victim_stats: dict[str, Any] | None = None
    killed: bool = False
    error: str | None = None

    def figures(self) -> dict[str, Any]:
        shards = sorted(self.answered_after)
        return {
            "killed_node": self.victim,
            "killed_after_seconds": self.after_seconds,
            "hot_shard": self.hot_shard,
            "its_shards": shards,
            "hot_shard_answered_after_ms": _ms(self.answered_after.get(self.hot_shard)),
            "all_its_shards_answered_after_ms": _ms(max(self.answered_after.values())) if shards else None,
            "per_shard_answered_after_ms": {str(shard): _ms(self.answered_after[shard]) for shard in shards},
            "probe_statuses": self.probe_statuses,
            "owners_before": owners_by_node(self.owners_before),
            "owners_after": None if self.owners_after is None else owners_by_node(self.owners_after),
            "error": self.error,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class OwnerKill:
    """After `after_seconds` from the start: read the owner's stats, SIGKILL it, then ask
    each of its shards (one probe SKU each, through a surviving node) until it answers."""

    def __init__(
        self,
        cluster: SpawnedCluster,
        victim: Node,
        probe_node: Node,
        probes: dict[int, str],
        failover: Failover,
    ) -> None:
        self.cluster = cluster
        self.victim = victim
        self.probe_node = probe_node
        self.probes = probes
        self.failover = failover
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="soldout-bench-owner-kill", daemon=True)
        self._thread.start()

    def join(self) -> Failover:
        assert self._thread is not None
        self._thread.join(FAILOVER_SECONDS_MAX + self.failover.after_seconds + 30)
        return self.failover

    def _run(self) -> None:
        try:
            time.sleep(self.failover.after_seconds)
            with contextlib.suppress(BenchError):
                self.failover.victim_stats = node_stats(self.cluster, self.victim)
            self.cluster.kill(self.victim)
            killed_at = time.monotonic()
            self.failover.killed = True
            self._probe(killed_at)
            self.failover.owners_after = self._owners_settled()
        except Exception as error:  # reported with the run's figures, not lost in a thread
            self.failover.error = f"{type(error).__name__}: {error}"

    def _owners_settled(self) -> dict[str, Any]:
        """The probe node's view once none of the killed owner's shards is shown without an
        owner or at the dead node (the view follows the leases a round later than the serving)."""
        deadline = time.monotonic() + FAILOVER_SECONDS_MAX
        while True:
            view = cluster_view(self.cluster, self.probe_node)
            owners = [view["owners"][str(shard)] for shard in self.probes]
            if all(owner not in (None, self.victim.name) for owner in owners) or time.monotonic() > deadline:
                return view
            time.sleep(POLL_SECONDS)  # another process's state: polled, with a deadline

    def _probe(self, killed_at: float) -> None:
        import trio

        from protocol.client import open_client

        failover = self.failover

        async def probe_all() -> None:
            async with open_client(self.probe_node.url, self.cluster.admin_token, reconnect_attempts=5) as client:
                with trio.fail_after(FAILOVER_SECONDS_MAX):
                    async with trio.open_nursery() as nursery:
                        for shard, sku in self.probes.items():
                            nursery.start_soon(probe_one, client, shard, sku)

        async def probe_one(client: Any, shard: int, sku: str) -> None:
            while True:
                reply = await client.stock(sku)
                status = str(reply.status)
                failover.probe_statuses[status] = failover.probe_statuses.get(status, 0) + 1
                if status != "unavailable":
                    failover.answered_after[shard] = time.monotonic() - killed_at
                    return
                await trio.sleep(PROBE_SECONDS)

        trio.run(probe_all)
