"""`soldout bench`: a flash crowd against a soldout server, measured and checked, and
optionally the same crowd against Redis + Lua, side by side.

    soldout bench --spawn                          # start a memory-only server, run `flash`
    soldout bench catalog --spawn --durable
    soldout bench --url ws://127.0.0.1:8765/v1 --token front-secret --admin-token admin-secret
    soldout bench --spawn --durable --peer redis   # starts a redis-server too (appendfsync always)
    soldout bench --url ws://HOST:8765/v1 --token T --admin-token A --sku FLASH-2 --buyers-file registered.csv

The bench puts its own SKUs (names unique to the run, through the admin op put_sku), or
with `--sku` drives a SKU the server already has, as its operator configured it (stock,
limit, hold time, registration; the crowd starts at its opening time),
starts `--procs` driver processes that share `--connections` connections, gives them a
common start time, shows a live progress line, and at the end prints a table, checks
the outcome through the server's own `stock` and `stats`, and exits non-zero when a
check fails, naming what broke.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.driver import PROGRESS_FIELDS, DriverResult, DriverSettings, process_main
from bench.report import (
    PlotUnavailable,
    RunReport,
    cpu_line,
    human_summary,
    json_report,
    merge,
    plot,
    ratio_line,
    runs_table,
    statuses_line,
)
from bench.scenarios import (
    DEFAULT_BUYERS,
    DEFAULT_HOLD_SECONDS,
    SCENARIOS,
    Scenario,
    SkuPlan,
    build_scenario,
    configured_scenario,
    read_buyer_file,
    split,
    split_weighted,
)
from bench.verify import Check, Counts, check_run, failures

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_SECONDS_MAX = 60.0
SERVER_STOP_SECONDS_MAX = 60.0
DRIVERS_READY_SECONDS_MAX = 120.0
# The drivers start together this long after the last one is ready.
START_DELAY_SECONDS = 0.05
# Checkout waits this much past the last possible expiry before reading the counts.
EXPIRY_MARGIN_SECONDS = 0.3
PROGRESS_REFRESH_SECONDS = 0.25
# Without a terminal, the progress goes to the log this often.
PROGRESS_LOG_SECONDS = 5.0
# Default requests in flight per connection, in batches: one being decided, one on the way.
INFLIGHT_BATCHES = 2
# A closed loop's pace, for judging up front whether checkout's holds outlive the crowd:
# a low figure for soldout on a 2-core machine, so the judgement errs on the safe side.
CLOSED_LOOP_REQUESTS_PER_SECOND_ESTIMATE = 20_000


class BenchError(Exception):
    """The bench cannot go on; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soldout bench",
        description="Drive a flash crowd against soldout (and optionally Redis + Lua), measure it, check it.",
    )
    parser.add_argument("scenario", nargs="?", choices=SCENARIOS, default="flash", help="default: flash")
    server = parser.add_argument_group("the soldout server")
    server.add_argument("--url", help="a running server, ws://HOST:PORT/v1")
    server.add_argument("--token", help="a frontend (or admin) token for the crowd")
    server.add_argument("--admin-token", help="an admin token to put the SKUs and read stats (default: --token)")
    server.add_argument("--spawn", action="store_true", help="start a server for the run and stop it after")
    storage = server.add_mutually_exclusive_group()
    storage.add_argument("--durable", action="store_true", help="spawned servers journal and fsync (and Redis too)")
    storage.add_argument("--memory", action="store_true", help="spawned servers keep nothing on disk (the default)")
    server.add_argument("--shards", type=int, help="shards of a spawned server (default: the server's)")
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
    load.add_argument("--inflight", type=int, help="requests in flight per connection (default: 2 batches)")
    load.add_argument("--rate", type=float, help="open loop: target requests/s in all (default: closed loop)")
    load.add_argument("--duration", type=float, help="stop sending new buyers after this many seconds")
    peer = parser.add_argument_group("the peer")
    peer.add_argument("--peer", choices=("redis",), help="run the same crowd against Redis + Lua too")
    peer.add_argument("--redis-url", help="a running Redis 7 (default: start a redis-server for the run)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", metavar="PATH", help="write the report as JSON")
    output.add_argument("--plot", metavar="PATH", help="draw a PNG chart (needs matplotlib)")
    output.add_argument("--quiet", action="store_true", help="no live progress line")
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    try:
        arguments = parser.parse_args(list(argv))
    except SystemExit as exit:
        return int(exit.code or 0)
    try:
        problem = _argument_problem(arguments)
        if problem:
            print(f"soldout bench: {problem}", file=sys.stderr)
            return 2
        return run(arguments)
    except BenchError as error:
        print(f"soldout bench: {error}", file=sys.stderr)
        return 1


