"""One run against one target: put what the run needs on the server, drive the crowd with
the driver processes (bench/orchestrator.py), read back what the server holds, check it
(bench/checks.py), and hand the figures to the report (bench/report.py).

    run_soldout   a soldout server, spawned or running (`--url`: the run's holds are
                  cancelled at its end, so a real server is left as it was)
    run_echo      the echo server: the same frames, sent back as they went
    run_redis     Redis + the Lua script, over as many connections as soldout's, each with
                  one pipelined batch in flight
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from bench.checks import Check, Counts, check_echo_run, check_run
from bench.driver import DriverSettings
from bench.orchestrator import BenchError, Load, Server, Usage, run_drivers
from bench.report import RunReport, journal_figures, merge
from bench.scenarios import Scenario

# Checkout waits this much past the last possible expiry before reading the counts.
EXPIRY_MARGIN_SECONDS = 0.3


def admin_call(runner: Any, *call: Any) -> Any:
    """`runner(*call)`, an admin request's failure told as a BenchError."""
    from bench.targets import AdminError

    try:
        return runner(*call)
    except AdminError as error:
        raise BenchError(str(error)) from None


def _template(target: str, url: str, token: str | None, scenario: Scenario, **extra: Any) -> DriverSettings:
    return DriverSettings(target, url, token, scenario, 0, range(0), 1, 1, 1, None, None, **extra)


def _report(label: str, target: str, scenario: Scenario, merged: Any, checks: list[Check], load: Load) -> RunReport:
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
        connections=load.connections,
        batch=load.batch,
        inflight_per_connection=load.inflight,
    )


def _wait_for_expiry(scenario: Scenario, merged: Any) -> bool:
    """Checkout: wait until every hold of the run is past its expiry; True once waited."""
    if not scenario.holds_end or merged.last_answer_at is None:
        return False
    hold_seconds = max(plan.hold_seconds for plan in scenario.skus)
    # Every hold was made before its ok reply arrived, so it is due by then + hold time.
    due = merged.last_answer_at + hold_seconds + EXPIRY_MARGIN_SECONDS
    time.sleep(max(0.0, due - time.monotonic()))
    return True


@dataclass
class _Before:
    baseline: list[Counts | None] | None
    reserve_ok: int
    stats: dict[str, Any]


def _counts(replies: Sequence[Any]) -> list[Counts | None]:
    return [
        None if reply is None else Counts(reply.stock, reply.available, reply.held, reply.sold) for reply in replies
    ]


def run_soldout(server: Server, scenario: Scenario, load: Load, label: str, *, cancel_holds: bool) -> RunReport:
    import trio

    from bench.targets import cancel_run_holds, put_skus, reserve_ok_count, soldout_admin, stock_counts

    demand = scenario.plan().demand()

    async def before(client: Any) -> _Before:
        if not scenario.existing_sku:
            await put_skus(client, scenario)
        baseline = _counts(await stock_counts(client, scenario)) if scenario.existing_sku else None
        stats, reserve_ok = await reserve_ok_count(client)
        return _Before(baseline, reserve_ok, stats)

    admin = server.admin_token
    start = admin_call(trio.run, soldout_admin, server.url, admin, before)
    settings = load.settings(scenario, _template("soldout", server.url, server.token, scenario))
    usage = Usage(server.pid)
    results = run_drivers(load, settings, label, scenario.total_stock, usage)
    merged = merge(results)
    holds_expired = _wait_for_expiry(scenario, merged)

    async def after(client: Any) -> tuple[list[Any], dict[str, Any], int]:
        counts = await stock_counts(client, scenario)
        stats, reserve_ok = await reserve_ok_count(client)
        return counts, stats, reserve_ok

    counts, stats, reserve_ok = admin_call(trio.run, soldout_admin, server.url, admin, after)
    names = {sku.sku for sku in scenario.skus}
    stats_skus = {name: figures for name, figures in stats.get("skus", {}).items() if name in names}
    checks = check_run(
        scenario,
        demand,
        merged.observed,
        _counts(counts),
        holds_expired=holds_expired,
        stats_skus=stats_skus,
        stats_reserve_ok=reserve_ok - start.reserve_ok,
        baseline=start.baseline,
        reserve_statuses=merged.statuses.get("reserve", {}),
    )
    report = _report(label, "soldout", scenario, merged, checks, load)
    report.journal = journal_figures([start.stats], [stats])
    if report.journal is not None:
        report.journal["kind"] = "local file journal, fsync"
    report.server_cpu_seconds = usage.server_cpu_seconds
    report.machine_cpu_seconds = usage.machine_cpu_seconds
    report.rss_samples_kibibytes = usage.rss_samples_kibibytes
    if cancel_holds:
        plan = scenario.plan()
        holds = [(reservation, plan.buyer(buyer)) for _, buyer, reservation in merged.observed.holds]

        async def cancel_all(client: Any) -> tuple[dict[str, int], list[Any]]:
            return await cancel_run_holds(client, holds), await stock_counts(client, scenario)

        statuses, left = admin_call(trio.run, soldout_admin, server.url, admin, cancel_all)
        shown = ", ".join(f"{status} {count:,}" for status, count in sorted(statuses.items()))
        report.notes.append(f"cancelled the {len(holds):,} holds the run made ({shown or 'none'})")
        if not scenario.existing_sku:
            lingering = [
                f"{plan_sku.sku}: held {reply.held}"
                for plan_sku, reply in zip(scenario.skus, left, strict=True)
                if reply is not None and reply.held
            ]
            report.checks.append(
                Check("no hold of the run left on the server", not lingering, "; ".join(lingering[:5]))
            )
    return report


