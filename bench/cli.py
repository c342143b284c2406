"""`soldout bench`: a flash crowd against a soldout server, measured and checked; the same
crowd against Redis + Lua and against the echo ceiling, side by side; the wire cases;
and the embedded engine.

    soldout bench --spawn                          # start a memory-only server, run `flash`
    soldout bench catalog --spawn --durable
    soldout bench --url ws://127.0.0.1:8765/v1 --token front-secret --admin-token admin-secret
    soldout bench --spawn --durable --peer redis   # starts a redis-server too (appendfsync always)
    soldout bench --spawn --durable --peer echo    # soldout's rate as a share of the echo server's
    soldout bench --url ws://HOST:8765/v1 --token T --admin-token A --sku FLASH-2 --buyers-file registered.csv
    soldout bench wire --quick                     # the wire cases: 1 and 100 per frame, open loop, soak
    soldout bench embedded --quick                 # decisions/s through the in-process API
    soldout bench --cluster 2                      # 3 NATS servers + 2 nodes, the crowd through both
    soldout bench --cluster 2 --split-roles        # the crowd only to the node not owning its SKU
    soldout bench --cluster 2 --kill-owner-after 2 # kill -9 the hot SKU's owner 2 s in: failover time

The bench puts its own SKUs (names unique to the run, through the admin op put_sku), or
with `--sku` drives a SKU the server already has, as its operator configured it (stock,
limit, hold time, registration; the crowd starts at its opening time), starts `--procs`
driver processes that share `--connections` connections, gives them a common start
time, shows a live progress line, and at the end prints a table of figures, the ratios
between the targets of the run, checks the outcome through the server's own `stock` and
`stats`, and exits non-zero when a check fails, naming what broke. A run against `--url`
cancels the holds it made when it ends (unless `--keep-holds`). `--repeat N` runs it all
N times and prints each figure's spread.

This module is the command: its flags, and the order of a command's runs. One run
against one target is bench/runs.py's; the processes are bench/orchestrator.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.checks import failures
from bench.cluster import DEFAULT_LEASE_SECONDS, DEFAULT_SHARDS, spawned_cluster
from bench.cluster_runs import ClusterRun, run_cluster
from bench.orchestrator import BenchError, Load, Server, spawned_echo, spawned_soldout
from bench.report import (
    PlotUnavailable,
    RunReport,
    cluster_line,
    cpu_line,
    failover_lines,
    human_summary,
    journal_line,
    json_report,
    load_line,
    plot,
    ratio_line,
    ratio_spread_line,
    retries_line,
    role_cpu_line,
    rss_line,
    runs_table,
    spread_table,
    statuses_line,
)
from bench.runs import admin_call, run_echo, run_redis, run_soldout
from bench.scenarios import (
    DEFAULT_BUYERS,
    DEFAULT_HOLD_SECONDS,
    SCENARIOS,
    WIRE_CASES,
    Scenario,
    SkuPlan,
    WireCase,
    build_scenario,
    configured_scenario,
    read_buyer_file,
    wire_cases,
)

COMMANDS = (*SCENARIOS, "wire")
PEERS = ("redis", "echo")
# Default requests in flight per connection, in batches: one being decided, one on the way.
INFLIGHT_BATCHES = 2
# A closed loop's pace, for judging up front whether checkout's holds outlive the crowd:
# a low figure for soldout on a 2-core machine, so the judgement errs on the safe side.
CLOSED_LOOP_REQUESTS_PER_SECOND_ESTIMATE = 20_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soldout bench",
        description=(
            "Drive a flash crowd against soldout (and optionally Redis + Lua or the echo ceiling), "
            "measure it, check it. `soldout bench embedded --help` for the in-process engine."
        ),
    )
    parser.add_argument(
        "scenario",
        nargs="?",
        choices=COMMANDS,
        default="flash",
        help="flash, catalog, checkout, or wire (the wire cases); default: flash",
    )
    server = parser.add_argument_group("the soldout server")
    server.add_argument("--url", help="a running server, ws://HOST:PORT/v1")
    server.add_argument("--token", help="a frontend (or admin) token for the crowd")
    server.add_argument("--admin-token", help="an admin token to put the SKUs and read stats (default: --token)")
    server.add_argument("--spawn", action="store_true", help="start a server for the run and stop it after")
    storage = server.add_mutually_exclusive_group()
    storage.add_argument("--durable", action="store_true", help="spawned servers journal and fsync (and Redis too)")
    storage.add_argument("--memory", action="store_true", help="spawned servers keep nothing on disk (the default)")
    server.add_argument("--shards", type=int, help="shards of a spawned server (default: the server's)")
    server.add_argument(
        "--server-module",
        default="engine.cli",
        help="module run as `python -m MODULE serve --config FILE` for a spawned server (engine.cli)",
    )
    server.add_argument(
        "--keep-holds", action="store_true", help="leave the run's holds on a --url server (default: cancel them)"
    )
    crowd = parser.add_argument_group("the crowd")
    crowd.add_argument("--buyers", type=int, help="distinct buyers, each trying once (default 200,000)")
    crowd.add_argument("--stock", type=int, help="units per SKU (flash, checkout: 10,000; catalog: 100)")
    crowd.add_argument("--skus", type=int, help="SKUs (flash, checkout: 1; catalog: 1,000)")
    crowd.add_argument("--hold-seconds", type=float, help="hold time (checkout: 2; otherwise 900)")
    crowd.add_argument("--confirm-share", type=float, help="checkout: share of winners who confirm (0.6)")
    crowd.add_argument(
        "--cancel-share", type=float, help="checkout: share of winners who cancel (0.2); the rest let it expire"
    )
    crowd.add_argument("--seed", type=int, default=1, help="the crowd is the same for the same seed")
    crowd.add_argument(
        "--sku",
        help="drive this SKU of the server as configured (stock, limit, hold, opening time, registration); needs --url",
    )
    crowd.add_argument("--buyers-file", help="buyer ids, one per line or first CSV column (e.g. the registered ones)")
    load = parser.add_argument_group("the load")
    load.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    load.add_argument("--connections", type=int, default=16, help="connections in all (default 16)")
    load.add_argument("--batch", type=int, default=100, help="requests per frame / pipeline (default 100)")
    load.add_argument("--inflight", type=int, help="requests in flight per soldout connection (default: 2 batches)")
    load.add_argument("--rate", type=float, help="open loop: target requests/s in all (default: closed loop)")
    load.add_argument("--duration", type=float, help="stop sending new buyers after this many seconds")
    load.add_argument("--repeat", type=int, default=1, help="run everything N times and print each figure's spread")
    cluster = parser.add_argument_group("a cluster (3 NATS servers and soldout nodes on this machine)")
    cluster.add_argument(
        "--cluster", type=int, metavar="N", help="start 3 NATS servers and N soldout nodes for the run"
    )
    cluster.add_argument(
        "--split-roles",
        action="store_true",
        help="the crowd only to the nodes not owning its SKU's shard: gateway and owner CPU apart",
    )
    cluster.add_argument(
        "--kill-owner-after",
        type=float,
        metavar="SECONDS",
        help="kill -9 the node owning the hot SKU's shard this long after the start; report the failover",
    )
    cluster.add_argument(
        "--lease-seconds",
        type=float,
        default=DEFAULT_LEASE_SECONDS,
        help=f"the nodes' shard lease (default {DEFAULT_LEASE_SECONDS:g})",
    )
    peer = parser.add_argument_group("the peers")
    peer.add_argument(
        "--peer",
        action="append",
        choices=PEERS,
        help="run the same crowd against Redis + Lua, or the echo server, too (may be given twice)",
    )
    peer.add_argument("--redis-url", help="a running Redis 7 (default: start a redis-server for the run)")
    wire = parser.add_argument_group("the wire cases (soldout bench wire)")
    wire.add_argument("--cases", help=f"comma-separated wire cases (all: {','.join(WIRE_CASES)})")
    wire.add_argument("--quick", action="store_true", help="small sizes and a short soak: a smoke run")
    wire.add_argument("--open-rate", type=float, help="requests/s offered in the open-loop case (100,000; quick 5,000)")
    wire.add_argument("--open-batch", type=int, help="requests per frame in the open-loop case (50; quick 10)")
    wire.add_argument("--soak", type=float, help="soak seconds (300; quick 5)")
    wire.add_argument("--soak-rate", type=float, help="requests/s offered in the soak (default: half durable-100's)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", metavar="PATH", help="write the report as JSON")
    output.add_argument("--plot", metavar="PATH", help="draw a PNG chart (needs matplotlib)")
    output.add_argument("--quiet", action="store_true", help="no live progress line")
    return parser


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "embedded":
        from bench.embedded import main as embedded_main

        return embedded_main(argv[1:])
    parser = build_parser()
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    try:
        problem = _argument_problem(arguments)
        if problem:
            print(f"soldout bench: {problem}", file=sys.stderr)
            return 2
        if arguments.scenario == "wire":
            return run_wire(arguments)
        return run(arguments)
    except BenchError as error:
        print(f"soldout bench: {error}", file=sys.stderr)
        return 1


def _peers(arguments: argparse.Namespace) -> list[str]:
    return list(dict.fromkeys(arguments.peer or ()))


def _argument_problem(arguments: argparse.Namespace) -> str | None:
    wire = arguments.scenario == "wire"
    if wire:
        if arguments.url or arguments.sku or arguments.peer:
            return "wire starts its own servers (echo, memory, durable): leave out --url, --sku and --peer"
        if arguments.cases:
            try:
                wire_cases([name.strip() for name in arguments.cases.split(",") if name.strip()], 1)
            except ValueError as error:
                return str(error)
    cluster = _cluster_problem(arguments)
    if cluster is not None:
        return cluster
    if not wire and arguments.cluster is None and not arguments.url and not arguments.spawn:
        return "give --url ws://HOST:PORT/v1 (a running server), --spawn (start one), or --cluster N"
    if arguments.url and arguments.spawn:
        return "--url and --spawn exclude each other"
    if arguments.redis_url and "redis" not in _peers(arguments):
        return "--redis-url needs --peer redis"
    if "echo" in _peers(arguments) and not arguments.spawn:
        return "--peer echo starts an echo server beside a spawned one: give --spawn"
    for name in ("procs", "connections", "batch", "inflight", "buyers", "skus", "shards", "repeat", "open_batch"):
        value = getattr(arguments, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    for name in ("rate", "duration", "open_rate", "soak", "soak_rate"):
        value = getattr(arguments, name)
        if value is not None and value <= 0:
            return f"--{name.replace('_', '-')} must be above 0"
    if arguments.sku is not None:
        if not arguments.url:
            return "--sku drives a SKU of a running server: give --url (and --admin-token to read it)"
        given = [flag for flag in ("peer", "skus", "stock", "hold_seconds") if getattr(arguments, flag) is not None]
        if given:
            flags = ", ".join("--" + flag.replace("_", "-") for flag in given)
            return f"--sku takes the SKU's settings from the server: leave out {flags}"
        if arguments.scenario == "catalog":
            return "--sku drives one SKU: use the flash or checkout scenario"
    if arguments.buyers_file is not None and not os.path.isfile(arguments.buyers_file):
        return f"--buyers-file {arguments.buyers_file} does not exist"
    return None


def _cluster_problem(arguments: argparse.Namespace) -> str | None:
    if arguments.cluster is None:
        given = [
            flag
            for flag, value in (
                ("--split-roles", arguments.split_roles),
                ("--kill-owner-after", arguments.kill_owner_after),
            )
            if value
        ]
        return f"{', '.join(given)} needs --cluster N" if given else None
    if arguments.cluster < 1:
        return "--cluster must be at least 1"
    if arguments.split_roles and arguments.cluster < 2:
        return "--split-roles sends the crowd to the nodes not owning its shard: --cluster 2 or more"
    if arguments.scenario != "flash":
        return "--cluster runs the flash scenario"
    clashing = [
        flag for flag in ("url", "spawn", "peer", "sku", "durable", "memory", "buyers_file") if getattr(arguments, flag)
    ]
    if clashing:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in clashing)
        return f"--cluster starts its own NATS servers and nodes (journals in JetStream): leave out {flags}"
    if arguments.kill_owner_after is not None:
        if arguments.kill_owner_after <= 0:
            return "--kill-owner-after must be above 0"
        if arguments.cluster < 2:
            return "--kill-owner-after needs a second owner to take over: --cluster 2 or more"
        if arguments.repeat > 1:
            return "--kill-owner-after kills a node once: leave out --repeat"
    if not 0 < arguments.lease_seconds <= 600:
        return "--lease-seconds must be above 0 and at most 600"
    return None


def _check_peer_available(arguments: argparse.Namespace) -> None:
    """Say at once, before the soldout run, that the peer cannot run."""
    from bench.redis_peer import REDIS_MISSING, find_redis_server

    if "redis" in _peers(arguments) and not arguments.redis_url and find_redis_server() is None:
        raise BenchError(REDIS_MISSING)


# ---------------------------------------------------------------- flash, catalog, checkout


def run(arguments: argparse.Namespace) -> int:
    _check_peer_available(arguments)
    file_buyers = len(read_buyer_file(arguments.buyers_file)) if arguments.buyers_file else None
    buyers = arguments.buyers if arguments.buyers is not None else file_buyers
    if file_buyers is not None and buyers is not None and buyers > file_buyers:
        raise BenchError(f"--buyers {buyers:,} is more than the {file_buyers:,} buyers of {arguments.buyers_file}")
    scenario, opens_at = _scenario(arguments, buyers, secrets.token_hex(3))
    _check_holds_outlive_the_crowd(scenario, arguments)
    procs = min(arguments.procs, arguments.connections)
    inflight = arguments.inflight or INFLIGHT_BATCHES * arguments.batch
    storage = "durable" if arguments.durable else "memory"
    if arguments.cluster is not None:
        storage = _cluster_label(arguments)
    peers = _peers(arguments)
    settings = {
        "scenario": scenario.name,
        "skus": len(scenario.skus),
        "stock_per_sku": scenario.skus[0].stock,
        "buyers": scenario.buyers,
        "hold_seconds": scenario.skus[0].hold_seconds,
        "seed": scenario.seed,
        "procs": procs,
        "connections": arguments.connections,
        "batch": arguments.batch,
        "inflight_per_connection": inflight,
        "rate": arguments.rate,
        "duration_seconds": arguments.duration,
        "storage": storage if arguments.spawn or arguments.cluster else None,
        "peer": peers[0] if len(peers) == 1 else peers or None,
        "repeat": arguments.repeat,
    }
    if arguments.cluster is not None:
        settings["cluster"] = {
            "owners": arguments.cluster,
            "split_roles": arguments.split_roles,
            "shards": arguments.shards or DEFAULT_SHARDS,
            "lease_seconds": arguments.lease_seconds,
            "kill_owner_after_seconds": arguments.kill_owner_after,
        }
    if scenario.holds_end:
        settings["confirm_share"] = scenario.confirm_share
        settings["cancel_share"] = scenario.cancel_share
    description = describe(scenario, settings)
    print(description, flush=True)
    load = Load(
        procs=procs,
        connections=arguments.connections,
        batch=arguments.batch,
        inflight=inflight,
        rate=arguments.rate,
        duration_seconds=arguments.duration,
        show_progress=not arguments.quiet,
        start_at_epoch=opens_at,
    )
    cancel = bool(arguments.url) and not arguments.keep_holds
    rounds: list[list[RunReport]] = []
    with contextlib.ExitStack() as servers:
        if arguments.cluster is not None:
            print(f"starting 3 NATS servers and {_cluster_label(arguments)}", flush=True)
            cluster = servers.enter_context(
                spawned_cluster(
                    arguments.cluster,
                    shards=arguments.shards or DEFAULT_SHARDS,
                    lease_seconds=arguments.lease_seconds,
                )
            )
            for round_number in range(arguments.repeat):
                if round_number:
                    scenario, _ = _scenario(arguments, buyers, secrets.token_hex(3))
                if arguments.repeat > 1:
                    print(f"round {round_number + 1} of {arguments.repeat}", flush=True)
                rounds.append([run_cluster(cluster, scenario, load, f"soldout {storage}", _cluster_run(arguments))])
            print("stopping the nodes and the NATS servers", flush=True)
        else:
            rounds = _single_server_rounds(arguments, servers, scenario, load, buyers, storage, peers, cancel)
    return finish(arguments, settings, description, rounds)


def _cluster_label(arguments: argparse.Namespace) -> str:
    nodes = f"{arguments.cluster} node" + ("s" if arguments.cluster > 1 else "")
    if arguments.split_roles:
        return f"cluster, {nodes}, roles split"
    return f"cluster, {nodes}"


def _cluster_run(arguments: argparse.Namespace) -> ClusterRun:
    return ClusterRun(kill_owner_after=arguments.kill_owner_after, split_roles=arguments.split_roles)


def _single_server_rounds(
    arguments: argparse.Namespace,
    servers: contextlib.ExitStack,
    scenario: Scenario,
    load: Load,
    buyers: int | None,
    storage: str,
    peers: list[str],
    cancel: bool,
) -> list[list[RunReport]]:
    rounds: list[list[RunReport]] = []
    soldout = servers.enter_context(_soldout_server(arguments))
    echo = servers.enter_context(spawned_echo()) if "echo" in peers else None
    redis_url, own_redis = servers.enter_context(_redis_server(arguments)) if "redis" in peers else (None, False)
    for round_number in range(arguments.repeat):
        if round_number:
            # A fresh crowd on fresh SKUs, so no round meets another's holds.
            scenario, opens_at = _scenario(arguments, buyers, secrets.token_hex(3))
            load = replace(load, start_at_epoch=opens_at)
        if arguments.repeat > 1:
            print(f"round {round_number + 1} of {arguments.repeat}", flush=True)
        label = f"soldout {storage}" if arguments.spawn else "soldout"
        reports = [run_soldout(soldout, scenario, load, label, cancel_holds=cancel)]
        for peer in peers:
            if peer == "echo":
                assert echo is not None
                reports.append(run_echo(echo, scenario, load, "echo"))
            else:
                assert redis_url is not None
                redis_label = "redis" if not own_redis else f"redis {storage}"
                reports.append(run_redis(redis_url, scenario, load, redis_label, delete_keys=not own_redis))
        rounds.append(reports)
    return rounds


def finish(arguments: argparse.Namespace, settings: dict[str, Any], title: str, rounds: list[list[RunReport]]) -> int:
    """Print the figures, ratios and checks of every round; write the JSON and the chart."""
    runs = [report for reports in rounds for report in reports]
    print()
    print(runs_table(runs))
    for report in rounds[-1]:
        summary = report.summary()
        print(f"{report.label}: {statuses_line(summary)}")
        retries = retries_line(summary)
        if retries is not None:
            print(f"{report.label}: {retries}")
        print(f"{report.label}: {load_line(summary)}")
        print(f"{report.label}: {cpu_line(summary)}")
        lines = [cluster_line(summary), role_cpu_line(summary), journal_line(summary), *failover_lines(summary)]
        for line in filter(None, lines):
            print(f"{report.label}: {line}")
        memory = rss_line(summary)
        if memory is not None and report.target == "soldout":
            print(f"{report.label}: {memory}")
        if summary["buyers_not_sent"]:
            print(f"{report.label}: {summary['buyers_not_sent']:,} buyers never sent: the duration cap came first")
        for note in report.notes:
            print(f"{report.label}: {note}")
    for reports in rounds[-1:]:
        for peer in reports[1:]:
            print(ratio_line(reports[0], peer))
    if len(rounds) > 1:
        print()
        print(f"over {len(rounds)} rounds:")
        print(spread_table(runs))
        for index in range(1, len(rounds[0])):
            line = ratio_spread_line([(reports[0], reports[index]) for reports in rounds])
            if line:
                print(line)
    return write_and_check(arguments, settings, title, rounds)


def write_and_check(
    arguments: argparse.Namespace, settings: dict[str, Any], title: str, rounds: list[list[RunReport]]
) -> int:
    """Write the JSON report and the chart when asked; print every run's checks and its
    summary; 1 when any check failed."""
    runs = [report for reports in rounds for report in reports]
    if arguments.json:
        Path(arguments.json).write_text(json_report(settings, runs) + "\n")
        print(f"report written to {arguments.json}")
    if arguments.plot:
        try:
            plot(rounds[0], arguments.plot, title)
            print(f"chart written to {arguments.plot}")
        except PlotUnavailable as error:
            print(f"soldout bench: {error}", file=sys.stderr)
    failed = 0
    for report in runs:
        problems = failures(report.checks) + report.merged.errors
        failed += len(problems)
        for problem in problems:
            print(f"{report.label}: CHECK FAILED: {problem}", file=sys.stderr)
        if not problems:
            names = ", ".join(check.name for check in report.checks)
            print(f"{report.label}: all {len(report.checks)} checks passed ({names})")
    print()
    for report in runs:
        print(human_summary(report))
    checks = sum(len(report.checks) for report in runs)
    if failed:
        print(f"correctness checks FAILED: {failed} problems in {checks} checks over {_runs(len(runs))}")
        return 1
    print(f"correctness checks passed: {checks} checks over {_runs(len(runs))}")
    return 0


def _scenario(arguments: argparse.Namespace, buyers: int | None, tag: str) -> tuple[Scenario, float | None]:
    try:
        if arguments.sku is not None:
            return configured_sale(arguments, buyers, tag)
        scenario = build_scenario(
            arguments.scenario,
            buyers=buyers,
            stock=arguments.stock,
            skus=arguments.skus,
            seed=arguments.seed,
            hold_seconds=_checkout_hold_seconds(arguments, buyers),
            confirm_share=arguments.confirm_share,
            cancel_share=arguments.cancel_share,
            sku_tag=tag,
        )
    except ValueError as error:
        raise BenchError(str(error)) from None
    if arguments.buyers_file:
        scenario = replace(scenario, buyers_file=arguments.buyers_file)
    return scenario, None


def configured_sale(arguments: argparse.Namespace, buyers: int | None, tag: str) -> tuple[Scenario, float | None]:
    """The scenario of a SKU the server has, as configured; and when its sale opens."""
    import trio

    from bench.targets import soldout_admin

    sku = arguments.sku

    async def get_sku(client: Any) -> Any:
        return await client.get_sku(sku)

    reply = admin_call(trio.run, soldout_admin, arguments.url, arguments.admin_token or arguments.token, get_sku)
    if reply.status == "unknown_sku":
        raise BenchError(f"the server has no SKU {sku!r}: put it first (soldout admin ... put-sku {sku} --stock N)")
    if reply.status != "ok":
        raise BenchError(f"get_sku {sku} was answered {reply.status}: {reply.error or ''} (an admin token?)")
    if reply.registration_required and not arguments.buyers_file:
        raise BenchError(f"{sku} takes registered buyers only: give them with --buyers-file")
    if reply.closes_at is not None and reply.closes_at <= time.time():
        raise BenchError(f"the sale of {sku} has closed (closes_at {reply.closes_at})")
    plan = SkuPlan(sku, reply.available, reply.per_buyer_limit, float(reply.hold_seconds))
    scenario = configured_scenario(
        arguments.scenario,
        plan,
        buyers=buyers or DEFAULT_BUYERS,
        seed=arguments.seed,
        buyers_file=arguments.buyers_file,
        key_prefix=f"bench-{tag}-",
        confirm_share=arguments.confirm_share,
        cancel_share=arguments.cancel_share,
    )
    return scenario, reply.opens_at


def _crowd_send_seconds(buyers: int, arguments: argparse.Namespace) -> float:
    rate = arguments.rate or CLOSED_LOOP_REQUESTS_PER_SECOND_ESTIMATE
    return buyers / rate


def _checkout_hold_seconds(arguments: argparse.Namespace, buyers: int | None) -> float | None:
    """Checkout's default hold outlives the crowd's sending: a hold that ran out before its
    winner's confirm was sent would make a checkout in which every hold expires."""
    if arguments.scenario != "checkout" or arguments.hold_seconds is not None:
        return arguments.hold_seconds
    sending = _crowd_send_seconds(buyers or DEFAULT_BUYERS, arguments)
    return max(DEFAULT_HOLD_SECONDS["checkout"], math.ceil(2 * sending))