def _argument_problem(arguments: argparse.Namespace) -> str | None:
    if not arguments.url and not arguments.spawn:
        return "give --url ws://HOST:PORT/v1 (a running server) or --spawn (start one for the run)"
    if arguments.url and arguments.spawn:
        return "--url and --spawn exclude each other"
    if arguments.redis_url and arguments.peer != "redis":
        return "--redis-url needs --peer redis"
    for name in ("procs", "connections", "batch", "inflight", "buyers", "skus", "shards"):
        value = getattr(arguments, name)
        if value is not None and value < 1:
            return f"--{name} must be at least 1"
    if arguments.rate is not None and arguments.rate <= 0:
        return "--rate must be above 0"
    if arguments.duration is not None and arguments.duration <= 0:
        return "--duration must be above 0"
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


def _check_peer_available(arguments: argparse.Namespace) -> None:
    """Say at once, before the soldout run, that the peer cannot run."""
    from bench.redis_peer import REDIS_MISSING, find_redis_server

    if arguments.peer == "redis" and not arguments.redis_url and find_redis_server() is None:
        raise BenchError(REDIS_MISSING)


def run(arguments: argparse.Namespace) -> int:
    _check_peer_available(arguments)
    tag = secrets.token_hex(3)
    opens_at = None
    file_buyers = len(read_buyer_file(arguments.buyers_file)) if arguments.buyers_file else None
    buyers = arguments.buyers if arguments.buyers is not None else file_buyers
    if file_buyers is not None and buyers is not None and buyers > file_buyers:
        raise BenchError(f"--buyers {buyers:,} is more than the {file_buyers:,} buyers of {arguments.buyers_file}")
    try:
        if arguments.sku is not None:
            scenario, opens_at = configured_sale(arguments, buyers, tag)
        else:
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
            if arguments.buyers_file:
                scenario = replace(scenario, buyers_file=arguments.buyers_file)
    except ValueError as error:
        raise BenchError(str(error)) from None
    _check_holds_outlive_the_crowd(scenario, arguments)
    demand = scenario.plan().demand()
    procs = min(arguments.procs, arguments.connections)
    inflight = arguments.inflight or INFLIGHT_BATCHES * arguments.batch
    storage = "durable" if arguments.durable else "memory"
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
        "storage": storage if arguments.spawn else None,
        "peer": arguments.peer,
    }
    if scenario.holds_end:
        settings["confirm_share"] = scenario.confirm_share
        settings["cancel_share"] = scenario.cancel_share
    print(_describe(scenario, settings), flush=True)
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
    runs = []
    with _soldout_server(arguments) as server:
        label = f"soldout {storage}" if arguments.spawn else "soldout"
        runs.append(run_soldout(server, scenario, demand, load, label))
    if arguments.peer == "redis":
        with _redis_server(arguments) as (url, own):
            label = "redis" if not own else f"redis {storage}"
            runs.append(run_redis(url, scenario, demand, load, label, tag, delete_keys=not own))
    print()
    print(runs_table(runs))
    for report in runs:
        summary = report.summary()
        print(f"{report.label}: {statuses_line(summary)}")
        print(f"{report.label}: {cpu_line(summary)}")
        if summary["buyers_not_sent"]:
            print(f"{report.label}: {summary['buyers_not_sent']:,} buyers never sent: the duration cap came first")
        for note in report.notes:
            print(f"{report.label}: {note}")
    if len(runs) == 2:
        print(ratio_line(runs[0], runs[1]))
    if arguments.json:
        Path(arguments.json).write_text(json_report(settings, runs) + "\n")
        print(f"report written to {arguments.json}")
    if arguments.plot:
        try:
            plot(runs, arguments.plot)
            print(f"chart written to {arguments.plot}")
        except PlotUnavailable as error:
            print(f"soldout bench: {error}", file=sys.stderr)
    broken = False
    for report in runs:
        problems = failures(report.checks) + report.merged.errors
        if problems:
            broken = True
            for problem in problems:
                print(f"{report.label}: CHECK FAILED: {problem}", file=sys.stderr)
        else:
            names = ", ".join(check.name for check in report.checks)
            print(f"{report.label}: all {len(report.checks)} checks passed ({names})")
    print()
    for report in runs:
        print(human_summary(report))
    return 1 if broken else 0


