"""The wire benchmark: reserves per second over websockets into one soldout server process.

    python -m bench.wire                  # the full run (10 minutes or more with the 5-minute soak)
    python -m bench.wire --quick          # small sizes and a short soak: a smoke run
    python -m bench.wire --soak 60 --procs 2 --connections 16

One server process (`python -m engine.cli serve --config <temp toml>`) is driven by
separate load-driver processes over `--connections` websocket connections. A flash
crowd of distinct buyers hits one hot SKU (stock 10,000, limit 1 per buyer), so after
the first 10,000 holds nearly every answer is `sold_out`. Cases, in this order:

    echo, soldout memory, soldout durable    one request per frame, closed loop
    echo, soldout memory, soldout durable    batches of 100, closed loop
    open loop                                100,000 reserves/s offered, durable
    soak                                     half the measured peak, durable, server RSS

The echo server is a plain trio-websocket server that sends each message back
unchanged; the same drivers feed it the same frames, so it is the ceiling of the stack
and `ratio to echo` is soldout's requests/s over echo's for the same frame size.

Closed loop keeps `--window` frames in flight on every connection. Latency is per
request, from the send of its frame to the receipt of the reply frame (in open loop,
from the frame's scheduled send time, so a server that falls behind is charged for the
wait). Histograms are HDR histograms merged across driver processes.

Beside the rates, the table gives the CPU of the server, of the drivers and of the rest
of the machine over each measured window, and the server's CPU microseconds per request:
on a shared machine that figure moves much less than the rates do. To profile the server,
`--cases durable-100 --duration 60` prints its pid (attach py-spy to it), and
`--server-module` runs another module's `serve` in its place to try a variant.

After every soldout case the server's `stock` must show held + sold <= stock, the `ok`
replies must equal held + sold, and when demand exceeded stock, exactly `stock` replies
must be `ok`; every request must be answered and the server must stop cleanly. Any
failure makes the run exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import trio
from hdrh.histogram import HdrHistogram
from trio_websocket import ConnectionClosed, WebSocketRequest, open_websocket_url, serve_websocket

from bench.report import format_table, rate

ROOT = Path(__file__).resolve().parent.parent
SKU = "MI-BAND-1"
FRONTEND_TOKEN = "bench-frontend"
ADMIN_TOKEN = "bench-admin"
ENDPOINT_PATH = "/v1"
FRAME_BYTES_MAX = 1_048_576
# The gateway's own message queue size, so the echo server buffers like it.
MESSAGE_QUEUE_SIZE = 4

LATENCY_LOWEST_MICROSECONDS = 1
LATENCY_HIGHEST_MICROSECONDS = 120_000_000
LATENCY_SIGNIFICANT_FIGURES = 3

SERVER_START_SECONDS_MAX = 60.0
SERVER_STOP_SECONDS_MAX = 60.0
DRIVER_READY_SECONDS_MAX = 120.0
# After the last send, how long replies still in flight may take.
ANSWER_GRACE_SECONDS = 30.0
# Time between telling the drivers to start and the start, so every driver is waiting.
START_LEAD_SECONDS = 0.3
RSS_SAMPLE_SECONDS = 1.0

TARGET_DURABLE_BATCH_RATE = 250_000
TARGET_SINGLE_RATIO = 0.80
TARGET_OPEN_LOOP_P99_MILLISECONDS = 10.0
TARGET_OPEN_LOOP_RATE = 100_000
TARGET_SOAK_SECONDS = 300
# RSS counts as flat when the end is within this much of the settled start.
RSS_FLAT_GROWTH_SHARE = 0.05
RSS_FLAT_GROWTH_KIBIBYTES_MIN = 8 * 1024

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")

ECHOED = "echoed"
OK = "ok"
BUSY = "busy"
# The statuses a flash crowd of distinct buyers on an open SKU may be answered with.
CROWD_STATUSES = frozenset({OK, "sold_out", BUSY})


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    quick: bool
    procs: int
    connections: int
    window: int
    warmup_seconds: float
    duration_seconds: float
    stock: int
    shards: int
    open_rate: int
    open_batch: int
    soak_seconds: float
    soak_rate: int | None
    cases: tuple[str, ...]
    data_root: str | None
    server_module: str


CASE_NAMES = (
    "echo-1",
    "memory-1",
    "durable-1",
    "echo-100",
    "memory-100",
    "durable-100",
    "open-loop",
    "soak",
)


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    target: str  # "echo" or "soldout"
    durable: bool
    batch: int
    # Requests per second offered over all connections in open loop; None for closed loop.
    offered_rate: float | None
    duration_seconds: float


@dataclass(frozen=True)
class DriverPlan:
    """What one driver process does in one case; `start_at` is filled in by the parent."""

    url: str
    token: str
    process_index: int
    connections: int
    # Global index of this process's first connection and the total, to stagger open loop.
    connection_offset: int
    connections_total: int
    batch: int
    window: int
    rate_per_connection: float | None
    warmup_seconds: float
    duration_seconds: float
    # Buyer names are unique across every case of a run: "<run>.<case>.<process>.<connection>.<id>".
    buyer_prefix: str


@dataclass
class DriverResult:
    process_index: int
    statuses: dict[str, int]
    histogram: bytes
    requests_in_window: int
    frames_in_window: int
    frames_sent: int
    requests_sent: int
    unanswered_requests: int
    cpu_seconds_in_window: float
    # Open loop: how far behind its schedule the driver itself sent its latest frame.
    send_lateness_max_seconds: float
    errors: list[str] = field(default_factory=list)


@dataclass
class CaseResult:
    case: Case
    statuses: dict[str, int]
    histogram: HdrHistogram
    requests_per_second: float
    frames_per_second: float
    offered_per_second: float | None
    unanswered_requests: int
    server_cpu_share: float
    driver_cpu_share: float
    other_cpu_share: float
    send_lateness_max_seconds: float
    errors: list[str]
    server_pid: int
    stock_counts: dict[str, Any] | None = None
    server_exit_code: int | None = None
    rss_samples_kibibytes: list[tuple[float, int]] = field(default_factory=list)

    @property
    def server_cpu_microseconds_per_request(self) -> float:
        """The server's CPU per request answered: steadier than rates on a shared machine."""
        if self.requests_per_second <= 0:
            return math.nan
        return self.server_cpu_share / self.requests_per_second * 1_000_000

    def latency_milliseconds(self, percentile: float) -> float:
        if self.histogram.get_total_count() == 0:
            return math.nan
        return self.histogram.get_value_at_percentile(percentile) / 1000.0


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


