"""The embedded benchmark: reserve decisions per second through the in-process API.

    python -m bench.embedded             # every case, 200,000 requests each
    python -m bench.embedded --quick     # small sizes: a smoke run
    python -m bench.embedded --case batch-hot-memory   # one case, in this process (to profile it)
    soldout bench embedded --quick       # the same, from the soldout command

Each case (mode x workload x storage) runs in a fresh child process, so its figures and
its peak RSS reflect that case alone. Modes: `call` is one `engine.reserve` per call
from 1,000 concurrent tasks; `batch` is `engine.execute` with batches of 100 from 16
concurrent tasks, so shards see concurrent batches. Workloads: `hot` is a flash crowd
on one SKU (10,000 units, limit 1 per buyer, many more buyers than units, so mostly
sold out); `spread` is 1,000 SKUs whose stock is half their demand, so about half the
requests succeed. Storage: `memory` (no data_dir) or `durable` (a data_dir, one fsync
per batch). Then two more children create a data_dir holding 1,000,000 live holds and
time its reopening, each reporting its own peak RSS.

Every case checks its outcome — held + sold <= stock for every SKU, exactly the number
of ok replies that stock and demand allow, holds counted once — and the run exits
non-zero when a check fails. Speed is printed as figures and ratios (durable over
memory-only), never judged: what the figures should reach is for the README and the notes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.report import format_table, mebibytes, rate
from engine.api import Engine, open_engine
from engine.config import EngineConfig
from protocol.messages import OK, SOLD_OUT, AnyReply, PutSku, Reserve, StockReply

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "result: "

MODES = ("batch", "call")
WORKLOADS = ("hot", "spread")
STORAGES = ("memory", "durable")
WORKLOAD_TITLES = {"hot": "hot SKU", "spread": "1,000 SKUs"}

CALL_TASKS = 1000
BATCH_REQUESTS = 100
BATCH_TASKS = 16
HOT_SKU = "MI-BAND-1"
HOT_STOCK_MAX = 10_000
SPREAD_SKUS = 1000
HOLD_SECONDS = 900
SEED_DEFAULT = 20150408

REQUESTS_DEFAULT = 200_000
REPEAT_DEFAULT = 3
REQUESTS_QUICK = 5_000
LIVE_HOLDS_DEFAULT = 1_000_000
LIVE_HOLDS_QUICK = 10_000
LIVE_HOLDS_SKUS_MAX = 1000
# Long enough that no live hold expires while the benchmark runs or reopens.
LIVE_HOLD_SECONDS = 30 * 86400


def case_name(mode: str, workload: str, storage: str) -> str:
    return f"{mode}-{workload}-{storage}"


def parse_case_name(name: str) -> tuple[str, str, str]:
    parts = tuple(name.split("-"))
    if len(parts) != 3 or parts[0] not in MODES or parts[1] not in WORKLOADS or parts[2] not in STORAGES:
        raise argparse.ArgumentTypeError(f"a case is MODE-WORKLOAD-STORAGE, e.g. batch-hot-memory, not {name!r}")
    return parts  # type: ignore[return-value]


def peak_rss_kibibytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """Requests built before the clock starts, and the SKUs they go to."""

    stocks: dict[str, int]  # SKU -> units on sale
    demand: dict[str, int]  # SKU -> requests for it
    requests: list[Reserve]

    @property
    def expected_ok(self) -> int:
        # Every buyer is distinct and the limit is 1, so each SKU sells min(stock, demand).
        return sum(min(stock, self.demand.get(sku, 0)) for sku, stock in self.stocks.items())


def build_workload(workload: str, requests: int, seed: int) -> Workload:
    """`requests` reserves from distinct buyers, each with an idempotency key, as a gateway sends them."""
    if workload == "hot":
        stock = min(HOT_STOCK_MAX, max(1, requests // 10))
        skus = [HOT_SKU] * requests
        stocks = {HOT_SKU: stock}
    else:
        names = [f"SKU-{number:04d}" for number in range(SPREAD_SKUS)]
        skus = [names[index % SPREAD_SKUS] for index in range(requests)]
        random.Random(seed).shuffle(skus)
        demand_per_sku = {name: 0 for name in names}
        for sku in skus:
            demand_per_sku[sku] += 1
        # Half the demand: about half the requests succeed.
        stocks = {name: count // 2 for name, count in demand_per_sku.items()}
    demand: dict[str, int] = {}
    for sku in skus:
        demand[sku] = demand.get(sku, 0) + 1
    built = [Reserve(sku, f"buyer-{index}", 1, f"buyer-{index}-1") for index, sku in enumerate(skus)]
    return Workload(stocks, demand, built)


# ---------------------------------------------------------------- checks


def check_case(workload: Workload, replies: Sequence[AnyReply], counts: dict[str, StockReply]) -> list[str]:
    """What went wrong in a case, from its replies and every SKU's committed counts; empty when nothing did."""
    failures: list[str] = []
    if len(replies) != len(workload.requests):
        failures.append(f"{len(replies)} replies to {len(workload.requests)} requests")
    statuses: dict[str, int] = {}
    for reply in replies:
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
    unexpected = {status: count for status, count in statuses.items() if status not in (OK, SOLD_OUT)}
    if unexpected:
        failures.append(f"replies other than ok and sold_out: {unexpected}")
    ok = statuses.get(OK, 0)
    if ok != workload.expected_ok:
        failures.append(f"{ok} ok replies where stock and demand allow exactly {workload.expected_ok}")
    reservations = {reply.reservation for reply in replies if reply.status == OK}
    if len(reservations) != ok:
        failures.append(f"{ok} ok replies name only {len(reservations)} distinct holds")
    held_total = 0
    for sku, stock in workload.stocks.items():
        count = counts.get(sku)
        if count is None or count.status != OK:
            failures.append(f"{sku}: no stock figures ({count})")
            continue
        assert count.held is not None
        assert count.sold is not None
        assert count.stock is not None
        if count.held + count.sold > count.stock:
            failures.append(f"{sku}: held {count.held} + sold {count.sold} > stock {count.stock}")
        if count.stock != stock:
            failures.append(f"{sku}: stock {count.stock}, put on sale {stock}")
        held_total += count.held + count.sold
    if held_total != ok:
        failures.append(f"{ok} ok replies but {held_total} units held and sold")
    return failures