def configured_sale(arguments: argparse.Namespace, buyers: int | None, tag: str) -> tuple[Scenario, float | None]:
    """The scenario of a SKU the server has, as configured; and when its sale opens."""
    import trio

    sku = arguments.sku
    admin_token = arguments.admin_token or arguments.token
    (reply,) = trio.run(soldout_exchange, arguments.url, admin_token, [{"id": 1, "op": "get_sku", "sku": sku}])
    if reply["status"] == "unknown_sku":
        raise BenchError(f"the server has no SKU {sku!r}: put it first (soldout admin ... put-sku {sku} --stock N)")
    if reply["status"] != "ok":
        raise BenchError(f"get_sku {sku} was answered {reply['status']}: {reply.get('error', '')} (an admin token?)")
    if reply["registration_required"] and not arguments.buyers_file:
        raise BenchError(f"{sku} takes registered buyers only: give them with --buyers-file")
    if reply["closes_at"] is not None and reply["closes_at"] <= time.time():
        raise BenchError(f"the sale of {sku} has closed (closes_at {reply['closes_at']})")
    plan = SkuPlan(sku, reply["available"], reply["per_buyer_limit"], float(reply["hold_seconds"]))
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
    return scenario, reply["opens_at"]


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


def _describe(scenario: Scenario, settings: dict[str, Any]) -> str:
    loop = f"open loop at {settings['rate']:,.0f} requests/s" if settings["rate"] else "closed loop"
    cap = f", capped at {settings['duration_seconds']:g} s" if settings["duration_seconds"] else ""
    skus = f"{len(scenario.skus):,} SKU" + ("s" if len(scenario.skus) > 1 else "")
    text = (
        f"{scenario.name}: {skus} x {scenario.skus[0].stock:,} units, "
        f"{scenario.buyers:,} buyers (seed {scenario.seed}); "
        f"{settings['procs']} procs, {settings['connections']} connections, batches of {settings['batch']}, "
        f"{settings['inflight_per_connection']} in flight per connection, {loop}{cap}"
    )
    if scenario.holds_end:
        expire = 1 - scenario.confirm_share - scenario.cancel_share
        text += (
            f"; winners confirm {scenario.confirm_share:.0%}, cancel {scenario.cancel_share:.0%}, "
            f"let expire {expire:.0%} (hold {scenario.skus[0].hold_seconds:g} s)"
        )
    return text


# ---------------------------------------------------------------- the driver processes