# ---------------------------------------------------------------------------- frames


def reserve_payload(first_id: int, count: int, buyer_prefix: str) -> bytes:
    """A frame of `count` reserves of the hot SKU for distinct buyers, ids from `first_id`.

    One request is sent as a map, more as a batch array (protocol v1). The maps are the
    shape `protocol.codec.request_map` makes; they are packed here directly so that the
    drivers, which share the cores with the server, spend as little as they can.
    """
    if count == 1:
        return msgpack.packb(
            {"id": first_id, "op": "reserve", "sku": SKU, "buyer": buyer_prefix + str(first_id), "qty": 1}
        )
    return msgpack.packb(
        [
            {"id": request_id, "op": "reserve", "sku": SKU, "buyer": buyer_prefix + str(request_id), "qty": 1}
            for request_id in range(first_id, first_id + count)
        ]
    )


def read_reply_frame(payload: bytes | str, statuses: dict[str, int]) -> tuple[Any, int]:
    """The id of the frame's first reply and its count of replies; tallies their statuses.

    An echoed frame holds the requests themselves, which have no status: they count as
    `echoed`. Decoding is the same for both servers so the drivers' work is the same.
    """
    message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    replies = message if type(message) is list else [message]
    for reply in replies:
        status = reply.get("status", ECHOED)
        statuses[status] = statuses.get(status, 0) + 1
    return replies[0].get("id"), len(replies)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LATENCY_LOWEST_MICROSECONDS, LATENCY_HIGHEST_MICROSECONDS, LATENCY_SIGNIFICANT_FIGURES)


# ---------------------------------------------------------------------------- the echo server


