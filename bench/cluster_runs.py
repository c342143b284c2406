"""One flash-crowd run against a spawned cluster (bench/cluster.py): the crowd spread over
every crowd node's gateway, each role's CPU, the owners' replicated commits, and, when
asked, the kill -9 of the hot SKU's owner mid-run with the time until its shards answer.

The checks are the single server's (bench/checks.py: nothing oversold, held + sold ==
the ok replies, no reservation twice, every buyer answered, no reserve left unavailable),
read through a surviving node, and one more: every acknowledged hold is present, that
is every `ok` the crowd was told, sent again with its key, returns the same reservation
and takes no unit more. The stats-based checks of a single server are left out: each
node counts its own gateway's requests, and a killed node's counts die with it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.checks import Check, Counts, check_run
from bench.cluster import (
    GATEWAY,
    NODE,
    OWNER,
    REPLICAS,
    Failover,
    Node,
    OwnerKill,
    RoleCpu,
    SpawnedCluster,
    admin,
    cluster_view,
    node_stats,
    probe_skus,
)
from bench.driver import DriverSettings
from bench.orchestrator import BenchError, Load, run_drivers
from bench.report import RunReport, journal_figures, merge
from bench.runs import _counts, _report
from bench.scenarios import Scenario

# Re-reserves with their keys go in chunks of this many.
RESERVE_CHUNK = 1000
# Reading the counts after a failover: a shard may still be settling at first.
COUNTS_SECONDS_MAX = 30.0


@dataclass(frozen=True)
class ClusterRun:
    kill_owner_after: float | None = None
    # The crowd only to the nodes that do not own the hot SKU's shard: gateway and owner apart.
    split_roles: bool = False


def run_cluster(cluster: SpawnedCluster, scenario: Scenario, load: Load, label: str, run: ClusterRun) -> RunReport:
    from engine.router import shard_for_sku

    demand = scenario.plan().demand()
    nodes = cluster.alive()
    first = nodes[0]

    async def put(client: Any) -> None:
        # Right after the shards settle a node may still be learning their owners: a put
        # answered unavailable is asked again (a put sets the same settings again).
        replies = await _decided(client, [_put_sku(plan) for plan in scenario.skus])
        for plan, reply in zip(scenario.skus, replies, strict=True):
            if reply.status != "ok":
                raise BenchError(f"put_sku {plan.sku} was answered {reply.status}: {reply.error or ''}")

    admin(cluster, first, put)
    hot_shard = shard_for_sku(scenario.skus[0].sku, cluster.shards)
    view = cluster_view(cluster, first)
    hot_owner = cluster.node(view["owners"][str(hot_shard)])
    if run.split_roles:
        crowd = [node for node in nodes if node is not hot_owner]
        roles = {GATEWAY: crowd, OWNER: [hot_owner]}
    else:
        crowd = nodes
        roles = {NODE: nodes}
    owners = nodes
    stats_before = {node.name: node_stats(cluster, node) for node in owners}
    kill = _owner_kill(cluster, view, hot_shard, run) if run.kill_owner_after is not None else None
    urls = tuple(node.url for node in crowd)
    template = DriverSettings("soldout", urls[0], cluster.token, scenario, 0, range(0), 1, 1, 1, None, None, urls=urls)
    cpu = RoleCpu(cluster, roles)
    results = run_drivers(
        load,
        load.settings(scenario, template),
        label,
        scenario.total_stock,
        cpu,
        started=None if kill is None else kill.start,
    )
    merged = merge(results)
    failover = kill.join() if kill is not None else None
    survivor = next(node for node in crowd + owners if node.server.running)
    stats_after = {node.name: node_stats(cluster, node) for node in owners if node.server.running}
    if failover is not None and failover.victim_stats is not None:
        stats_after.setdefault(failover.victim, failover.victim_stats)
    counts = _settled_counts(cluster, survivor, scenario)
    checks = check_run(
        scenario, demand, merged.observed, _counts(counts), reserve_statuses=merged.statuses.get("reserve", {})
    )
    checks += _acknowledged_holds_present(cluster, survivor, scenario, merged.observed.holds, counts)
    report = _report(label, "soldout", scenario, merged, checks, load)
    report.role_cpu_seconds = cpu.seconds
    report.server_cpu_seconds = sum(cpu.seconds.values())
    report.machine_cpu_seconds = cpu.machine_seconds
    journal = journal_figures([stats_before[name] for name in stats_after], [stats_after[name] for name in stats_after])
    if journal is not None:
        journal["kind"] = f"replicated JetStream publish, R{REPLICAS}"
    report.journal = journal
    report.cluster = {
        "nodes": [
            {
                "name": node.name,
                "role": next(role for role, members in roles.items() if node in members),
                "url": node.url,
                "pid": node.pid,
            }
            for node in cluster.nodes
        ],
        "nats_pids": cluster.nats_pids(),
        "crowd_nodes": [node.name for node in crowd],
        "shards": cluster.shards,
        "hot_shard": hot_shard,
        "lease_seconds": cluster.lease_seconds,
        "owners_before": view["owners"],
        "owners_after": cluster_view(cluster, survivor)["owners"],
    }
    if failover is not None:
        report.failover = failover.figures()
        if failover.error is not None:
            report.checks.append(
                Check("the failover probe saw every shard of the killed owner answer", False, failover.error)
            )
    return report


def _owner_kill(cluster: SpawnedCluster, view: dict[str, Any], hot_shard: int, run: ClusterRun) -> OwnerKill:
    assert run.kill_owner_after is not None
    victim_name = view["owners"][str(hot_shard)]
    if victim_name is None:
        raise BenchError(f"shard {hot_shard} of the hot SKU has no owner before the run")
    victim = cluster.node(victim_name)
    others = [node for node in cluster.alive() if node is not victim]
    if not others:
        raise BenchError("--kill-owner-after needs a second node to take the shards over: --cluster 2 or more")
    # The probe asks through a node that survives.
    probe_node = others[0]
    its_shards = [int(shard) for shard, owner in view["owners"].items() if owner == victim_name]
    probes = probe_skus(its_shards, cluster.shards, secrets.token_hex(3))

    async def put(client: Any) -> None:
        for sku in probes.values():
            reply = await client.put_sku(sku, stock=0)
            if not reply.ok:
                raise BenchError(f"put_sku {sku} was answered {reply.status}")

    admin(cluster, probe_node, put)
    failover = Failover(victim_name, hot_shard, view, run.kill_owner_after)
    return OwnerKill(cluster, victim, probe_node, probes, failover)


def _put_sku(plan: Any) -> Any:
    from protocol.messages import PutSku

    return PutSku(plan.sku, plan.stock, plan.per_buyer_limit, plan.hold_seconds)


def _settled_counts(cluster: SpawnedCluster, node: Node, scenario: Scenario) -> list[Any]:
    """Each SKU's stock reply; a shard still without an owner is asked again, for a while."""
    from protocol.messages import Stock

    deadline = time.monotonic() + COUNTS_SECONDS_MAX

    async def read(client: Any) -> list[Any]:
        import trio

        while True:
            replies = await client.execute([Stock(plan.sku) for plan in scenario.skus])
            if all(reply.status != "unavailable" for reply in replies) or time.monotonic() > deadline:
                return [reply if reply.status == "ok" else None for reply in replies]
            await trio.sleep(0.1)

    return admin(cluster, node, read)  # type: ignore[no-any-return]


