"""Helpers for the end-to-end tests of the wire: raw websocket frames, servers in-process
and as real processes, a TCP proxy that can cut connections, and a load that keeps a
ledger of every hold the server acknowledged.

Everything here runs over real loopback sockets; nothing here fakes the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

from engine.api import Engine, open_engine
from engine.config import EngineConfig
from engine.server.config import ServerConfig, SkuSettings
from engine.server.gateway import Gateway
from engine.server.runner import RunningServer, open_server, put_configured_skus
from protocol.client import Client, open_client
from protocol.limits import Limits

FRONTEND_TOKEN = "front-secret"
ADMIN_TOKEN = "admin-secret"
# Epoch seconds the settable wall clock starts at (2023-11-14), as in conftest.
WALL_CLOCK_START = 1_700_000_000.0
REPOSITORY = Path(__file__).resolve().parent.parent
# Large enough for any reply frame a test provokes (a batch of 1000 replies).
CLIENT_MESSAGE_BYTES_MAX = 16 * 1024 * 1024


class SettableWallClock:
    """Epoch seconds that move only when a test says so: hold expiry and sale windows on demand."""

    def __init__(self, now: float = WALL_CLOCK_START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "wall-clock time only moves forward in these tests"
        self.now += seconds


def server_config(
    *,
    skus: Sequence[SkuSettings] = (),
    limits: Limits | None = None,
    tokens: bool = True,
    data_dir: str | None = None,
    wall_clock: Callable[[], float] | None = None,
    shards: int = 4,
    metrics_port: int | None = None,
    host: str = "127.0.0.1",
    metrics_host: str = "127.0.0.1",
    shutdown_grace_seconds: float = 10.0,
) -> ServerConfig:
    """A ServerConfig on an ephemeral loopback port; metrics off unless a port is given."""
    engine_options: dict[str, Any] = {"shards": shards, "data_dir": data_dir, "limits": limits or Limits()}
    if wall_clock is not None:
        engine_options["wall_clock"] = wall_clock
    return ServerConfig(
        host=host,
        port=0,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        shutdown_grace_seconds=shutdown_grace_seconds,
        engine=EngineConfig(**engine_options),
        frontend_tokens=(FRONTEND_TOKEN,) if tokens else (),
        admin_tokens=(ADMIN_TOKEN,) if tokens else (),
        skus=tuple(skus),
    )


def bearer(token: str | None) -> list[tuple[bytes, bytes]]:
    return [] if token is None else [(b"Authorization", f"Bearer {token}".encode())]


@asynccontextmanager
async def open_raw(
    url: str, token: str | None = FRONTEND_TOKEN, *, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A bare websocket to `url`: the test writes and reads msgpack frames itself."""
    async with open_websocket_url(
        url,
        extra_headers=bearer(token) if headers is None else headers,
        max_message_size=CLIENT_MESSAGE_BYTES_MAX,
    ) as websocket:
        yield websocket


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes | str) -> Any:
    assert isinstance(payload, bytes), f"the server answered with a text frame: {payload!r:.100}"
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


async def send(websocket: WebSocketConnection, message: Any) -> None:
    await websocket.send_message(pack(message))


async def receive(websocket: WebSocketConnection) -> Any:
    return unpack(await websocket.get_message())


async def exchange(websocket: WebSocketConnection, message: Any) -> Any:
    """Send one frame holding `message` and return the frame that answers it."""
    await send(websocket, message)
    return await receive(websocket)


async def exchange_bytes(websocket: WebSocketConnection, payload: bytes) -> Any:
    await websocket.send_message(payload)
    return await receive(websocket)


async def close_code_after(websocket: WebSocketConnection, payload: bytes | str) -> int | None:
    """Send `payload`, then read until the server closes; the close code it chose."""
    await websocket.send_message(payload)
    while True:
        try:
            await websocket.get_message()
        except ConnectionClosed as closed:
            return closed.reason.code


async def wire_counts(url: str, sku: str, token: str | None = ADMIN_TOKEN) -> tuple[int, int, int, int]:
    """(stock, available, held, sold) of `sku`, asked over a fresh connection."""
    async with open_raw(url, token) as websocket:
        reply = await exchange(websocket, {"id": 1, "op": "stock", "sku": sku})
    assert reply["status"] == "ok", reply
    assert reply["available"] == reply["stock"] - reply["held"] - reply["sold"], reply
    return reply["stock"], reply["available"], reply["held"], reply["sold"]