async def serve_echo(port: int) -> None:
    """A plain trio-websocket server that sends every message back unchanged."""

    async def echo(request: WebSocketRequest) -> None:
        websocket = await request.accept()
        try:
            while True:
                message = await websocket.get_message()
                await websocket.send_message(message)
        except ConnectionClosed:
            pass

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    echo,
                    "127.0.0.1",
                    port,
                    ssl_context=None,
                    max_message_size=FRAME_BYTES_MAX,
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    task_status=task_status,
                )
            )
            print(f"echo serving ws://127.0.0.1:{server.port}{ENDPOINT_PATH}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- server processes


class ServerProcess:
    """A server in its own process: started, read for its address, watched, stopped."""

    def __init__(self, name: str, command: list[str], ready_prefix: str, log_path: Path) -> None:
        self.name = name
        self.command = command
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL
        )
        self.log_path = log_path
        self.url = self._wait_ready(ready_prefix)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self, ready_prefix: str) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + SERVER_START_SECONDS_MAX
        buffered = b""
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if readable:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    break
                buffered += chunk
                for line in buffered.decode(errors="replace").splitlines():
                    if line.startswith(ready_prefix):
                        return line[len(ready_prefix) :].strip()
            elif self.process.poll() is not None:
                break
        self.process.kill()
        self.process.wait()
        raise RuntimeError(
            f"{self.name} did not start ({shlex.join(self.command)}):\n{buffered.decode(errors='replace')}"
            f"{self.log_path.read_text(errors='replace')[-2000:]}"
        )

    def stop(self) -> int:
        """SIGTERM, then wait for a clean exit; its exit code (killed: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SERVER_STOP_SECONDS_MAX)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def write_server_config(path: Path, *, stock: int, shards: int, data_dir: Path | None) -> None:
    engine_lines = [f"shards = {shards}"]
    if data_dir is not None:
        engine_lines += [f'data_dir = "{data_dir}"', "durable = true"]
    path.write_text(
        "\n".join(
            [
                "[server]",
                'host = "127.0.0.1"',
                "port = 0",
                "metrics_port = false",
                "[engine]",
                *engine_lines,
                "[auth]",
                f'frontend_tokens = ["{FRONTEND_TOKEN}"]',
                f'admin_tokens = ["{ADMIN_TOKEN}"]',
                "[[sku]]",
                f'id = "{SKU}"',
                f"stock = {stock}",
                "per_buyer_limit = 1",
                "hold_seconds = 900",
                "",
            ]
        )
    )


def start_soldout_server(workspace: Path, case: Case, settings: Settings) -> ServerProcess:
    config_path = workspace / f"{case.name}.toml"
    data_dir = workspace / f"{case.name}-data" if case.durable else None
    write_server_config(config_path, stock=settings.stock, shards=settings.shards, data_dir=data_dir)
    command = [sys.executable, "-m", settings.server_module, "serve", "--config", str(config_path)]
    command += ["--log-level", "WARNING"]
    return ServerProcess(f"soldout server ({case.name})", command, "soldout serving ", workspace / f"{case.name}.log")


def start_echo_server(workspace: Path) -> ServerProcess:
    command = [sys.executable, "-m", "bench.wire", "--echo-server"]
    return ServerProcess("echo server", command, "echo serving ", workspace / "echo.log")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process and all its threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as file:
        fields_after_name = file.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; the text after ")" starts at field 3.
    return (int(fields_after_name[11]) + int(fields_after_name[12])) / CLOCK_TICKS_PER_SECOND


def machine_busy_cpu_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (not idle, not waiting)."""
    with open("/proc/stat") as file:
        values = [int(value) for value in file.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user time.
    return (sum(values[:8]) - idle) / CLOCK_TICKS_PER_SECOND


def rss_kibibytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


# ---------------------------------------------------------------------------- the drivers


def driver_process_main(index: int, channel: Connection) -> None:
    """A driver process: for each plan the parent sends, drive it and send back the result."""
    while True:
        plan = channel.recv()
        if plan is None:
            return
        try:
            result = trio.run(drive, plan, channel)
        except BaseException:
            channel.send(("error", index, traceback.format_exc()))
            continue
        channel.send(("result", index, result))


async def drive(plan: DriverPlan, channel: Connection) -> DriverResult:
    histogram = new_histogram()
    statuses: dict[str, int] = {}
    errors: list[str] = []
    counters = _Counters()
    headers = [(b"Authorization", f"Bearer {plan.token}".encode())]
    async with trio.open_nursery() as connecting:
        websockets: list[Any] = []
        stop = trio.Event()

        async def hold_open(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with open_websocket_url(
                plan.url, extra_headers=headers, max_message_size=FRAME_BYTES_MAX, message_queue_size=MESSAGE_QUEUE_SIZE
            ) as websocket:
                websockets.append(websocket)
                task_status.started()
                await stop.wait()

        for _ in range(plan.connections):
            await connecting.start(hold_open)
        # Every connection of this driver is open: tell the parent and wait for the start time.
        channel.send(("ready", plan.process_index, None))
        start_at = await trio.to_thread.run_sync(channel.recv)
        window_start = start_at + plan.warmup_seconds
        window_end = window_start + plan.duration_seconds
        async with trio.open_nursery() as driving:
            driving.start_soon(_measure_cpu, window_start, window_end, counters)
            for number, websocket in enumerate(websockets):
                connection = _ConnectionDriver(
                    plan, number, websocket, start_at, window_start, window_end, histogram, statuses, errors, counters
                )
                driving.start_soon(connection.run)
        stop.set()
    return DriverResult(
        process_index=plan.process_index,
        statuses=statuses,
        histogram=histogram.encode(),
        requests_in_window=counters.requests_in_window,
        frames_in_window=counters.frames_in_window,
        frames_sent=counters.frames_sent,
        requests_sent=counters.requests_sent,
        unanswered_requests=counters.unanswered_requests,
        cpu_seconds_in_window=counters.cpu_seconds_in_window,
        send_lateness_max_seconds=counters.send_lateness_max_seconds,
        errors=errors[:20],
    )


class _Counters:
    def __init__(self) -> None:
        self.requests_in_window = 0
        self.frames_in_window = 0
        self.frames_sent = 0
        self.requests_sent = 0
        self.unanswered_requests = 0
        self.cpu_seconds_in_window = 0.0
        self.send_lateness_max_seconds = 0.0


async def sleep_until(moment: float) -> None:
    """Sleep until `moment` on time.perf_counter's clock, which every process shares on Linux."""
    delay = moment - time.perf_counter()
    if delay > 0:
        await trio.sleep(delay)


async def _measure_cpu(window_start: float, window_end: float, counters: _Counters) -> None:
    await sleep_until(window_start)
    started = time.process_time()
    await sleep_until(window_end)
    counters.cpu_seconds_in_window = time.process_time() - started


class _ConnectionDriver:
    """One connection: a sender (closed loop within the window, or open loop on schedule)
    and a receiver that matches reply frames to their send times by the first id."""

    def __init__(
        self,
        plan: DriverPlan,
        number: int,
        websocket: Any,
        start_at: float,
        window_start: float,
        window_end: float,
        histogram: HdrHistogram,
        statuses: dict[str, int],
        errors: list[str],
        counters: _Counters,
    ) -> None:
        self.plan = plan
        self.websocket = websocket
        self.start_at = start_at
        self.window_start = window_start
        self.window_end = window_end
        self.histogram = histogram
        self.statuses = statuses
        self.errors = errors
        self.counters = counters
        self.buyer_prefix = f"{plan.buyer_prefix}.{plan.process_index}.{number}."
        self.connection_index = plan.connection_offset + number
        # first id of a frame -> (send time, requests in it)
        self.in_flight: dict[int, tuple[float, int]] = {}
        self.slots = trio.Semaphore(plan.window)
        self.sending_done = False
        self.receiving = trio.CancelScope()
        # The connection's nursery, once running: a closed connection cancels it.
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._receive)
            try:
                if self.plan.rate_per_connection is None:
                    await self._send_closed_loop()
                else:
                    await self._send_open_loop()
            except ConnectionClosed as closed:
                self.errors.append(f"connection closed while sending: {closed.reason}")
                nursery.cancel_scope.cancel()
            self.sending_done = True
            if not self.in_flight:
                self.receiving.cancel()
            else:
                self.receiving.deadline = trio.current_time() + ANSWER_GRACE_SECONDS
        self.counters.unanswered_requests += sum(count for _, count in self.in_flight.values())

    async def _send_closed_loop(self) -> None:
        await sleep_until(self.start_at)
        batch = self.plan.batch
        next_id = 1
        while time.perf_counter() < self.window_end:
            await self.slots.acquire()
            payload = reserve_payload(next_id, batch, self.buyer_prefix)
            self.in_flight[next_id] = (time.perf_counter(), batch)
            next_id += batch
            await self.websocket.send_message(payload)
            self.counters.frames_sent += 1
            self.counters.requests_sent += batch

    async def _send_open_loop(self) -> None:
        assert self.plan.rate_per_connection is not None
        batch = self.plan.batch
        interval = batch / self.plan.rate_per_connection
        # Connections start spread over one interval, so frames arrive evenly.
        first_at = self.start_at + interval * self.connection_index / self.plan.connections_total
        next_id = 1
        number = 0
        lateness_max = 0.0
        while True:
            intended_at = first_at + number * interval
            if intended_at >= self.window_end:
                break
            await sleep_until(intended_at)
            payload = reserve_payload(next_id, batch, self.buyer_prefix)
            self.in_flight[next_id] = (intended_at, batch)
            lateness_max = max(lateness_max, time.perf_counter() - intended_at)
            next_id += batch
            number += 1
            await self.websocket.send_message(payload)
            self.counters.frames_sent += 1
            self.counters.requests_sent += batch
        self.counters.send_lateness_max_seconds = max(self.counters.send_lateness_max_seconds, lateness_max)

    async def _receive(self) -> None:
        in_flight = self.in_flight
        histogram = self.histogram
        counters = self.counters
        window_start = self.window_start
        window_end = self.window_end
        with self.receiving:
            while True:
                try:
                    payload = await self.websocket.get_message()
                except ConnectionClosed as closed:
                    self.errors.append(f"connection closed by the server: {closed.reason}")
                    # The sender may be waiting for a slot that no reply will free.
                    assert self.nursery is not None
                    self.nursery.cancel_scope.cancel()
                    return
                received_at = time.perf_counter()
                first_id, count = read_reply_frame(payload, self.statuses)
                sent = in_flight.pop(first_id, None)
                if sent is None:
                    self.errors.append(f"a reply frame whose first id {first_id!r} matches no frame in flight")
                    continue
                sent_at, sent_count = sent
                if count != sent_count:
                    self.errors.append(f"a frame of {sent_count} requests was answered with {count} replies")
                if window_start <= sent_at < window_end:
                    microseconds = int((received_at - sent_at) * 1_000_000)
                    histogram.record_value(
                        min(max(microseconds, LATENCY_LOWEST_MICROSECONDS), LATENCY_HIGHEST_MICROSECONDS), count
                    )
                if window_start <= received_at < window_end:
                    counters.requests_in_window += count
                    counters.frames_in_window += 1
                self.slots.release()
                if self.sending_done and not in_flight:
                    return


class DriverPool:
    """`procs` driver processes that stay up for the whole run and drive one case at a time."""

    def __init__(self, procs: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.channels: list[Connection] = []
        self.processes = []
        for index in range(procs):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=driver_process_main, args=(index, child_end), daemon=True)
            process.start()
            child_end.close()
            self.channels.append(parent_end)
            self.processes.append(process)

    def close(self) -> None:
        for channel in self.channels:
            with contextlib.suppress(BrokenPipeError, OSError):
                channel.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()

    def _receive(self, index: int, kind: str, timeout_seconds: float) -> Any:
        channel = self.channels[index]
        if not channel.poll(timeout_seconds):
            raise RuntimeError(f"driver {index} sent nothing for {timeout_seconds:.0f} s")
        message_kind, _, value = channel.recv()
        if message_kind == "error":
            raise RuntimeError(f"driver {index} failed:\n{value}")
        if message_kind != kind:
            raise RuntimeError(f"driver {index} sent {message_kind!r} where {kind!r} was expected")
        return value

    def run(self, plans: Sequence[DriverPlan], observe: Any) -> list[DriverResult]:
        """Drive `plans` (one per process) from one shared start time; `observe(start_at)`
        runs in this process while they drive (it reads the server's CPU and RSS)."""
        for channel, plan in zip(self.channels, plans, strict=True):
            channel.send(plan)
        for index in range(len(plans)):
            self._receive(index, "ready", DRIVER_READY_SECONDS_MAX)
        start_at = time.perf_counter() + START_LEAD_SECONDS
        for channel in self.channels:
            channel.send(start_at)
        observe(start_at)
        longest = max(plan.warmup_seconds + plan.duration_seconds for plan in plans)
        timeout = START_LEAD_SECONDS + longest + ANSWER_GRACE_SECONDS + 60
        return [self._receive(index, "result", timeout) for index in range(len(plans))]


# ---------------------------------------------------------------------------- running a case


def driver_plans(url: str, case: Case, settings: Settings, run_tag: str) -> list[DriverPlan]:
    connections_per_process = split_evenly(settings.connections, settings.procs)
    rate_per_connection = None if case.offered_rate is None else case.offered_rate / settings.connections
    plans = []
    offset = 0
    for index, connections in enumerate(connections_per_process):
        plans.append(
            DriverPlan(
                url=url,
                token=FRONTEND_TOKEN,
                process_index=index,
                connections=connections,
                connection_offset=offset,
                connections_total=settings.connections,
                batch=case.batch,
                window=settings.window,
                rate_per_connection=rate_per_connection,
                warmup_seconds=settings.warmup_seconds,
                duration_seconds=case.duration_seconds,
                buyer_prefix=f"{run_tag}.{case.name}",
            )
        )
        offset += connections
    return plans


def split_evenly(total: int, parts: int) -> list[int]:
    size, extra = divmod(total, parts)
    return [size + (1 if part < extra else 0) for part in range(parts)]


class _Observer:
    """Reads the server's and the machine's CPU over the measured window, and the server's RSS."""

    def __init__(self, pid: int, warmup_seconds: float, duration_seconds: float, sample_rss: bool) -> None:
        self.pid = pid
        self.warmup_seconds = warmup_seconds
        self.duration_seconds = duration_seconds
        self.sample_rss = sample_rss
        self.server_cpu_seconds = 0.0
        self.machine_cpu_seconds = 0.0
        self.rss_samples: list[tuple[float, int]] = []

    def __call__(self, start_at: float) -> None:
        if self.sample_rss:
            self.rss_samples.append((-START_LEAD_SECONDS, rss_kibibytes(self.pid)))
        window_start = start_at + self.warmup_seconds
        window_end = window_start + self.duration_seconds
        _sleep_until(window_start)
        server_started = process_cpu_seconds(self.pid)
        machine_started = machine_busy_cpu_seconds()
        if self.sample_rss:
            sample_at = window_start
            while sample_at < window_end:
                _sleep_until(sample_at)
                self.rss_samples.append((time.perf_counter() - start_at, rss_kibibytes(self.pid)))
                sample_at += RSS_SAMPLE_SECONDS
        _sleep_until(window_end)
        self.server_cpu_seconds = process_cpu_seconds(self.pid) - server_started
        self.machine_cpu_seconds = machine_busy_cpu_seconds() - machine_started
        if self.sample_rss:
            self.rss_samples.append((time.perf_counter() - start_at, rss_kibibytes(self.pid)))


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_case(case: Case, server: ServerProcess, pool: DriverPool, settings: Settings, run_tag: str) -> CaseResult:
    plans = driver_plans(server.url, case, settings, run_tag)
    observer = _Observer(server.pid, settings.warmup_seconds, case.duration_seconds, sample_rss=case.name == "soak")
    results = pool.run(plans, observer)
    histogram = new_histogram()
    statuses: dict[str, int] = {}
    errors: list[str] = []
    for result in results:
        histogram.decode_and_add(result.histogram)
        for status, count in result.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
        errors.extend(f"driver {result.process_index}: {error}" for error in result.errors)
    duration = case.duration_seconds
    driver_cpu = sum(result.cpu_seconds_in_window for result in results)
    return CaseResult(
        case=case,
        statuses=statuses,
        histogram=histogram,
        requests_per_second=sum(result.requests_in_window for result in results) / duration,
        frames_per_second=sum(result.frames_in_window for result in results) / duration,
        offered_per_second=case.offered_rate,
        unanswered_requests=sum(result.unanswered_requests for result in results),
        server_cpu_share=observer.server_cpu_seconds / duration,
        driver_cpu_share=driver_cpu / duration,
        other_cpu_share=max(0.0, observer.machine_cpu_seconds - observer.server_cpu_seconds - driver_cpu) / duration,
        send_lateness_max_seconds=max(result.send_lateness_max_seconds for result in results),
        errors=errors,
        server_pid=server.pid,
        rss_samples_kibibytes=observer.rss_samples,
    )


async def read_stock(url: str) -> dict[str, Any]:
    """The server's `stock` answer for the hot SKU, over a websocket of its own."""
    headers = [(b"Authorization", f"Bearer {FRONTEND_TOKEN}".encode())]
    with trio.fail_after(SERVER_START_SECONDS_MAX):
        async with open_websocket_url(url, extra_headers=headers) as websocket:
            await websocket.send_message(msgpack.packb({"id": 1, "op": "stock", "sku": SKU}))
            reply = msgpack.unpackb(await websocket.get_message(), raw=False, strict_map_key=False)
    if type(reply) is not dict or reply.get("id") != 1:
        return {"status": f"not a stock reply: {reply!r:.200}"}
    return {key: reply.get(key) for key in ("status", "stock", "available", "held", "sold")}


# ---------------------------------------------------------------------------- checks


def check_soldout_case(
    name: str, statuses: dict[str, int], stock_counts: dict[str, Any], stock: int, unanswered: int
) -> list[Check]:
    """The end checks of one soldout case, from the replies the drivers counted and the
    server's `stock` answer after the run."""
    checks = []
    stock_ok = stock_counts.get("status") == OK and all(
        type(stock_counts.get(key)) is int for key in ("stock", "held", "sold")
    )
    checks.append(Check(f"{name}: stock answered", stock_ok, repr(stock_counts)))
    if not stock_ok:
        return checks
    held = stock_counts["held"]
    sold = stock_counts["sold"]
    checks.append(
        Check(
            f"{name}: held + sold <= stock",
            held + sold <= stock_counts["stock"] and stock_counts["stock"] == stock,
            f"held {held} + sold {sold}, stock {stock_counts['stock']} (configured {stock})",
        )
    )
    oks = statuses.get(OK, 0)
    checks.append(Check(f"{name}: ok replies = held + sold", oks == held + sold, f"{oks} ok, {held + sold} held"))
    decided = sum(count for status, count in statuses.items() if status != BUSY)
    if decided > stock:
        checks.append(
            Check(f"{name}: exactly stock ok when demand exceeds stock", oks == stock, f"{oks} ok of {decided} decided")
        )
    unexpected = {status: count for status, count in statuses.items() if status not in CROWD_STATUSES}
    checks.append(Check(f"{name}: only ok, sold_out or busy", not unexpected, repr(unexpected) if unexpected else ""))
    checks.append(Check(f"{name}: every request answered", unanswered == 0, f"{unanswered} unanswered"))
    return checks


def check_echo_case(name: str, statuses: dict[str, int], unanswered: int) -> list[Check]:
    unexpected = {status: count for status, count in statuses.items() if status != ECHOED}
    return [
        Check(f"{name}: only echoed requests came back", not unexpected, repr(unexpected) if unexpected else ""),
        Check(f"{name}: every request answered", unanswered == 0, f"{unanswered} unanswered"),
    ]


def rss_is_flat(start_kibibytes: int, end_kibibytes: int) -> bool:
    allowed = max(RSS_FLAT_GROWTH_KIBIBYTES_MIN, int(start_kibibytes * RSS_FLAT_GROWTH_SHARE))
    return end_kibibytes - start_kibibytes <= allowed


# ---------------------------------------------------------------------------- the run


def build_cases(settings: Settings) -> list[Case]:
    duration = settings.duration_seconds
    open_rate = float(settings.open_rate)
    cases = [
        Case("echo-1", "echo, 1/frame", "echo", False, 1, None, duration),
        Case("memory-1", "soldout memory, 1/frame", "soldout", False, 1, None, duration),
        Case("durable-1", "soldout durable, 1/frame", "soldout", True, 1, None, duration),
        Case("echo-100", "echo, 100/frame", "echo", False, 100, None, duration),
        Case("memory-100", "soldout memory, 100/frame", "soldout", False, 100, None, duration),
        Case("durable-100", "soldout durable, 100/frame", "soldout", True, 100, None, duration),
        Case(
            "open-loop",
            f"open loop {settings.open_rate:,}/s offered, durable, {settings.open_batch}/frame",
            "soldout",
            True,
            settings.open_batch,
            open_rate,
            duration,
        ),
        # The soak's rate is set once the peak is known.
        Case("soak", "soak at half peak, durable, 100/frame", "soldout", True, 100, None, settings.soak_seconds),
    ]
    return [case for case in cases if case.name in settings.cases]


def run(settings: Settings) -> int:
    run_tag = f"r{os.getpid()}"
    print(f"soldout wire benchmark: {shlex.join([sys.executable, '-m', 'bench.wire', *sys.argv[1:]])}")
    print(
        f"{os.cpu_count()} cores; load average {load_average()}; {settings.procs} driver processes, "
        f"{settings.connections} connections, {settings.window} frames in flight per connection (closed loop), "
        f"{settings.warmup_seconds:g} s warm-up + {settings.duration_seconds:g} s measured per case; "
        f"hot SKU {SKU}, stock {settings.stock:,}, limit 1 per buyer, distinct buyers",
        flush=True,
    )
    cases = build_cases(settings)
    results: list[CaseResult] = []
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="soldout-wire-", dir=settings.data_root) as directory:
        workspace = Path(directory)
        pool = DriverPool(settings.procs)
        echo: ServerProcess | None = None
        try:
            if any(case.target == "echo" for case in cases):
                echo = start_echo_server(workspace)
            for planned in cases:
                case = planned
                if case.name == "soak":
                    offered = soak_rate(results, settings)
                    label = f"soak at {offered:,.0f}/s offered, durable, 100/frame"
                    case = replace(case, offered_rate=offered, label=label)
                result = run_one(case, echo, workspace, pool, settings, run_tag, checks)
                results.append(result)
                print(progress_line(result), flush=True)
        finally:
            pool.close()
            if echo is not None:
                echo_exit = echo.stop()
                checks.append(Check("echo server stopped cleanly", echo_exit == 0, f"exit code {echo_exit}"))
    print()
    print(render_table(results))
    print()
    print(render_targets(results, settings))
    print()
    failed = [check for check in checks if not check.passed]
    for check in checks:
        mark = "pass" if check.passed else "FAIL"
        print(f"  {mark}  {check.name}{': ' + check.detail if check.detail else ''}")
    print(f"load average at the end {load_average()}")
    if failed:
        print(f"correctness check FAILED: {len(failed)} of {len(checks)} checks failed")
        return 1
    print(f"correctness check passed: {len(checks)} checks")
    return 0