def _acknowledged_holds_present(
    cluster: SpawnedCluster,
    node: Node,
    scenario: Scenario,
    holds: Sequence[tuple[int, int, str]],
    counts: Sequence[Any],
) -> list[Check]:
    """Every ok the crowd was told, sent again with its key through a surviving node,
    returns the same reservation; and the counts do not move."""
    from protocol.messages import Reserve

    plan = scenario.plan()
    names = [sku.sku for sku in scenario.skus]

    async def again(client: Any) -> tuple[list[str], list[Any]]:
        differ: list[str] = []
        for start in range(0, len(holds), RESERVE_CHUNK):
            chunk = holds[start : start + RESERVE_CHUNK]
            commands = [Reserve(names[sku], plan.buyer(buyer), 1, plan.key(buyer)) for sku, buyer, _ in chunk]
            for (_, buyer, reservation), reply in zip(chunk, await _decided(client, commands), strict=True):
                if reply.status != "ok" or reply.reservation != reservation:
                    differ.append(f"{plan.buyer(buyer)}: told {reservation}, now {reply.status} {reply.reservation}")
        from bench.targets import stock_counts

        return differ, await stock_counts(client, scenario)

    differ, after = admin(cluster, node, again)
    moved = [
        f"{name}: held + sold {_taken(before)} before, {_taken(now)} after"
        for name, before, now in zip(names, _counts(counts), _counts(after), strict=True)
        if _taken(before) != _taken(now)
    ]
    detail = "; ".join(differ[:5]) + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")
    return [
        Check(
            f"every acknowledged hold present (its {len(holds):,} keys sent again: the same reservation)",
            not differ,
            "" if not differ else detail,
        ),
        Check("sending the acknowledged holds again took no unit more", not moved, "; ".join(moved)),
    ]


async def _decided(client: Any, commands: Sequence[Any]) -> list[Any]:
    """Replies to `commands`, those answered unavailable asked again (with their keys) for a while."""
    import trio

    replies = list(await client.execute(commands))
    deadline = time.monotonic() + COUNTS_SECONDS_MAX
    while time.monotonic() < deadline:
        pending = [index for index, reply in enumerate(replies) if reply.status == "unavailable"]
        if not pending:
            break
        await trio.sleep(0.1)
        for index, reply in zip(pending, await client.execute([commands[index] for index in pending]), strict=True):
            replies[index] = reply
    return replies


def _taken(counts: Counts | None) -> int | None:
    return None if counts is None else counts.held + counts.sold