def reserve_map(request_id: int, sku: str, buyer: str, *, qty: int = 1, key: str | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"id": request_id, "op": "reserve", "sku": sku, "buyer": buyer, "qty": qty}
    if key is not None:
        request["key"] = key
    return request


class ClientStreams:
    """Records every TCP stream the test's websocket clients open, and closes them.

    trio-websocket's client leaves its stream open when the server refuses the handshake,
    closes the connection or drops it; `refusal` closes a refused stream at once (the
    server waits for it), and `release` closes the rest when the test ends, rather
    than leave them to the garbage collector.
    """

    def __init__(self) -> None:
        self.opened: list[trio.SocketStream] = []

    def install(self, monkeypatch: Any) -> None:
        original = trio.open_tcp_stream

        async def recording(*args: Any, **kwargs: Any) -> trio.SocketStream:
            stream = await original(*args, **kwargs)
            self.opened.append(stream)
            return stream

        monkeypatch.setattr(trio, "open_tcp_stream", recording)

    async def close_from(self, first: int) -> None:
        for stream in self.opened[first:]:
            await stream.aclose()

    def release(self) -> None:
        """Close every stream still open; for after the trio run has ended."""
        for stream in self.opened:
            if stream.socket.fileno() != -1:
                os.close(stream.socket.detach())
        self.opened.clear()

    async def refusal(self, url: str, headers: list[tuple[bytes, bytes]]) -> ConnectionRejected:
        """The refusal a websocket handshake to `url` with `headers` meets; fails if accepted."""
        first = len(self.opened)
        try:
            async with open_raw(url, headers=headers):
                pass
        except ConnectionRejected as refused:
            rejection = refused
        else:
            raise AssertionError(f"{url} accepted a handshake with headers {headers}")
        finally:
            await self.close_from(first)
        return rejection

    @asynccontextmanager
    async def open_client(self, url: str, token: str | None = None, **options: Any) -> AsyncIterator[Client]:
        """`protocol.client.open_client`, with any socket the client leaves open closed when
        the block ends (test_client.py checks that it leaves none)."""
        first = len(self.opened)
        try:
            async with open_client(url, token, **options) as client:
                yield client
        finally:
            await self.close_from(first)


def fetch_text(url: str) -> str:
    """GET `url` (blocking: run it in a worker thread)."""
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


# ------------------------------------------------------------------ a TCP proxy


class TcpProxy:
    """Forwards loopback TCP connections to `upstream_port`.

    `cut()` drops every connection it carries at once, as a network failure would;
    with `drop_replies` set, what the server sends is read and thrown away, so requests
    reach the server and are decided while their replies never arrive. While `pause()`d
    (no upstream, as while a server restarts), new connections wait for `resume(port)`.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port: int | None = upstream_port
        self.port = 0
        self.drop_replies = False
        self.connections = 0
        self._scopes: set[trio.CancelScope] = set()
        self._upstream_ready = trio.Event()
        self._upstream_ready.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def cut(self) -> int:
        """Drop every connection now; returns how many there were."""
        live = [scope for scope in self._scopes if not scope.cancel_called]
        for scope in live:
            scope.cancel()
        return len(live)

    def pause(self) -> None:
        self.upstream_port = None
        self._upstream_ready = trio.Event()

    def resume(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._upstream_ready.set()

    async def _handle(self, downstream: trio.SocketStream) -> None:
        async with downstream:
            await self._upstream_ready.wait()
            assert self.upstream_port is not None
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            except OSError:
                return  # the server is down: the client sees its connection close
            self.connections += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with upstream, trio.open_nursery() as pumps:
                        pumps.start_soon(self._pump, downstream, upstream, False, pumps.cancel_scope)
                        pumps.start_soon(self._pump, upstream, downstream, True, pumps.cancel_scope)
                finally:
                    self._scopes.discard(scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, replies: bool, pair: trio.CancelScope
    ) -> None:
        try:
            async for data in source:
                if replies and self.drop_replies:
                    continue
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pair.cancel()  # one side is gone: so is the other


@asynccontextmanager
async def open_tcp_proxy(upstream_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(upstream_port)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        proxy.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, proxy._handle, listeners)
        try:
            yield proxy
        finally:
            proxy.cut()
            nursery.cancel_scope.cancel()


class BackgroundServer:
    """An in-process server in a task of its own, so that it can stop while other blocks go on."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: RunningServer | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with open_server(self.config) as server:
                self.server = server
                task_status.started(server)
                await self._stop.wait()
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()