def _check_holds_outlive_the_crowd(scenario: Scenario, arguments: argparse.Namespace) -> None:
    if not scenario.holds_end:
        return
    sending = _crowd_send_seconds(scenario.buyers, arguments)
    hold_seconds = min(plan.hold_seconds for plan in scenario.skus)
    if hold_seconds <= sending:
        pace = f"{arguments.rate:,.0f} requests/s" if arguments.rate else "a closed loop's pace"
        raise BenchError(
            f"checkout: holds last {hold_seconds:g} s, but the crowd of {scenario.buyers:,} takes about "
            f"{sending:.1f} s to send at {pace}: holds would expire before their winners confirm. "
            f"Give --hold-seconds above {math.ceil(sending)}, fewer --buyers or a higher --rate."
        )


def describe(scenario: Scenario, settings: dict[str, Any]) -> str:
    """The scenario's settings in one line: printed first, and the chart's title."""
    loop = f"open loop at {settings['rate']:,.0f} requests/s" if settings["rate"] else "closed loop"
    cap = f", capped at {settings['duration_seconds']:g} s" if settings["duration_seconds"] else ""
    skus = f"{len(scenario.skus):,} SKU" + ("s" if len(scenario.skus) > 1 else "")
    storage = f"; {settings['storage']}" if settings.get("storage") else ""
    text = (
        f"{scenario.name}: {skus} x {scenario.skus[0].stock:,} units, "
        f"{scenario.buyers:,} buyers (seed {scenario.seed}); "
        f"{settings['procs']} procs, {settings['connections']} connections, batches of {settings['batch']}, "
        f"{settings['inflight_per_connection']} in flight per connection, {loop}{cap}{storage}"
    )
    if scenario.holds_end:
        expire = 1 - scenario.confirm_share - scenario.cancel_share
        text += (
            f"; winners confirm {scenario.confirm_share:.0%}, cancel {scenario.cancel_share:.0%}, "
            f"let expire {expire:.0%} (hold {scenario.skus[0].hold_seconds:g} s)"
        )
    return text


