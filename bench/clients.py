"""The trio client beside the asyncio client: reserves/s and p99 from one process.

    python -m bench.clients [--tasks 1000] [--seconds 5] [--rounds 2] [--durable]

Starts one `soldout serve` process (memory only, or durable) on loopback, then, in this process,
runs each client in turn (`trio.run` for `protocol.client`, `asyncio.run` for
`protocol.aio`), alternating rounds so that a noisy machine hurts both alike: `tasks`
concurrent tasks over one client, each reserving one unit for a fresh buyer, again
and again, for `seconds`. Prints each round, then the median rate and p99 of each
client and the asyncio client's rate as a share of the trio client's. Figures only:
no verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

import protocol.aio
import protocol.client

SKU = "BENCH-1"
TOKEN = "bench-secret"
CONFIG = f"""
[server]
host = "127.0.0.1"
port = 0
metrics_port = 0

{{engine}}
[auth]
frontend_tokens = ["{TOKEN}"]
admin_tokens = ["{TOKEN}-admin"]

[[sku]]
id = "{SKU}"
stock = 1000000000
per_buyer_limit = 1
hold_seconds = 3600
"""
START_SECONDS_MAX = 60


@dataclass(frozen=True)
class Round:
    client: str
    reserves: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.reserves / self.seconds


def summarise(client: str, latencies: list[float], seconds: float) -> Round:
    latencies.sort()

    def quantile(share: float) -> float:
        return latencies[min(len(latencies) - 1, int(share * len(latencies)))] * 1000

    return Round(client, len(latencies), seconds, quantile(0.50), quantile(0.99))


async def trio_round(url: str, tasks: int, seconds: float, tag: str) -> Round:
    latencies: list[float] = []
    async with protocol.client.open_client(url, TOKEN) as client:
        assert (await client.ping()).status == "ok"
        deadline = time.perf_counter() + seconds

        async def worker(number: int) -> None:
            count = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                reply = await client.reserve(SKU, buyer=f"{tag}-{number}-{count}")
                latencies.append(time.perf_counter() - started)
                assert reply.status == "ok", reply
                count += 1

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for number in range(tasks):
                nursery.start_soon(worker, number)
        elapsed = time.perf_counter() - began
    return summarise("trio", latencies, elapsed)


async def asyncio_round(url: str, tasks: int, seconds: float, tag: str) -> Round:
    latencies: list[float] = []
    async with protocol.aio.open_client(url, TOKEN) as client:
        assert (await client.ping()).status == "ok"
        deadline = time.perf_counter() + seconds

        async def worker(number: int) -> None:
            count = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                reply = await client.reserve(SKU, buyer=f"{tag}-{number}-{count}")
                latencies.append(time.perf_counter() - started)
                assert reply.status == "ok", reply
                count += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker(number) for number in range(tasks)))
        elapsed = time.perf_counter() - began
    return summarise("asyncio", latencies, elapsed)


def start_server(directory: Path, durable: bool) -> tuple[subprocess.Popen[bytes], str]:
    config = directory / "bench.toml"
    engine = f'[engine]\ndata_dir = "{directory / "data"}"\ndurable = true\n' if durable else ""
    config.write_text(CONFIG.replace("{engine}", engine))
    output = directory / "server.txt"
    with output.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--config", str(config), "--log-level", "WARNING"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + START_SECONDS_MAX
    while time.monotonic() < deadline and server.poll() is None:
        for line in output.read_bytes().splitlines():
            if line.startswith(b"soldout serving "):
                return server, line.split()[-1].decode()
        time.sleep(0.05)
    server.kill()
    server.wait()
    raise SystemExit(f"soldout serve did not start: {output.read_text(errors='replace')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="concurrent tasks over one client (default 1000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each round (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each client, alternating (default 2)")
    parser.add_argument("--durable", action="store_true", help="journal on disk, fsync before replies")
    arguments = parser.parse_args(argv)
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="soldout-bench-clients-") as directory:
        server, url = start_server(Path(directory), arguments.durable)
        try:
            mode = "durable" if arguments.durable else "memory only"
            print(f"soldout serve ({mode}) at {url}; {arguments.tasks} tasks, {arguments.seconds:g} s a round")
            for number in range(arguments.rounds):
                for name in ("trio", "asyncio"):
                    tag = f"{name}{number}"
                    if name == "trio":
                        result = trio.run(trio_round, url, arguments.tasks, arguments.seconds, tag)
                    else:
                        result = asyncio.run(asyncio_round(url, arguments.tasks, arguments.seconds, tag))
                    rounds.append(result)
                    print(
                        f"  round {number + 1} {name:>7}: {result.rate:9,.0f} reserves/s  "
                        f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  ({result.reserves:,} reserves)"
                    )
        finally:
            server.kill()
            server.wait()
    medians = {}
    for name in ("trio", "asyncio"):
        mine = [result for result in rounds if result.client == name]
        medians[name] = statistics.median(result.rate for result in mine)
        p99 = statistics.median(result.p99_ms for result in mine)
        print(f"{name:>7}: {medians[name]:9,.0f} reserves/s (median of {len(mine)})  p99 {p99:.1f} ms")
    print(f"asyncio / trio: {medians['asyncio'] / medians['trio']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