# ---------------------------------------------------------------- one case


async def drive_calls(engine: Engine, requests: list[Reserve], tasks: int) -> tuple[list[AnyReply], float, float]:
    """One `reserve` per call from `tasks` concurrent tasks: (replies, elapsed seconds, CPU seconds)."""
    lanes = [requests[first::tasks] for first in range(tasks)]
    lane_replies: list[list[AnyReply]] = [[] for _ in range(tasks)]

    async def caller(lane: list[Reserve], replies: list[AnyReply]) -> None:
        reserve = engine.reserve
        append = replies.append
        for request in lane:
            append(await reserve(request.sku, buyer=request.buyer, qty=request.qty, key=request.key))

    _settle_garbage()
    cpu_started = _cpu_seconds()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for lane, replies in zip(lanes, lane_replies, strict=True):
            nursery.start_soon(caller, lane, replies)
    elapsed = time.perf_counter() - started
    cpu_seconds = _cpu_seconds() - cpu_started
    return [reply for replies in lane_replies for reply in replies], elapsed, cpu_seconds


async def drive_batches(
    engine: Engine, requests: list[Reserve], batch_requests: int, tasks: int
) -> tuple[list[AnyReply], float, float]:
    """`engine.execute` with batches of `batch_requests` from `tasks` concurrent tasks."""
    batches = [requests[start : start + batch_requests] for start in range(0, len(requests), batch_requests)]
    lanes = [batches[first::tasks] for first in range(tasks)]
    lane_replies: list[list[AnyReply]] = [[] for _ in range(tasks)]

    async def sender(lane: list[list[Reserve]], replies: list[AnyReply]) -> None:
        execute = engine.execute
        extend = replies.extend
        for batch in lane:
            extend(await execute(batch))

    _settle_garbage()
    cpu_started = _cpu_seconds()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for lane, replies in zip(lanes, lane_replies, strict=True):
            nursery.start_soon(sender, lane, replies)
    elapsed = time.perf_counter() - started
    cpu_seconds = _cpu_seconds() - cpu_started
    return [reply for replies in lane_replies for reply in replies], elapsed, cpu_seconds