def run_one(
    case: Case,
    echo: ServerProcess | None,
    workspace: Path,
    pool: DriverPool,
    settings: Settings,
    run_tag: str,
    checks: list[Check],
) -> CaseResult:
    if case.target == "echo":
        assert echo is not None
        result = run_case(case, echo, pool, settings, run_tag)
        checks.extend(check_echo_case(case.name, result.statuses, result.unanswered_requests))
        checks.extend(Check(f"{case.name}: driver error", False, error) for error in result.errors)
        return result
    server = start_soldout_server(workspace, case, settings)
    print(f"  {case.name}: soldout server pid {server.pid} at {server.url}", flush=True)
    try:
        result = run_case(case, server, pool, settings, run_tag)
        result.stock_counts = trio.run(read_stock, server.url)
    finally:
        result_exit = server.stop()
    result.server_exit_code = result_exit
    checks.extend(
        check_soldout_case(case.name, result.statuses, result.stock_counts, settings.stock, result.unanswered_requests)
    )
    checks.append(Check(f"{case.name}: server stopped cleanly", result_exit == 0, f"exit code {result_exit}"))
    checks.extend(Check(f"{case.name}: driver error", False, error) for error in result.errors)
    if case.name == "soak" and result.rss_samples_kibibytes:
        start, end = soak_rss(result)
        checks.append(Check("soak: server answered throughout", result.requests_per_second > 0, ""))
        if not rss_is_flat(start, end):
            print(f"  note: soak RSS grew from {start:,} KiB to {end:,} KiB", flush=True)
    return result