class Load:
    """How the crowd is driven: the same for soldout and for the peer."""

    def __init__(
        self,
        *,
        procs: int,
        connections: int,
        batch: int,
        inflight: int,
        rate: float | None,
        duration_seconds: float | None,
        show_progress: bool,
        start_at_epoch: float | None = None,
    ) -> None:
        self.procs = procs
        self.connections = connections
        self.batch = batch
        self.inflight = inflight
        self.rate = rate
        self.duration_seconds = duration_seconds
        self.show_progress = show_progress
        # The crowd starts then (a configured sale's opening time), or right away.
        self.start_at_epoch = start_at_epoch

    def settings(self, scenario: Scenario, template: DriverSettings) -> list[DriverSettings]:
        """One DriverSettings per process: its connections, and its buyers in proportion."""
        connection_counts = [len(share) for share in split(range(self.connections), self.procs)]
        buyer_shares = split_weighted(range(scenario.buyers), connection_counts)
        rate = self.rate / self.connections if self.rate else None
        offsets = [sum(connection_counts[:index]) for index in range(len(connection_counts))]
        return [
            replace(
                template,
                index=index,
                buyers=buyers,
                connections=connections,
                batch=self.batch,
                inflight=self.inflight,
                rate_per_connection=rate,
                duration_seconds=self.duration_seconds,
                connection_offset=offset,
                connections_total=self.connections,
            )
            for index, (buyers, connections, offset) in enumerate(
                zip(buyer_shares, connection_counts, offsets, strict=True)
            )
        ]


def run_drivers(load: Load, settings: Sequence[DriverSettings], label: str, total_stock: int) -> list[DriverResult]:
    """Start the driver processes, start them together, show progress, collect their results."""
    context = multiprocessing.get_context("spawn")
    progress = context.RawArray("q", len(settings) * len(PROGRESS_FIELDS))
    messages = context.Queue()
    go = context.Event()
    start_value = context.RawValue("d", 0.0)
    processes = [
        context.Process(
            target=process_main,
            args=(one, progress, messages, go, start_value),
            name=f"soldout-bench-driver-{one.index}",
            daemon=True,
        )
        for one in settings
    ]
    for process in processes:
        process.start()
    try:
        ready: set[int] = set()
        deadline = time.monotonic() + DRIVERS_READY_SECONDS_MAX
        results: dict[int, DriverResult] = {}
        while len(ready) < len(processes):
            kind, index, payload = _next_message(messages, processes, deadline, "to connect")
            if kind == "ready":
                ready.add(index)
        start = time.monotonic() + START_DELAY_SECONDS
        if load.start_at_epoch is not None:
            wait = load.start_at_epoch - time.time()
            if wait > 0:
                print(f"waiting {wait:.1f} s for the sale to open", flush=True)
            start = max(start, time.monotonic() + wait)
        start_value.value = start
        go.set()
        with _progress_line(load.show_progress, label, progress, len(processes), total_stock) as refresh:
            while len(results) < len(processes):
                try:
                    kind, index, payload = messages.get(timeout=PROGRESS_REFRESH_SECONDS)
                except queue.Empty:
                    _check_alive(processes)
                    refresh()
                    continue
                if kind == "error":
                    raise BenchError(f"driver {index} failed:\n{payload}")
                if kind == "result":
                    results[index] = payload
                refresh()
        for process in processes:
            process.join(timeout=30)
        return [results[index] for index in sorted(results)]
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        messages.close()


def _next_message(messages: Any, processes: Sequence[Any], deadline: float, waiting_for: str) -> tuple[str, int, Any]:
    while True:
        try:
            kind, index, payload = messages.get(timeout=0.2)
        except queue.Empty:
            _check_alive(processes)
            if time.monotonic() > deadline:
                raise BenchError(f"the driver processes took too long {waiting_for}") from None
            continue
        if kind == "error":
            raise BenchError(f"driver {index} failed:\n{payload}")
        return kind, index, payload


def _check_alive(processes: Sequence[Any]) -> None:
    for process in processes:
        if process.exitcode not in (None, 0):
            raise BenchError(f"driver process {process.name} died (exit code {process.exitcode})")