# ------------------------------------------------------------ a gated engine


class GatedEngine:
    """An engine whose decisions wait for `gate`: requests stay in flight until the test opens it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gate = trio.Event()
        self.commands_handed = 0

    async def decide(self, commands: Sequence[Any]) -> list[Any]:
        self.commands_handed += len(commands)
        await self.gate.wait()
        return await self.engine.decide(commands)

    def statistics(self) -> Any:
        return self.engine.statistics()

    def sku_counts(self) -> Any:
        return self.engine.sku_counts()


@asynccontextmanager
async def serving_gated(config: ServerConfig) -> AsyncIterator[tuple[str, GatedEngine, Engine, Gateway]]:
    """A gateway (the real one, on a real socket) in front of a gated engine."""
    async with open_engine(config.engine) as engine:
        await put_configured_skus(engine, config)
        gated = GatedEngine(engine)
        gateway = Gateway(gated, config)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gateway.serve)
            try:
                yield f"ws://127.0.0.1:{port}/v1", gated, engine, gateway
            finally:
                gated.gate.set()
                gateway.shutdown()


# ------------------------------------------------------------ server processes


@dataclass
class ServerProcess:
    """A `soldout serve` process and the address it printed."""

    process: trio.Process
    url: str
    output: bytes
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def read_rest_of_output(self) -> str:
        """Everything the process printed, once it has exited."""
        assert self.process.stdout is not None
        chunks = [self.output]
        async for chunk in self.process.stdout:
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


# Runs `soldout ARGUMENTS` under a descriptor limit (soft and hard), so that the server
# cannot raise it back.
_LIMITED_LAUNCH = (
    "import resource, sys; limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)); "
    "from engine.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def soldout_command(*arguments: str, descriptor_limit: int | None = None) -> list[str]:
    if descriptor_limit is None:
        return [sys.executable, "-m", "engine.cli", *arguments]
    return [sys.executable, "-c", _LIMITED_LAUNCH, str(descriptor_limit), *arguments]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def resident_mib(pid: int) -> float:
    """The process's resident set (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def descriptors_open_here() -> int:
    """Descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd")) - 1


def process_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = str(REPOSITORY)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


@asynccontextmanager
async def run_server_process(
    arguments: Sequence[str], stderr_path: Path, *, descriptor_limit: int | None = None
) -> AsyncIterator[ServerProcess]:
    """Start `soldout serve ARGUMENTS`, wait for its address, and kill it when the block ends."""
    stderr_descriptor = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        process = await trio.lowlevel.open_process(
            soldout_command("serve", *arguments, descriptor_limit=descriptor_limit),
            stdout=subprocess.PIPE,
            stderr=stderr_descriptor,
            cwd=str(REPOSITORY),
            env=process_environment(),
        )
    finally:
        os.close(stderr_descriptor)
    try:
        url, output = await _read_address(process, stderr_path)
        yield ServerProcess(process, url, output, stderr_path)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def _read_address(process: trio.Process, stderr_path: Path) -> tuple[str, bytes]:
    """The ws:// address from the line "soldout serving ws://HOST:PORT/v1"."""
    assert process.stdout is not None
    output = b""
    with trio.fail_after(60):  # a guard against a hang, not a measurement
        while True:
            for line in output.split(b"\n")[:-1]:
                if line.startswith(b"soldout serving "):
                    return line.split()[-1].decode(), output
            chunk = await process.stdout.receive_some(65536)
            if not chunk:
                await process.wait()
                stderr = await trio.Path(stderr_path).read_text(errors="replace")
                raise AssertionError(
                    f"soldout serve exited with {process.returncode} before serving; "
                    f"stdout: {output.decode(errors='replace')!r}; stderr: {stderr}"
                )
            output += chunk


async def stop_with_signal(server: ServerProcess, signal_number: int = signal.SIGTERM) -> int:
    server.process.send_signal(signal_number)
    with trio.fail_after(60):  # a guard against a hang, not a measurement
        return await server.process.wait()


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------ a load with a ledger