def soak_rate(results: Sequence[CaseResult], settings: Settings) -> float:
    if settings.soak_rate is not None:
        return float(settings.soak_rate)
    peaks = [result.requests_per_second for result in results if result.case.name == "durable-100"]
    if not peaks:
        peaks = [result.requests_per_second for result in results if result.case.target == "soldout"] or [20_000.0]
    return max(1.0, max(peaks) / 2)


def soak_rss(result: CaseResult) -> tuple[int, int]:
    """The RSS once the soak has settled (after a fifth of it, at most 30 s) and at its end."""
    samples = result.rss_samples_kibibytes
    settle_at = min(30.0, result.case.duration_seconds / 5)
    settled = next((rss for moment, rss in samples if moment >= settle_at), samples[-1][1])
    return settled, samples[-1][1]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def milliseconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.2f}"


def progress_line(result: CaseResult) -> str:
    statuses = ", ".join(f"{status} {count:,}" for status, count in sorted(result.statuses.items()))
    return (
        f"  {result.case.name}: {rate(result.requests_per_second)} requests/s, "
        f"p99 {milliseconds(result.latency_milliseconds(99))} ms; server cpu {result.server_cpu_share:.0%}, "
        f"drivers {result.driver_cpu_share:.0%}, other work {result.other_cpu_share:.0%}; {statuses}"
    )