# ---------------------------------------------------------------- the servers of a run


@contextlib.contextmanager
def _soldout_server(arguments: argparse.Namespace) -> Iterator[Server]:
    if arguments.url:
        yield Server(arguments.url, arguments.token, arguments.admin_token or arguments.token)
        return
    with spawned_soldout(durable=arguments.durable, shards=arguments.shards, module=arguments.server_module) as spawned:
        yield spawned


@contextlib.contextmanager
def _redis_server(arguments: argparse.Namespace) -> Iterator[tuple[str, bool]]:
    """(url, whether the bench started it)."""
    from bench.redis_peer import RedisPeerError, running_redis_server

    if arguments.redis_url:
        yield arguments.redis_url, False
        return
    try:
        with running_redis_server(durable=arguments.durable) as url:
            yield url, True
    except RedisPeerError as error:
        raise BenchError(str(error)) from None


# ---------------------------------------------------------------- the wire cases


@dataclass(frozen=True)
class WireSettings:
    buyers: int
    stock: int
    duration_seconds: float | None
    open_rate: float
    open_batch: int
    open_seconds: float
    soak_seconds: float
    soak_rate: float | None


def wire_settings(arguments: argparse.Namespace) -> WireSettings:
    quick = arguments.quick

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    return WireSettings(
        buyers=pick(arguments.buyers, DEFAULT_BUYERS, 3_000),
        stock=pick(arguments.stock, 10_000, 1_000),
        duration_seconds=arguments.duration,
        open_rate=pick(arguments.open_rate, 100_000.0, 5_000.0),
        open_batch=pick(arguments.open_batch, 50, 10),
        open_seconds=pick(arguments.duration, 10.0, 1.0),
        soak_seconds=pick(arguments.soak, 300.0, 5.0),
        soak_rate=arguments.soak_rate,
    )