def _settle_garbage() -> None:
    # The prebuilt requests are long-lived: move them out of the collector's way, so
    # collections during the timed section scan the engine's objects, not the driver's.
    gc.collect()
    gc.freeze()


async def run_case(
    mode: str,
    workload_name: str,
    storage: str,
    requests: int,
    shards: int,
    directory: str | None,
    seed: int,
    repeat: int = 1,
    batch_tasks: int = BATCH_TASKS,
) -> dict[str, Any]:
    """Run one case `repeat` times in this process, each on a fresh engine; returns the
    median run's figures, the spread of the rates and the failures of every run's checks."""
    workload = build_workload(workload_name, requests, seed)
    runs = [await run_once(mode, storage, workload, shards, directory, batch_tasks) for _ in range(repeat)]
    runs.sort(key=lambda run: run["decisions_per_second"])
    median = runs[len(runs) // 2]
    return {
        **median,
        "case": case_name(mode, workload_name, storage),
        "requests": len(workload.requests),
        "repeat": repeat,
        "batch_tasks": batch_tasks,
        "decisions_per_second_min": runs[0]["decisions_per_second"],
        "decisions_per_second_max": runs[-1]["decisions_per_second"],
        "peak_rss_kibibytes": peak_rss_kibibytes(),
        "failures": [failure for run in runs for failure in run["failures"]],
    }


async def run_once(
    mode: str, storage: str, workload: Workload, shards: int, directory: str | None, batch_tasks: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="soldout-bench-", dir=directory) as scratch:
        data_dir = os.path.join(scratch, "data") if storage == "durable" else None
        config = EngineConfig(shards=shards, data_dir=data_dir, durable=True)
        async with open_engine(config) as engine:
            put_replies = await engine.execute(
                [PutSku(sku, stock, 1, HOLD_SECONDS) for sku, stock in workload.stocks.items()]
            )
            failures = [f"put_sku answered {reply.status}" for reply in put_replies if reply.status != OK]
            if mode == "call":
                replies, elapsed, cpu_seconds = await drive_calls(engine, workload.requests, CALL_TASKS)
            else:
                replies, elapsed, cpu_seconds = await drive_batches(
                    engine, workload.requests, BATCH_REQUESTS, batch_tasks
                )
            gc.unfreeze()
            counts = {sku: await engine.stock(sku) for sku in workload.stocks}
            statistics = engine.statistics()
        failures += check_case(workload, replies, counts)
    return {
        "ok": sum(1 for reply in replies if reply.status == OK),
        "elapsed_seconds": elapsed,
        "cpu_seconds": cpu_seconds,
        "decisions_per_second": len(replies) / elapsed,
        "shard_batches": sum(shard.batches for shard in statistics.shards),
        "commits": sum(shard.commits for shard in statistics.shards),
        "failures": failures,
    }


def _cpu_seconds() -> float:
    # Every thread of this process: the trio thread and the fsync workers.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- live holds


def live_hold_layout(holds: int) -> tuple[int, int]:
    """(SKUs, stock per SKU) for `holds` live holds: 1,000 SKUs of 1,000 for a million."""
    skus = min(LIVE_HOLDS_SKUS_MAX, holds)
    return skus, holds // skus


def _live_hold_batches(skus: int, stock: int) -> Iterator[list[Reserve]]:
    # Built lazily, so the creating process's peak RSS is the engine's, not the requests'.
    buyer = 0
    for sku_number in range(skus):
        sku = f"SKU-{sku_number:04d}"
        for start in range(0, stock, BATCH_REQUESTS):
            batch = []
            for _ in range(min(BATCH_REQUESTS, stock - start)):
                batch.append(Reserve(sku, f"buyer-{buyer}", 1, f"buyer-{buyer}-1"))
                buyer += 1
            yield batch


def _live_hold_failures(engine: Engine, skus: int, stock: int) -> list[str]:
    failures = []
    counts = engine.sku_counts()
    held = sum(count.held for count in counts)
    if len(counts) != skus:
        failures.append(f"{len(counts)} SKUs where {skus} were put on sale")
    if held != skus * stock:
        failures.append(f"{held} units held where {skus * stock} holds were made")
    for count in counts:
        if count.held + count.sold > count.stock:
            failures.append(f"{count.sku}: held {count.held} + sold {count.sold} > stock {count.stock}")
    return failures


async def create_live_holds(data_dir: str, holds: int, shards: int) -> dict[str, Any]:
    """Fill `data_dir` (journal without fsync) with `holds` live holds through `execute`."""
    skus, stock = live_hold_layout(holds)
    config = EngineConfig(shards=shards, data_dir=data_dir, durable=False)
    batches = _live_hold_batches(skus, stock)
    not_ok = 0

    async def sender() -> None:
        nonlocal not_ok
        # One iterator shared by all senders: trio switches tasks only at an await.
        for batch in batches:
            not_ok += sum(1 for reply in await engine.execute(batch) if reply.status != OK)

    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    async with open_engine(config) as engine:
        await engine.execute([PutSku(f"SKU-{number:04d}", stock, stock, LIVE_HOLD_SECONDS) for number in range(skus)])
        async with trio.open_nursery() as nursery:
            for _ in range(BATCH_TASKS):
                nursery.start_soon(sender)
        failures = _live_hold_failures(engine, skus, stock)
        snapshots = sum(shard.snapshots for shard in engine.statistics().shards)
    elapsed = time.perf_counter() - started
    cpu_seconds = _cpu_seconds() - cpu_started
    if not_ok:
        failures.append(f"{not_ok} reserves were not ok while making live holds")
    return {
        "holds": skus * stock,
        "seconds": elapsed,
        "cpu_seconds": cpu_seconds,
        "snapshots": snapshots,
        "peak_rss_kibibytes": peak_rss_kibibytes(),
        "failures": failures,
    }


async def reopen_live_holds(data_dir: str, holds: int, shards: int) -> dict[str, Any]:
    """Time `open_engine` on `data_dir` until every shard is ready, then check what it holds."""
    skus, stock = live_hold_layout(holds)
    config = EngineConfig(shards=shards, data_dir=data_dir, durable=False)
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    async with open_engine(config) as engine:
        seconds = time.perf_counter() - started
        cpu_seconds = _cpu_seconds() - cpu_started
        failures = _live_hold_failures(engine, skus, stock)
    return {
        "holds": skus * stock,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_kibibytes": peak_rss_kibibytes(),
        "failures": failures,
    }


def baseline() -> dict[str, Any]:
    """The peak RSS of a process that has imported the engine and done nothing else."""
    return {"peak_rss_kibibytes": peak_rss_kibibytes(), "failures": []}


# ---------------------------------------------------------------- children


def run_child(arguments: list[str]) -> dict[str, Any]:
    """Run this module in a fresh interpreter and return the result it prints."""
    command = [sys.executable, "-m", "bench.embedded", *arguments]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line.removeprefix(RESULT_PREFIX))
            if completed.returncode != 0 and not result["failures"]:
                result["failures"].append(f"exited with status {completed.returncode}")
            return result
    tail = completed.stderr.strip().splitlines()[-5:]
    return {"failures": [f"{' '.join(arguments)} exited with status {completed.returncode}: {' | '.join(tail)}"]}