HEADERS = (
    "case",
    "frames/s",
    "requests/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "ratio to echo",
    "server cpu",
    "server us/req",
    "drivers cpu",
    "other cpu",
)


def render_table(results: Sequence[CaseResult]) -> str:
    echo_rates = {result.case.batch: result.requests_per_second for result in results if result.case.target == "echo"}
    rows = []
    for result in results:
        case = result.case
        echo_rate = echo_rates.get(case.batch)
        closed_loop = case.offered_rate is None
        if case.target == "soldout" and closed_loop and echo_rate:
            ratio = f"{result.requests_per_second / echo_rate:.2f}"
        else:
            ratio = "-"
        rows.append(
            [
                case.label,
                rate(result.frames_per_second),
                rate(result.requests_per_second),
                milliseconds(result.latency_milliseconds(50)),
                milliseconds(result.latency_milliseconds(99)),
                milliseconds(result.latency_milliseconds(99.9)),
                ratio,
                f"{result.server_cpu_share:.0%}",
                milliseconds(result.server_cpu_microseconds_per_request),
                f"{result.driver_cpu_share:.0%}",
                f"{result.other_cpu_share:.0%}",
            ]
        )
    return format_table(HEADERS, rows, right_aligned=range(1, len(HEADERS)))


def capacity(result: CaseResult) -> str:
    microseconds = result.server_cpu_microseconds_per_request
    if math.isnan(microseconds) or microseconds <= 0:
        return "server CPU per request unknown"
    return f"server CPU {microseconds:.2f} us per reserve: a whole core would answer about {rate(1e6 / microseconds)}/s"