@dataclass
class Ledger:
    """What the server acknowledged: holds by key, and confirms, as the load saw them."""

    sku: str
    holds: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (buyer, reservation)
    confirmed: dict[str, str] = field(default_factory=dict)  # reservation -> buyer
    statuses: dict[str, int] = field(default_factory=dict)
    enough: trio.Event = field(default_factory=trio.Event)
    enough_holds: int = 1
    close_codes: list[int] = field(default_factory=list)

    def count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def load_until_closed(
    url: str,
    token: str | None,
    ledger: Ledger,
    connection: int,
    *,
    frame_requests: int = 50,
    frames_inflight_max: int = 4,
    confirm_every: int = 5,
) -> None:
    """Reserve for new buyers (and confirm some acknowledged holds) until the server goes.

    Every reserve carries a key; every reply that says ok goes into `ledger`. Frames are
    pipelined, at most `frames_inflight_max` unanswered at once.
    """
    requests: dict[int, dict[str, Any]] = {}
    window = trio.Semaphore(frames_inflight_max)
    to_confirm: list[tuple[str, str]] = []
    next_id = 0

    async def sender(websocket: WebSocketConnection) -> None:
        nonlocal next_id
        frame_number = 0
        while True:
            await window.acquire()
            frame = []
            while to_confirm and len(frame) < frame_requests // 5:
                reservation, buyer = to_confirm.pop()
                next_id += 1
                frame.append({"id": next_id, "op": "confirm", "reservation": reservation, "buyer": buyer})
            while len(frame) < frame_requests:
                next_id += 1
                name = f"{connection}-{frame_number}-{len(frame)}"
                frame.append(reserve_map(next_id, ledger.sku, f"buyer-{name}", key=f"key-{name}"))
            frame_number += 1
            for request in frame:
                requests[request["id"]] = request
            try:
                await websocket.send_message(pack(frame))
            except (ConnectionClosed, trio.BrokenResourceError):
                return  # the reader hears why

    async def reader(websocket: WebSocketConnection) -> None:
        while True:
            try:
                payload = await websocket.get_message()
            except ConnectionClosed as closed:
                ledger.close_codes.append(closed.reason.code)
                return
            replies = unpack(payload)
            assert isinstance(replies, list), replies
            for reply in replies:
                request = requests.pop(reply["id"])
                ledger.count(f"{request['op']}:{reply['status']}")
                if reply["status"] != "ok":
                    continue
                if request["op"] == "reserve":
                    ledger.holds[request["key"]] = (request["buyer"], reply["reservation"])
                    if len(ledger.holds) % confirm_every == 0:
                        to_confirm.append((reply["reservation"], request["buyer"]))
                    if len(ledger.holds) >= ledger.enough_holds:
                        ledger.enough.set()
                elif request["op"] == "confirm":
                    ledger.confirmed[request["reservation"]] = request["buyer"]
            window.release()

    async with open_raw(url, token) as websocket, trio.open_nursery() as nursery:
        nursery.start_soon(sender, websocket)
        await reader(websocket)
        nursery.cancel_scope.cancel()


async def check_ledger_after_restart(url: str, ledger: Ledger, *, batch: int = 500) -> None:
    """Every acknowledged hold is there: the same key gives back the same reservation,
    and every acknowledged confirm stuck (cancelling it now is a conflict)."""
    holds = list(ledger.holds.items())
    async with open_raw(url, ADMIN_TOKEN) as websocket:
        for start in range(0, len(holds), batch):
            chunk = holds[start : start + batch]
            frame = [
                reserve_map(start + index, ledger.sku, buyer, key=key) for index, (key, (buyer, _)) in enumerate(chunk)
            ]
            replies = await exchange(websocket, frame)
            for (key, (_, reservation)), reply in zip(chunk, replies, strict=True):
                assert reply["status"] == "ok", (key, reply)
                assert reply["reservation"] == reservation, f"key {key} gave a second hold: {reply}"
        confirmed = list(ledger.confirmed.items())
        for start in range(0, len(confirmed), batch):
            chunk = confirmed[start : start + batch]
            frame = [
                {"id": start + index, "op": "cancel", "reservation": reservation, "buyer": buyer}
                for index, (reservation, buyer) in enumerate(chunk)
            ]
            replies = await exchange(websocket, frame)
            for (reservation, _), reply in zip(chunk, replies, strict=True):
                assert reply["status"] == "conflict", f"confirmed hold {reservation} was not kept: {reply}"


# ------------------------------------------------------------ a websocket peer in bytes