@contextlib.contextmanager
def _progress_line(show: bool, label: str, progress: Any, procs: int, total_stock: int) -> Iterator[Callable[[], None]]:
    """A live line (rich): sent, answered, units won (ok reserves) and sold, the current rate."""
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    width = len(PROGRESS_FIELDS)
    started = time.monotonic()
    history: list[tuple[float, int]] = [(started, 0)]

    def line() -> Text:
        totals = [sum(progress[index * width + field] for index in range(procs)) for field in range(width)]
        sent, answered, won, sold = totals
        now = time.monotonic()
        history.append((now, answered))
        # The rate over the last second or so.
        while len(history) > 2 and now - history[1][0] >= 1.0:
            history.pop(0)
        then, answered_then = history[0]
        current = (answered - answered_then) / (now - then) if now > then else 0.0
        units = f"won {won:,}/{total_stock:,}" + (f"  sold {sold:,}" if sold else "")
        return Text(
            f"{label}  sent {sent:,}  answered {answered:,}  {units}  {current:,.0f}/s  {now - started:.1f} s",
            no_wrap=True,
            overflow="ellipsis",
        )

    console = Console(stderr=True)
    if console.is_terminal:
        with Live(line(), console=console, refresh_per_second=4, transient=False) as live:
            yield lambda: live.update(line())
            live.update(line())
        return
    # A log, not a screen: a plain line now and then, and the last one at the end.
    console = Console(stderr=True, width=200)
    printed = [started]

    def log_line() -> None:
        if time.monotonic() - printed[0] >= PROGRESS_LOG_SECONDS:
            printed[0] = time.monotonic()
            console.print(line())

    yield log_line
    console.print(line())


# ---------------------------------------------------------------- soldout


@dataclass(frozen=True)
class SoldoutServer:
    url: str
    token: str | None
    admin_token: str | None
    # The server's process when the bench started it, so its CPU time can be read.
    pid: int | None = None


@contextlib.contextmanager
def _soldout_server(arguments: argparse.Namespace) -> Iterator[SoldoutServer]:
    if arguments.url:
        yield SoldoutServer(arguments.url, arguments.token, arguments.admin_token or arguments.token)
        return
    with spawned_soldout(durable=arguments.durable, shards=arguments.shards) as spawned:
        yield spawned


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process, from /proc (Linux); None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_config_text(*, durable: bool, data_dir: str, shards: int | None, frontend: str, admin: str) -> str:
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        "port = 0",
        "metrics_port = false",
        "[engine]",
    ]
    if shards is not None:
        lines.append(f"shards = {shards}")
    if durable:
        lines += [f"data_dir = {_toml_string(data_dir)}", "durable = true"]
    lines += [
        "[auth]",
        f"frontend_tokens = [{_toml_string(frontend)}]",
        f"admin_tokens = [{_toml_string(admin)}]",
    ]
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextlib.contextmanager
def spawned_soldout(*, durable: bool, shards: int | None = None) -> Iterator[SoldoutServer]:
    """`soldout serve` in a subprocess with a throwaway config, stopped with SIGTERM after."""
    frontend = "front-" + secrets.token_hex(8)
    admin = "admin-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="soldout-bench-") as directory:
        config = Path(directory, "bench.toml")
        config.write_text(
            server_config_text(
                durable=durable, data_dir=str(Path(directory, "data")), shards=shards, frontend=frontend, admin=admin
            )
        )
        log_path = Path(directory, "server.log")
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), environment.get("PYTHONPATH")]))
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--config", str(config), "--log-level", "WARNING"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=PROJECT_ROOT,
                env=environment,
            )
            try:
                url = _wait_until_serving(server, log_path)
                yield SoldoutServer(url, frontend, admin, server.pid)
            finally:
                _stop(server, log_path)


def _wait_until_serving(server: subprocess.Popen[bytes], log_path: Path) -> str:
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert server.stdout is not None
        for raw in server.stdout:
            lines.put(raw.decode(errors="replace").strip())
        lines.put(None)

    threading.Thread(target=read, name="soldout-server-stdout", daemon=True).start()
    deadline = time.monotonic() + SERVER_START_SECONDS_MAX
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"the spawned server did not start in {SERVER_START_SECONDS_MAX:.0f} s") from None
        if line is None:
            server.wait(timeout=10)
            raise BenchError(f"the spawned server exited ({server.returncode}):\n{_tail(log_path)}")
        if line.startswith("soldout serving "):
            return line.removeprefix("soldout serving ").strip()