def run_wire(arguments: argparse.Namespace) -> int:
    """The wire cases, each a flash crowd driven by the one harness against its target."""
    wire = wire_settings(arguments)
    names = [name.strip() for name in (arguments.cases or ",".join(WIRE_CASES)).split(",") if name.strip()]
    cases = wire_cases(names, wire.open_batch)
    procs = min(arguments.procs, arguments.connections)
    settings: dict[str, Any] = {
        "scenario": "wire",
        "cases": [case.name for case in cases],
        "buyers": wire.buyers,
        "stock_per_sku": wire.stock,
        "procs": procs,
        "connections": arguments.connections,
        "open_rate": wire.open_rate,
        "open_batch": wire.open_batch,
        "soak_seconds": wire.soak_seconds,
        "repeat": arguments.repeat,
    }
    title = (
        f"wire: {', '.join(settings['cases'])}; {wire.buyers:,} buyers on one SKU of {wire.stock:,} per closed-loop "
        f"case; {procs} procs, {arguments.connections} connections"
    )
    if any(case.open_loop and not case.soak for case in cases):
        title += f"; open loop {wire.open_rate:,.0f}/s offered at {wire.open_batch}/frame for {wire.open_seconds:g} s"
    if any(case.soak for case in cases):
        title += f"; soak {wire.soak_seconds:g} s"
    print(f"{title}; {os.cpu_count()} cores, load average {_load_average()}", flush=True)
    rounds: list[list[RunReport]] = []
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}

        def server_for(case: WireCase) -> Server:
            key = "echo" if case.target == "echo" else case.storage
            if key not in servers:
                if key == "echo":
                    servers[key] = stack.enter_context(spawned_echo())
                else:
                    spawn = spawned_soldout(
                        durable=key == "durable", shards=arguments.shards, module=arguments.server_module
                    )
                    servers[key] = stack.enter_context(spawn)
            return servers[key]

        for round_number in range(arguments.repeat):
            reports: list[RunReport] = []
            for case in cases:
                report = run_wire_case(case, server_for(case), wire, reports, arguments, procs)
                reports.append(report)
                summary = report.summary()
                print(
                    f"  {case.name}: {summary['throughput_per_second']:,.0f} requests/s, "
                    f"p99 {summary['latency_ms']['p99']:,.2f} ms; {cpu_line(summary)}",
                    flush=True,
                )
            rounds.append(reports)
            if arguments.repeat > 1:
                print(f"round {round_number + 1} of {arguments.repeat} done", flush=True)
    code = finish_wire(arguments, settings, title, rounds)
    print(f"load average at the end {_load_average()}")
    return code