OPCODE_CONTINUATION = 0x0
OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
HANDSHAKE_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(path: str = "/v1", headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The bytes of a websocket upgrade request (RFC 6455 section 4.1) with `headers` added."""
    lines = [
        f"GET {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + HANDSHAKE_KEY,
        b"Sec-WebSocket-Version: 13",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def frame_bytes(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv1: bool = False, masked: bool = True
) -> bytes:
    """One websocket frame, built by hand so that a test can break any rule of RFC 6455."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0x80 if masked else 0
    length = len(payload)
    if length < 126:
        header = bytes([first, mask_bit | length])
    elif length < 65536:
        header = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return header + payload
    mask = b"\x11\x22\x33\x44"
    return header + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


class RawPeer:
    """A TCP connection to a server that speaks websocket bytes by hand.

    For what no client library will send: half-open connections, bad frames, a peer that
    never answers the close, headers twice.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at end of stream (or a reset)."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return False
        self.buffer += data
        return bool(data)

    async def http_response(self) -> tuple[int, bytes]:
        """The status code and the raw head of the server's HTTP response; 0 if it hung up first."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                return 0, bytes(self.buffer)
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        return int(head.split(b" ", 2)[1]), head

    async def upgrade(self, path: str = "/v1", headers: Sequence[tuple[bytes, bytes]] = ()) -> int:
        """Send an upgrade request; the HTTP status that answers it."""
        await self.stream.send_all(upgrade_request(path, headers))
        status, _ = await self.http_response()
        return status

    async def send_frame(self, opcode: int, payload: bytes = b"", **options: bool) -> None:
        await self.stream.send_all(frame_bytes(opcode, payload, **options))

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next frame from the server (opcode, payload); None at end of stream."""
        while True:
            data = self.buffer
            if len(data) >= 2:
                length = data[1] & 0x7F
                start = 2
                if length == 126:
                    start, length = 4, int.from_bytes(data[2:4], "big")
                elif length == 127:
                    start, length = 10, int.from_bytes(data[2:10], "big")
                if len(data) >= start + length:
                    opcode = data[0] & 0x0F
                    payload = bytes(data[start : start + length])
                    del data[: start + length]
                    return opcode, payload
            if not await self._fill():
                return None

    async def close_code(self) -> int | None:
        """Read until the server's close frame: its code; None if the server hung up without one."""
        while True:
            frame = await self.read_frame()
            if frame is None:
                return None
            opcode, payload = frame
            if opcode == OPCODE_CLOSE:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005

    async def wait_for_hang_up(self) -> None:
        """Read and discard until the server closes the connection."""
        while await self._fill():
            self.buffer.clear()


class NonReadingPeer:
    """A websocket peer that sends and never reads: a stuck frontend, or a hostile one.

    Its receive buffer is made tiny; batches of pings fill the server's socket and the
    connection's outbox with replies; then it sends `register` frames of about
    `frame_bytes` (one request each, to an unknown SKU) until the server stops reading.
    """

    PING_FRAMES = 100
    PINGS_PER_FRAME = 200

    def __init__(self, port: int, token: str = FRONTEND_TOKEN, *, frame_bytes: int = 1_000_000) -> None:
        self.port = port
        self.token = token
        self.frame_bytes = frame_bytes
        self.bytes_sent = 0
        self.peer: RawPeer | None = None

    async def run(self) -> None:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", self.port))
        self.peer = RawPeer(trio.SocketStream(sock))
        assert await self.peer.upgrade(headers=bearer(self.token)) == 101
        pings = frame_bytes(OPCODE_BINARY, pack([{"id": i, "op": "ping"} for i in range(self.PINGS_PER_FRAME)]))
        name_bytes = 250
        buyers = [f"{index:08d}".ljust(name_bytes, "b") for index in range(self.frame_bytes // (name_bytes + 2))]
        register = frame_bytes(OPCODE_BINARY, pack({"id": 1, "op": "register", "sku": "NO-SUCH-SKU", "buyers": buyers}))
        for payload in [pings] * self.PING_FRAMES + [register] * 1_000_000:
            await self.peer.stream.send_all(payload)
            self.bytes_sent += len(payload)

    async def aclose(self) -> None:
        if self.peer is not None:
            await self.peer.aclose()


async def http_get(
    port: int, path: str, headers: Sequence[tuple[bytes, bytes]] = (), *, method: str = "GET"
) -> tuple[int, bytes]:
    """One HTTP/1.1 request to 127.0.0.1:port, in bytes; (status, body) of the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *(n + b": " + v for n, v in headers)]
        await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses something on this machine listens on at TCP `port` (Linux)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses
