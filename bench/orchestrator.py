"""The orchestrator: the processes of a bench run and what is read from them.

It starts the servers a run drives (`soldout serve` with a throwaway config, the echo
server), starts the driver processes (multiprocessing, 'spawn'), gives them one start
time once every one has its connections open (the barrier), shows a live progress line
while they drive, collects their results, and reads the CPU and RSS of processes from
/proc around the run. It never decides what a request means (bench/driver.py) and
never judges a figure: it measures.
"""

from __future__ import annotations

import contextlib
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
from typing import Any, Protocol

from bench.driver import PROGRESS_FIELDS, DriverResult, DriverSettings, process_main
from bench.scenarios import Scenario, split, split_weighted

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_SECONDS_MAX = 60.0
SERVER_STOP_SECONDS_MAX = 60.0
DRIVERS_READY_SECONDS_MAX = 120.0
# The drivers start together this long after the last one is ready.
START_DELAY_SECONDS = 0.05
PROGRESS_REFRESH_SECONDS = 0.25
# Without a terminal, the progress goes to the log this often.
PROGRESS_LOG_SECONDS = 5.0
RSS_SAMPLE_SECONDS = 1.0
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The bench cannot go on; the message says why."""


# ---------------------------------------------------------------- /proc readers


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and its threads, from /proc; None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def machine_busy_cpu_seconds() -> float | None:
    """CPU seconds every core of the machine spent busy since boot (not idle, not waiting)."""
    try:
        with open("/proc/stat") as file:
            values = [int(value) for value in file.readline().split()[1:]]
    except OSError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # Guest time is already counted in user time.
    return (sum(values[:8]) - idle) / CLOCK_TICKS_PER_SECOND


def rss_kibibytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Usage:
    """What a server and the machine spent over one run: CPU read from /proc (or from
    `cpu_seconds`) at the start barrier and once every driver has reported, and the
    server's RSS sampled about once a second in between."""

    def __init__(self, pid: int | None, cpu_seconds: Callable[[], float | None] | None = None) -> None:
        self.pid = pid
        self._read_cpu = cpu_seconds or (lambda: process_cpu_seconds(pid))
        self.server_cpu_seconds: float | None = None
        self.machine_cpu_seconds: float | None = None
        # (seconds since the start, KiB) of the server.
        self.rss_samples_kibibytes: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._before: tuple[float | None, float | None] = (None, None)

    def start(self) -> None:
        self._before = (self._read_cpu(), machine_busy_cpu_seconds())
        if self.pid is not None:
            self._sampler = threading.Thread(target=self._sample, args=(time.monotonic(),), daemon=True)
            self._sampler.start()

    def _sample(self, started: float) -> None:
        while True:
            self._sample_once(started)
            if self._stop.wait(RSS_SAMPLE_SECONDS):
                self._sample_once(started)
                return

    def _sample_once(self, started: float) -> None:
        rss = rss_kibibytes(self.pid) if self.pid is not None else None
        if rss is not None:
            self.rss_samples_kibibytes.append((time.monotonic() - started, rss))

    def stop(self) -> None:
        server_after, machine_after = self._read_cpu(), machine_busy_cpu_seconds()
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        server_before, machine_before = self._before
        if server_before is not None and server_after is not None:
            self.server_cpu_seconds = server_after - server_before
        if machine_before is not None and machine_after is not None:
            self.machine_cpu_seconds = machine_after - machine_before


# ---------------------------------------------------------------- server processes


@dataclass(frozen=True)
class Server:
    """A server a run drives: its URL, tokens, and its process when the bench started it."""

    url: str
    token: str | None
    admin_token: str | None
    pid: int | None = None


def server_config_text(*, durable: bool, data_dir: str, shards: int | None, frontend: str, admin: str) -> str:
    lines = ["[server]", 'host = "127.0.0.1"', "port = 0", "metrics_port = false", "[engine]"]
    if shards is not None:
        lines.append(f"shards = {shards}")
    if durable:
        lines += [f"data_dir = {_toml_string(data_dir)}", "durable = true"]
    lines += ["[auth]", f"frontend_tokens = [{_toml_string(frontend)}]", f"admin_tokens = [{_toml_string(admin)}]"]
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextlib.contextmanager
def spawned_soldout(*, durable: bool, shards: int | None = None, module: str = "engine.cli") -> Iterator[Server]:
    """`python -m engine.cli serve` with a throwaway config, stopped with SIGTERM after."""
    frontend = "front-" + secrets.token_hex(8)
    admin = "admin-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="soldout-bench-") as directory:
        config = Path(directory, "bench.toml")
        data_dir = str(Path(directory, "data"))
        config.write_text(
            server_config_text(durable=durable, data_dir=data_dir, shards=shards, frontend=frontend, admin=admin)
        )
        command = [sys.executable, "-m", module, "serve", "--config", str(config), "--log-level", "WARNING"]
        with spawned_process("the spawned server", command, "soldout serving ", Path(directory)) as (url, pid):
            yield Server(url, frontend, admin, pid)


@contextlib.contextmanager
def spawned_echo() -> Iterator[Server]:
    """The echo server (bench/echo.py) in its own process."""
    with tempfile.TemporaryDirectory(prefix="soldout-echo-") as directory:
        command = [sys.executable, "-m", "bench.echo"]
        with spawned_process("the echo server", command, "echo serving ", Path(directory)) as (url, pid):
            yield Server(url, None, None, pid)


class ServerProcess:
    """A server process the bench starts and stops by its pid: ready once it prints
    `ready_prefix URL`; stopped with SIGTERM, or killed on purpose (a crash the bench
    causes, which then is no error)."""

    def __init__(self, name: str, command: list[str], ready_prefix: str, directory: Path) -> None:
        self.name = name
        self.command = command
        self.ready_prefix = ready_prefix
        self.log_path = directory / f"{_file_name(name)}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.killed = False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> str:
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), environment.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=PROJECT_ROOT,
                env=environment,
            )
        try:
            self.url = _wait_until_serving(self.name, self.process, self.ready_prefix, self.log_path)
        except BaseException:
            self.kill()
            raise
        return self.url

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, as a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=SERVER_STOP_SECONDS_MAX)
        self.killed = True

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.name, self.process, self.log_path, killed=self.killed)


def _file_name(name: str) -> str:
    return "".join(character if character.isalnum() else "-" for character in name).strip("-") or "server"


@contextlib.contextmanager
def spawned_process(name: str, command: list[str], ready_prefix: str, directory: Path) -> Iterator[tuple[str, int]]:
    """Start `command`, wait for the line `ready_prefix URL` on its stdout; yields (URL, pid).
    Stopped with SIGTERM after; one that does not stop, or exits non-zero, is an error."""
    server = ServerProcess(name, command, ready_prefix, directory)
    url = server.start()
    try:
        yield url, server.pid
    finally:
        server.stop()


def _wait_until_serving(name: str, process: subprocess.Popen[bytes], ready_prefix: str, log_path: Path) -> str:
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        # Read to the end, so the server never blocks on a full pipe; the pipe is closed
        # when the server is stopped, which may end this read.
        with contextlib.suppress(ValueError, OSError):
            for raw in process.stdout:
                lines.put(raw.decode(errors="replace").strip())
        lines.put(None)

    threading.Thread(target=read, name="soldout-bench-server-stdout", daemon=True).start()
    deadline = time.monotonic() + SERVER_START_SECONDS_MAX
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"{name} did not start in {SERVER_START_SECONDS_MAX:.0f} s") from None
        if line is None:
            process.wait(timeout=10)
            raise BenchError(f"{name} exited ({process.returncode}):\n{_tail(log_path)}")
        if line.startswith(ready_prefix):
            return line.removeprefix(ready_prefix).strip()


def _stop(name: str, process: subprocess.Popen[bytes], log_path: Path, *, killed: bool = False) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SERVER_STOP_SECONDS_MAX)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise BenchError(f"{name} did not stop on SIGTERM:\n{_tail(log_path)}") from None
    if process.stdout is not None:
        process.stdout.close()
    if killed and process.returncode == -signal.SIGKILL:
        return
    if process.returncode not in (0, -signal.SIGTERM):
        raise BenchError(f"{name} exited with status {process.returncode}:\n{_tail(log_path)}")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


# ---------------------------------------------------------------- the driver processes


@dataclass(frozen=True)
class Load:
    """How the crowd is driven: processes, connections, and each connection's window."""

    procs: int
    connections: int
    batch: int
    inflight: int
    rate: float | None
    duration_seconds: float | None
    show_progress: bool
    # The crowd starts then (a configured sale's opening time), or right away.
    start_at_epoch: float | None = None

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


class Meter(Protocol):
    """What is read from the start to the last result (a Usage, or the CPU of a cluster's roles)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def run_drivers(
    load: Load,
    settings: Sequence[DriverSettings],
    label: str,
    total_stock: int,
    usage: Meter | None = None,
    *,
    started: Callable[[], None] | None = None,
) -> list[DriverResult]:
    """Start the driver processes, start them together, show progress, collect their results;
    `usage` is read from the start to the last result; `started` is called at the start."""
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
            kind, index, payload = _next_message(messages, processes, deadline)
            if kind == "ready":
                ready.add(index)
        # The barrier: every driver has its connections open; they all start at once.
        start = time.monotonic() + START_DELAY_SECONDS
        if load.start_at_epoch is not None:
            wait = load.start_at_epoch - time.time()
            if wait > 0:
                print(f"waiting {wait:.1f} s for the sale to open", flush=True)
            start = max(start, time.monotonic() + wait)
        start_value.value = start
        go.set()
        if usage is not None:
            usage.start()
        if started is not None:
            started()
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
        if usage is not None:
            usage.stop()
        for process in processes:
            process.join(timeout=30)
        return [results[index] for index in sorted(results)]
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        messages.close()


def _next_message(messages: Any, processes: Sequence[Any], deadline: float) -> tuple[str, int, Any]:
    while True:
        try:
            kind, index, payload = messages.get(timeout=0.2)
        except queue.Empty:
            _check_alive(processes)
            if time.monotonic() > deadline:
                raise BenchError("the driver processes took too long to connect") from None
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