def run_echo(server: Server, scenario: Scenario, load: Load, label: str) -> RunReport:
    """The same crowd, frames and window against the echo server: the stack's ceiling."""
    settings = load.settings(scenario, _template("echo", server.url, None, scenario))
    usage = Usage(server.pid)
    results = run_drivers(load, settings, label, scenario.total_stock, usage)
    merged = merge(results)
    report = _report(label, "echo", scenario, merged, check_echo_run(merged.observed, merged.statuses), load)
    report.server_cpu_seconds = usage.server_cpu_seconds
    report.machine_cpu_seconds = usage.machine_cpu_seconds
    return report


def redis_load(load: Load) -> Load:
    """The Redis driver's load: as many connections as soldout's, each with one pipelined
    batch in flight (Redis answers a connection's pipeline in order, one command at a time)."""
    return replace(load, inflight=load.batch)


def _redis_cpu_reader(client: Any) -> tuple[int | None, Any]:
    """The Redis server's pid when it runs on this machine (its CPU then comes from /proc,
    as soldout's does), else a reader of its own INFO cpu figures."""
    from bench.orchestrator import process_cpu_seconds

    info = client.info("server")
    pid = int(info.get("process_id", 0)) or None
    host = client.connection_pool.connection_kwargs.get("host", "")
    if pid is not None and host in ("127.0.0.1", "localhost", "::1") and process_cpu_seconds(pid) is not None:
        return pid, None

    def from_info() -> float:
        cpu = client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    return None, from_info


def run_redis(url: str, scenario: Scenario, load: Load, label: str, *, delete_keys: bool) -> RunReport:
    import redis

    from bench.redis_peer import delete_run_keys, load_script, put_skus, read_stock

    prefix = f"soldout-bench:{secrets.token_hex(3)}:"
    demand = scenario.plan().demand()
    load = redis_load(load)
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
        template = _template("redis", url, None, scenario, script_sha=sha, redis_prefix=prefix)
        pid, cpu_reader = _redis_cpu_reader(client)
        usage = Usage(pid, cpu_reader)
        results = run_drivers(load, load.settings(scenario, template), label, scenario.total_stock, usage)
        merged = merge(results)
        holds_expired = _wait_for_expiry(scenario, merged)
        counts = [
            None if count is None else Counts(count.stock, count.available, count.held, count.sold)
            for count in read_stock(client, sha, prefix, scenario.skus)
        ]
        checks = check_run(
            scenario,
            demand,
            merged.observed,
            counts,
            holds_expired=holds_expired,
            reserve_statuses=merged.statuses.get("reserve", {}),
        )
        report = _report(label, "redis", scenario, merged, checks, load)
        report.server_cpu_seconds = usage.server_cpu_seconds
        report.machine_cpu_seconds = usage.machine_cpu_seconds
        from redis.utils import HIREDIS_AVAILABLE

        parser = "hiredis" if HIREDIS_AVAILABLE else "pure-Python (pip install hiredis for a faster Redis client)"
        report.notes.append(f"Redis {version}, one Lua script (EVALSHA), key prefix {prefix}, redis-py parser {parser}")
        return report
    finally:
        if delete_keys:
            with contextlib.suppress(redis.RedisError):
                delete_run_keys(client, prefix)
        client.close()