def _print_result(result: dict[str, Any]) -> int:
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 1 if result["failures"] else 0


# ---------------------------------------------------------------- the report


def mode_title(mode: str, batch_tasks: int) -> str:
    if mode == "call":
        return f"reserve, {CALL_TASKS:,} tasks"
    return f"execute x{BATCH_REQUESTS}, {batch_tasks} tasks"


def case_table(results: dict[str, dict[str, Any]], batch_tasks: int) -> str:
    rows = []
    for mode in MODES:
        for workload in WORKLOADS:
            for storage in STORAGES:
                result = results.get(case_name(mode, workload, storage))
                if result is None or "decisions_per_second" not in result:
                    continue
                figure = result["decisions_per_second"]
                rows.append(
                    [
                        mode_title(mode, batch_tasks),
                        WORKLOAD_TITLES[workload],
                        storage,
                        rate(figure),
                        f"{rate(result['decisions_per_second_min'])}-{rate(result['decisions_per_second_max'])}",
                        f"{result['ok']:,}",
                        f"{result['requests']:,}",
                        f"{result['elapsed_seconds']:.3f}",
                        rate(result["requests"] / result["cpu_seconds"]) if result["cpu_seconds"] > 0 else "-",
                        f"{result['requests'] / max(1, result['shard_batches']):,.0f}",
                        mebibytes(result["peak_rss_kibibytes"]),
                        "passed" if not result["failures"] else "FAILED",
                    ]
                )
    headers = [
        "mode",
        "workload",
        "storage",
        "decisions/s",
        "range of runs",
        "ok",
        "requests",
        "elapsed s",
        "per CPU-s",
        "per shard batch",
        "peak RSS MiB",
        "checks",
    ]
    return format_table(headers, rows, right_aligned=(3, 4, 5, 6, 7, 8, 9, 10))


def ratio_table(results: dict[str, dict[str, Any]], batch_tasks: int) -> str:
    rows = []
    for mode in MODES:
        for workload in WORKLOADS:
            memory = results.get(case_name(mode, workload, "memory"), {}).get("decisions_per_second")
            durable = results.get(case_name(mode, workload, "durable"), {}).get("decisions_per_second")
            if not memory or not durable:
                continue
            rows.append([mode_title(mode, batch_tasks), WORKLOAD_TITLES[workload], f"{durable / memory:.2f}"])
    return format_table(["mode", "workload", "durable/memory"], rows, right_aligned=(2,))


def holds_report(base: dict[str, Any], created: dict[str, Any], reopened: dict[str, Any]) -> str:
    rows = []
    if "peak_rss_kibibytes" in base:
        rows.append(["engine imported, nothing else", "-", "-", mebibytes(base["peak_rss_kibibytes"])])
    if "seconds" in created:
        rows.append(
            [
                f"create {created['holds']:,} live holds (execute x100, no fsync)",
                f"{created['seconds']:.2f}",
                f"{created['cpu_seconds']:.2f}",
                mebibytes(created["peak_rss_kibibytes"]),
            ]
        )
    if "seconds" in reopened:
        rows.append(
            [
                f"reopen the data_dir of {reopened['holds']:,} live holds",
                f"{reopened['seconds']:.2f}",
                f"{reopened['cpu_seconds']:.2f}",
                mebibytes(reopened["peak_rss_kibibytes"]),
            ]
        )
    headers = ["process", "seconds", "CPU s", "peak RSS MiB"]
    return format_table(headers, rows, right_aligned=(1, 2, 3))