def _stop(server: subprocess.Popen[bytes], log_path: Path) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=SERVER_STOP_SECONDS_MAX)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise BenchError(f"the spawned server did not stop on SIGTERM:\n{_tail(log_path)}") from None
    if server.stdout is not None:
        server.stdout.close()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def run_soldout(server: SoldoutServer, scenario: Scenario, demand: list[int], load: Load, label: str) -> RunReport:
    import trio

    url, admin_token = server.url, server.admin_token
    if not scenario.existing_sku:
        trio.run(soldout_put_skus, url, admin_token, scenario)
    baseline = trio.run(soldout_counts, url, admin_token, scenario) if scenario.existing_sku else None
    stats_before = trio.run(soldout_stats, url, admin_token)
    template = DriverSettings("soldout", url, server.token, scenario, 0, range(0), 1, 1, 1, None, None)
    cpu_before = process_cpu_seconds(server.pid)
    results = run_drivers(load, load.settings(scenario, template), label, scenario.total_stock)
    cpu_after = process_cpu_seconds(server.pid)
    merged = merge(results)
    holds_expired = _wait_for_expiry(scenario, merged)
    counts = trio.run(soldout_counts, url, admin_token, scenario)
    stats_after = trio.run(soldout_stats, url, admin_token)
    reserve_ok = _reserve_ok(stats_after) - _reserve_ok(stats_before)
    names = {sku.sku for sku in scenario.skus}
    stats_skus = {name: figures for name, figures in stats_after.get("skus", {}).items() if name in names}
    checks = check_run(
        scenario,
        demand,
        merged.observed,
        counts,
        holds_expired=holds_expired,
        stats_skus=stats_skus,
        stats_reserve_ok=reserve_ok,
        baseline=baseline,
    )
    report = _report(label, "soldout", scenario, merged, checks)
    if cpu_before is not None and cpu_after is not None:
        report.server_cpu_seconds = cpu_after - cpu_before
    return report


def _reserve_ok(stats: dict[str, Any]) -> int:
    return int(stats.get("requests", {}).get("reserve", {}).get("ok", 0))


ADMIN_BATCH_REQUESTS = 100