def run_wire_case(
    case: WireCase,
    server: Server,
    wire: WireSettings,
    earlier: Sequence[RunReport],
    arguments: argparse.Namespace,
    procs: int,
) -> RunReport:
    buyers, rate, duration, batch = wire.buyers, None, wire.duration_seconds, case.batch
    if case.open_loop:
        rate = wire.open_rate
        duration = wire.open_seconds
        if case.soak:
            rate = wire.soak_rate or _half_peak(earlier)
            duration = wire.soak_seconds
        buyers = max(1, math.ceil(rate * duration))
    scenario = build_scenario(
        "flash", buyers=buyers, stock=wire.stock, seed=arguments.seed, sku_tag=secrets.token_hex(3)
    )
    load = Load(
        procs=procs,
        connections=arguments.connections,
        batch=batch,
        inflight=arguments.inflight or INFLIGHT_BATCHES * batch,
        rate=rate,
        duration_seconds=duration,
        show_progress=not arguments.quiet,
    )
    pace = f", {rate:,.0f}/s offered for {duration:g} s" if rate else ""
    label = case.label + pace
    if case.target == "echo":
        return run_echo(server, scenario, load, label)
    return run_soldout(server, scenario, load, label, cancel_holds=False)


def _half_peak(earlier: Sequence[RunReport]) -> float:
    peaks = [
        report.summary()["throughput_per_second"]
        for report in earlier
        if report.label.startswith("soldout durable, 100/frame, closed")
    ]
    if not peaks:
        peaks = [report.summary()["throughput_per_second"] for report in earlier if report.target == "soldout"]
    return max(1.0, max(peaks or [20_000.0]) / 2)


def finish_wire(
    arguments: argparse.Namespace, settings: dict[str, Any], title: str, rounds: list[list[RunReport]]
) -> int:
    runs = [report for reports in rounds for report in reports]
    print()
    print(runs_table(runs))
    for report in rounds[-1]:
        summary = report.summary()
        memory = rss_line(summary)
        if memory is not None and report.label.startswith("soldout durable, 100/frame, soak"):
            print(f"{report.label}: {memory}")
    # Closed loop: soldout's rate as a share of echo's at the same requests per frame.
    for reports in rounds[-1:]:
        echoes = {report.batch: report for report in reports if report.target == "echo"}
        for report in reports:
            echo = echoes.get(report.batch)
            if report.target == "soldout" and echo is not None and "closed loop" in report.label:
                print(ratio_line(report, echo))
    if len(rounds) > 1:
        print()
        print(f"over {len(rounds)} rounds:")
        print(spread_table(runs))
    return write_and_check(arguments, settings, title, rounds)


def _runs(count: int) -> str:
    return "1 run" if count == 1 else f"{count:,} runs"


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