# ---------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.embedded", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run that checks correctness")
    parser.add_argument("--requests", type=int, help=f"reserve requests per case (default {REQUESTS_DEFAULT:,})")
    parser.add_argument("--holds", type=int, help=f"live holds to reopen (default {LIVE_HOLDS_DEFAULT:,})")
    parser.add_argument("--shards", type=int, default=EngineConfig().shards, help="shards of the engine")
    parser.add_argument("--repeat", type=int, help="runs of each case; the median is reported (default 3, quick 1)")
    parser.add_argument(
        "--batch-tasks", type=int, default=BATCH_TASKS, help="concurrent tasks calling execute in batch mode"
    )
    parser.add_argument("--seed", type=int, default=SEED_DEFAULT, help="seed of the 1,000-SKU request order")
    parser.add_argument("--directory", help="where data directories go (default: the system's temporary directory)")
    parser.add_argument(
        "--case", type=parse_case_name, help="run only this case, in this process, e.g. batch-hot-memory"
    )
    parser.add_argument("--skip-holds", action="store_true", help="do not measure the live-holds reopen")
    # What the parent asks of a child process.
    parser.add_argument("--phase", choices=("create-holds", "reopen-holds", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    requests = arguments.requests or (REQUESTS_QUICK if arguments.quick else REQUESTS_DEFAULT)
    holds = arguments.holds or (LIVE_HOLDS_QUICK if arguments.quick else LIVE_HOLDS_DEFAULT)
    repeat = arguments.repeat or (1 if arguments.quick else REPEAT_DEFAULT)
    if requests < 1 or holds < 1 or repeat < 1 or arguments.batch_tasks < 1:
        print("--requests, --holds, --repeat and --batch-tasks must be positive", file=sys.stderr)
        return 2
    shards = arguments.shards
    if arguments.case is not None:
        mode, workload, storage = arguments.case
        return _print_result(
            trio.run(
                run_case,
                mode,
                workload,
                storage,
                requests,
                shards,
                arguments.directory,
                arguments.seed,
                repeat,
                arguments.batch_tasks,
            )
        )
    if arguments.phase == "baseline":
        return _print_result(baseline())
    if arguments.phase == "create-holds":
        return _print_result(trio.run(create_live_holds, arguments.data_dir, holds, shards))
    if arguments.phase == "reopen-holds":
        return _print_result(trio.run(reopen_live_holds, arguments.data_dir, holds, shards))
    return run_all(arguments, requests, holds, repeat)


def run_all(arguments: argparse.Namespace, requests: int, holds: int, repeat: int) -> int:
    shared = ["--requests", str(requests), "--shards", str(arguments.shards), "--seed", str(arguments.seed)]
    shared += ["--repeat", str(repeat), "--batch-tasks", str(arguments.batch_tasks)]
    if arguments.directory:
        shared += ["--directory", arguments.directory]
    print(
        f"soldout embedded benchmark: {requests:,} reserve requests per case, median of {repeat} runs, "
        f"{arguments.shards} shards, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start; each case in its own process",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for mode in MODES:
        for workload in WORKLOADS:
            for storage in STORAGES:
                name = case_name(mode, workload, storage)
                result = run_child(["--case", name, *shared])
                results[name] = result
                failures += [f"{name}: {failure}" for failure in result["failures"]]
                figure = result.get("decisions_per_second")
                progress = f"{rate(figure)} decisions/s" if figure else "failed"
                print(f"  {name}: {progress}", file=sys.stderr, flush=True)
    print()
    print(case_table(results, arguments.batch_tasks))
    print("decisions/s: median run (wall clock); per CPU-s: decisions per second of CPU time of that run,")
    print("steadier than wall clock on a shared machine; per shard batch: commands a shard decides per batch")
    print()
    print("durable / memory-only, same case:")
    print(ratio_table(results, arguments.batch_tasks))
    if not arguments.skip_holds:
        base = run_child(["--phase", "baseline"])
        with tempfile.TemporaryDirectory(prefix="soldout-bench-holds-", dir=arguments.directory) as scratch:
            data_dir = os.path.join(scratch, "data")
            holds_arguments = ["--holds", str(holds), "--shards", str(arguments.shards), "--data-dir", data_dir]
            created = run_child(["--phase", "create-holds", *holds_arguments])
            reopened = run_child(["--phase", "reopen-holds", *holds_arguments]) if not created["failures"] else {}
        for name, result in (("baseline", base), ("create-holds", created), ("reopen-holds", reopened)):
            failures += [f"{name}: {failure}" for failure in result.get("failures", [])]
        print()
        print("live holds (peak RSS: ru_maxrss of that process alone):")
        print(holds_report(base, created, reopened))
    print()
    if failures:
        print("correctness checks FAILED:")
        for failure in failures:
            print(f"  {failure}")
        return 1
    print("correctness checks: all passed (held + sold <= stock per SKU, exact ok counts, one hold per ok)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