def cpu_ratio(echo: CaseResult, result: CaseResult) -> str:
    echo_microseconds = echo.server_cpu_microseconds_per_request
    microseconds = result.server_cpu_microseconds_per_request
    if math.isnan(echo_microseconds) or math.isnan(microseconds) or microseconds <= 0:
        return "unknown"
    return f"{echo_microseconds / microseconds:.0%} ({echo_microseconds:.0f} us echo, {microseconds:.0f} us soldout)"


def render_targets(results: Sequence[CaseResult], settings: Settings) -> str:
    by_name = {result.case.name: result for result in results}
    lines = [
        "cpu columns: share of one core over the measured window; 'other' is the rest of the machine's work then;",
        "server us/req: the server's CPU microseconds per request answered (steadier than rates on a shared machine)",
        "",
        "targets",
    ]
    if settings.quick:
        lines.append("  (quick run: small sizes and short runs, the figures do not measure the targets)")

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    durable = by_name.get("durable-100")
    if durable is not None:
        measured = durable.requests_per_second
        lines.append(
            f"  hot SKU, {settings.connections} connections, batches of 100, durable, one server process: "
            f"{TARGET_DURABLE_BATCH_RATE:,} reserves/s -> {rate(measured)}/s "
            f"({verdict(measured >= TARGET_DURABLE_BATCH_RATE)}); "
            f"{capacity(durable)}"
        )
    echo = by_name.get("echo-1")
    for name in ("memory-1", "durable-1"):
        result = by_name.get(name)
        if result is not None and echo is not None and echo.requests_per_second > 0:
            ratio = result.requests_per_second / echo.requests_per_second
            lines.append(
                f"  one request per frame, {name.split('-')[0]}: >= {TARGET_SINGLE_RATIO:.0%} of echo's "
                f"{rate(echo.requests_per_second)}/s -> {ratio:.0%} ({verdict(ratio >= TARGET_SINGLE_RATIO)}); "
                f"by server CPU per request {cpu_ratio(echo, result)}"
            )
    open_loop = by_name.get("open-loop")
    if open_loop is not None:
        p99 = open_loop.latency_milliseconds(99)
        met = p99 <= TARGET_OPEN_LOOP_P99_MILLISECONDS and settings.open_rate >= TARGET_OPEN_LOOP_RATE
        lines.append(
            f"  p99 <= {TARGET_OPEN_LOOP_P99_MILLISECONDS:g} ms at {TARGET_OPEN_LOOP_RATE:,}/s offered open loop, "
            f"durable -> p99 {milliseconds(p99)} ms with {settings.open_rate:,}/s offered, "
            f"{rate(open_loop.requests_per_second)}/s answered, drivers up to "
            f"{open_loop.send_lateness_max_seconds * 1000:.1f} ms behind schedule ({verdict(met)})"
        )
    soak = by_name.get("soak")
    if soak is not None and soak.rss_samples_kibibytes:
        idle = soak.rss_samples_kibibytes[0][1]
        start, end = soak_rss(soak)
        peak = max(rss for _, rss in soak.rss_samples_kibibytes)
        flat = rss_is_flat(start, end)
        met = flat and soak.case.duration_seconds >= TARGET_SOAK_SECONDS
        lines.append(
            f"  {TARGET_SOAK_SECONDS // 60}-minute run at half peak with flat RSS -> "
            f"{soak.case.duration_seconds:g} s at {rate(soak.offered_per_second or 0)}/s offered, "
            f"{rate(soak.requests_per_second)}/s answered, p99 {milliseconds(soak.latency_milliseconds(99))} ms; "
            f"server RSS idle {idle / 1024:,.1f} MiB, settled {start / 1024:,.1f} MiB, end {end / 1024:,.1f} MiB, "
            f"peak {peak / 1024:,.1f} MiB ({'flat' if flat else 'GROWING'}; {verdict(met)})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.wire", description="Reserves per second over websockets into one soldout server."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and a short soak (a smoke run)")
    parser.add_argument("--soak", type=float, help="soak seconds at half the peak rate (300; --quick: 5)")
    parser.add_argument("--procs", type=int, default=2, help="load-driver processes (2)")
    parser.add_argument("--connections", type=int, help="websocket connections over all drivers (16; --quick: 4)")
    parser.add_argument("--window", type=int, default=4, help="frames in flight per connection, closed loop (4)")
    parser.add_argument("--duration", type=float, help="measured seconds per case (10; --quick: 1)")
    parser.add_argument("--warmup", type=float, help="seconds of load before measuring (1; --quick: 0.3)")
    parser.add_argument("--stock", type=int, help="units of the hot SKU (10,000; --quick: 1,000)")
    parser.add_argument("--shards", type=int, default=8, help="the server's shards (8)")
    parser.add_argument("--open-rate", type=int, help="reserves/s offered in open loop (100,000; --quick: 5,000)")
    parser.add_argument("--open-batch", type=int, help="requests per frame in the open-loop case (50; --quick: 10)")
    parser.add_argument("--soak-rate", type=int, help="reserves/s offered in the soak (default: half the peak)")
    parser.add_argument("--cases", help=f"comma-separated cases to run (all: {','.join(CASE_NAMES)})")
    parser.add_argument("--data-root", help="where the durable servers' temporary data directories go")
    parser.add_argument(
        "--server-module",
        default="engine.cli",
        help="module run as `python -m MODULE serve --config FILE` for the soldout server (engine.cli)",
    )
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--echo-port", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def settings_from(arguments: argparse.Namespace) -> Settings:
    quick = arguments.quick

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    cases = tuple(CASE_NAMES)
    if arguments.cases:
        cases = tuple(name.strip() for name in arguments.cases.split(",") if name.strip())
        unknown = [name for name in cases if name not in CASE_NAMES]
        if unknown:
            raise SystemExit(f"unknown cases: {', '.join(unknown)} (known: {', '.join(CASE_NAMES)})")
    settings = Settings(
        quick=quick,
        procs=arguments.procs,
        connections=pick(arguments.connections, 16, 4),
        window=arguments.window,
        warmup_seconds=pick(arguments.warmup, 1.0, 0.3),
        duration_seconds=pick(arguments.duration, 10.0, 1.0),
        stock=pick(arguments.stock, 10_000, 1_000),
        shards=arguments.shards,
        open_rate=pick(arguments.open_rate, TARGET_OPEN_LOOP_RATE, 5_000),
        open_batch=pick(arguments.open_batch, 50, 10),
        soak_seconds=pick(arguments.soak, float(TARGET_SOAK_SECONDS), 5.0),
        soak_rate=arguments.soak_rate,
        cases=cases,
        data_root=arguments.data_root,
        server_module=arguments.server_module,
    )
    if settings.procs < 1 or settings.connections < settings.procs:
        raise SystemExit("--procs must be at least 1 and --connections at least --procs")
    if settings.window < 1 or settings.duration_seconds <= 0 or settings.soak_seconds <= 0:
        raise SystemExit("--window, --duration and --soak must be positive")
    if settings.open_rate < 1 or not 1 <= settings.open_batch <= 1000:
        raise SystemExit("--open-rate must be positive and --open-batch from 1 to 1000")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.echo_server:
        trio.run(serve_echo, arguments.echo_port)
        return 0
    return run(settings_from(arguments))


if __name__ == "__main__":
    sys.exit(main())