async def soldout_exchange(url: str, token: str | None, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send request maps in batch frames over one connection, one frame at a time; replies in order."""
    from trio_websocket import ConnectionRejected, HandshakeError, open_websocket_url

    from bench.driver import FRAME_BYTES_MAX
    from protocol.codec import ClientCodec

    codec = ClientCodec()
    headers = [("Authorization", f"Bearer {token}")] if token else []
    replies: list[dict[str, Any]] = []
    try:
        async with open_websocket_url(url, extra_headers=headers, max_message_size=FRAME_BYTES_MAX) as websocket:
            for start in range(0, len(requests), ADMIN_BATCH_REQUESTS):
                chunk = requests[start : start + ADMIN_BATCH_REQUESTS]
                await websocket.send_message(codec.encode_batch(chunk))
                answered = codec.decode_replies(await websocket.get_message())
                if [reply.get("id") for reply in answered] != [request["id"] for request in chunk]:
                    raise BenchError(f"the server answered ids {[reply.get('id') for reply in answered][:5]}...")
                replies.extend(answered)
    except ConnectionRejected as error:
        raise BenchError(f"{url} refused the connection: HTTP {error.status_code} (check the tokens)") from None
    except (OSError, HandshakeError) as error:
        raise BenchError(f"cannot connect to {url}: {error}") from None
    return replies


async def soldout_put_skus(url: str, admin_token: str | None, scenario: Scenario) -> None:
    from protocol.codec import request_map
    from protocol.messages import PutSku

    commands = [PutSku(plan.sku, plan.stock, plan.per_buyer_limit, plan.hold_seconds) for plan in scenario.skus]
    requests = [request_map(number, command) for number, command in enumerate(commands, start=1)]
    for command, reply in zip(commands, await soldout_exchange(url, admin_token, requests), strict=True):
        if reply["status"] != "ok":
            raise BenchError(f"put_sku {command.sku} was answered {reply['status']}: {reply.get('error', '')}")


async def soldout_counts(url: str, admin_token: str | None, scenario: Scenario) -> list[Counts | None]:
    requests = [{"id": number, "op": "stock", "sku": plan.sku} for number, plan in enumerate(scenario.skus, start=1)]
    counts: list[Counts | None] = []
    for reply in await soldout_exchange(url, admin_token, requests):
        if reply["status"] == "ok":
            counts.append(Counts(reply["stock"], reply["available"], reply["held"], reply["sold"]))
        else:
            counts.append(None)
    return counts


async def soldout_stats(url: str, admin_token: str | None) -> dict[str, Any]:
    (reply,) = await soldout_exchange(url, admin_token, [{"id": 1, "op": "stats"}])
    if reply["status"] != "ok":
        raise BenchError(
            f"stats was answered {reply['status']}: {reply.get('error', '')} (is --admin-token an admin token?)"
        )
    return reply["stats"]


def _wait_for_expiry(scenario: Scenario, merged: Any) -> bool:
    """Checkout: wait until every hold of the run is past its expiry; True once waited."""
    if not scenario.holds_end or merged.last_answer_at is None:
        return False
    hold_seconds = max(plan.hold_seconds for plan in scenario.skus)
    # Every hold was made before its ok reply arrived, so it is due by then + hold time.
    due = merged.last_answer_at + hold_seconds + EXPIRY_MARGIN_SECONDS
    time.sleep(max(0.0, due - time.monotonic()))
    return True


def _report(label: str, target: str, scenario: Scenario, merged: Any, checks: list[Check]) -> RunReport:
    return RunReport(
        label=label,
        target=target,
        storage=label.split(" ", 1)[1] if " " in label else "",
        scenario=scenario.name,
        sku_count=len(scenario.skus),
        total_stock=scenario.total_stock,
        buyers=scenario.buyers,
        merged=merged,
        checks=checks,
    )


# ---------------------------------------------------------------- the Redis peer


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


def run_redis(
    url: str, scenario: Scenario, demand: list[int], load: Load, label: str, tag: str, *, delete_keys: bool
) -> RunReport:
    import redis

    from bench.redis_peer import delete_run_keys, load_script, put_skus, read_stock

    prefix = f"soldout-bench:{tag}:"
    client = redis.Redis.from_url(url)
    try:
        try:
            version = client.info("server").get("redis_version", "0")
        except redis.ConnectionError as error:
            raise BenchError(f"cannot reach Redis at {url}: {error}") from None
        if int(str(version).split(".")[0]) < 7:
            print(f"note: Redis {version} at {url}; the peer is meant to be Redis 7", file=sys.stderr)
        sha = load_script(client)
        put_skus(client, prefix, scenario.skus)
        template = DriverSettings(
            "redis", url, None, scenario, 0, range(0), 1, 1, 1, None, None, script_sha=sha, redis_prefix=prefix
        )
        cpu_before = _redis_cpu_seconds(client)
        results = run_drivers(load, load.settings(scenario, template), label, scenario.total_stock)
        cpu_after = _redis_cpu_seconds(client)
        merged = merge(results)
        holds_expired = _wait_for_expiry(scenario, merged)
        counts = [
            None if count is None else Counts(count.stock, count.available, count.held, count.sold)
            for count in read_stock(client, sha, prefix, scenario.skus)
        ]
        checks = check_run(scenario, demand, merged.observed, counts, holds_expired=holds_expired)
        report = _report(label, "redis", scenario, merged, checks)
        report.server_cpu_seconds = cpu_after - cpu_before
        from redis.utils import HIREDIS_AVAILABLE

        parser = "hiredis" if HIREDIS_AVAILABLE else "pure-Python (pip install hiredis for a faster Redis client)"
        report.notes.append(f"Redis {version}, one Lua script (EVALSHA), key prefix {prefix}, redis-py parser {parser}")
        return report
    finally:
        if delete_keys:
            with contextlib.suppress(redis.RedisError):
                delete_run_keys(client, prefix)
        client.close()


def _redis_cpu_seconds(client: Any) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
