"""The gateway: soldout's websocket server (protocol v1, see protocol/SPEC.md).

It authenticates the upgrade request, then gives each connection one reader (the only
code that takes frames off the socket) and one writer (the only code that puts replies
on it). Each frame's requests go to the engine's batch entry point, which groups them
by shard; replies are queued to the writer as they complete, so frames may be answered
out of order. A connection over its in-flight bound is answered `busy` without queueing;
a slow reader fills only its own outbox and stops only its own reader.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from engine.api import Engine, EngineClosed
from engine.metrics import GatewayMetrics
from engine.server_config import ServerConfig
from protocol.codec import ADMIN_OPS, Frame, RemoteProtocolError, Request, ServerCodec
from protocol.messages import BUSY, FORBIDDEN, OK

log = logging.getLogger("soldout.gateway")

ENDPOINT_PATH = "/v1"
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
# Reply frames queued for one connection's writer; beyond it the connection's own
# frame tasks wait, holding their in-flight count, so its reader turns to `busy`.
OUTBOX_FRAMES_MAX = 64


@dataclass(frozen=True, slots=True)
class Role:
    frontend: bool
    admin: bool


FRONTEND = Role(frontend=True, admin=False)
ADMIN = Role(frontend=True, admin=True)


class Gateway:
    """Serves one engine over websockets; `serve` runs until cancelled or `shutdown`."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: GatewayMetrics | None = None) -> None:
        self.engine = engine
        self.config = config
        self.limits = config.limits
        self.metrics = metrics or GatewayMetrics()
        self._frontend_tokens = [token.encode() for token in config.frontend_tokens]
        self._admin_tokens = [token.encode() for token in config.admin_tokens]
        self._connections = 0
        self._stopping = trio.Event()
        self._readers: set[trio.CancelScope] = set()

    # ------------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen; report the bound port through `task_status`; run until shut down."""
        self.config.check_bind_address()
        if self.config.open_access:
            log.warning(
                "no tokens configured: every connection gets both roles; bound to loopback %s", self.config.host
            )
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as listening:
                server = await listening.start(
                    lambda task_status: serve_websocket(
                        self._handle,
                        self.config.host,
                        self.config.port,
                        ssl_context=None,
                        handler_nursery=handlers,
                        max_message_size=self.limits.frame_bytes_max,
                        message_queue_size=4,
                        task_status=task_status,
                    )
                )
                task_status.started(server.port)
                await self._stopping.wait()
                # Stop accepting; connections already open finish below.
                listening.cancel_scope.cancel()
            for scope in list(self._readers):
                scope.cancel()
            handlers.cancel_scope.deadline = trio.current_time() + self.config.shutdown_grace_seconds

    def shutdown(self) -> None:
        """Stop accepting, stop reading, answer what is in flight, close connections with 1001."""
        self._stopping.set()

    # --------------------------------------------------------------- handshake

    async def _handle(self, request: WebSocketRequest) -> None:
        path = request.path.split("?", 1)[0]
        if path != ENDPOINT_PATH:
            self.metrics.connection_refused("path")
            await _refuse(request, 404, body=b"soldout speaks protocol v1 at /v1\n")
            return
        role = self._authenticate(request)
        if role is None:
            self.metrics.connection_refused("auth")
            await _refuse(
                request, 401, extra_headers=[(b"WWW-Authenticate", b'Bearer realm="soldout"')], body=b"unknown token\n"
            )
            return
        if self._connections >= self.limits.connections_max or self._stopping.is_set():
            self.metrics.connection_refused("capacity")
            await _refuse(request, 503, body=b"too many connections\n")
            return
        self._connections += 1
        try:
            connection = await request.accept()
            self.metrics.connection_opened()
            try:
                await Connection(self, connection, role).run()
            finally:
                self.metrics.connection_closed()
        except ConnectionClosed:
            pass
        finally:
            self._connections -= 1

    def _authenticate(self, request: WebSocketRequest) -> Role | None:
        if self.config.open_access:
            return ADMIN
        token = b""
        for name, value in request.headers:
            if name.lower() == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = credentials.strip()
        if not token:
            return None
        # Compare against every token in constant time, so timing tells nothing.
        admin = any([hmac.compare_digest(token, known) for known in self._admin_tokens])
        frontend = any([hmac.compare_digest(token, known) for known in self._frontend_tokens])
        if admin:
            return ADMIN
        if frontend:
            return FRONTEND
        return None


async def _refuse(
    request: WebSocketRequest, status_code: int, *, body: bytes, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer the upgrade with an HTTP error, then hang up.

    trio-websocket marks a rejected connection closed without closing its TCP stream,
    so the stream is closed here; otherwise a refused peer could hold a socket (and a
    reader task) for as long as it likes, outside every bound.
    """
    try:
        await request.reject(status_code, extra_headers=extra_headers, body=body)
    finally:
        await request._connection._close_stream()


class Connection:
    """One websocket connection: a reader, a writer, and a task per frame in flight."""

    def __init__(self, gateway: Gateway, websocket: WebSocketConnection, role: Role) -> None:
        self.gateway = gateway
        self.engine = gateway.engine
        self.metrics = gateway.metrics
        self.websocket = websocket
        self.role = role
        self.codec = ServerCodec(gateway.limits)
        self.inflight = 0
        self.inflight_max = gateway.limits.inflight_requests_max
        self.inflight_bytes = 0
        self.inflight_bytes_max = gateway.limits.inflight_bytes_max
        self._bytes_freed = trio.Event()

    async def run(self) -> None:
        outbox_send, outbox_receive = trio.open_memory_channel[bytes](OUTBOX_FRAMES_MAX)
        close_code = CLOSE_GOING_AWAY
        close_reason = "server shutting down"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, outbox_receive)
            async with outbox_send, trio.open_nursery() as frames:
                with trio.CancelScope() as reading:
                    self.gateway._readers.add(reading)
                    try:
                        close_code, close_reason = await self._read(frames, outbox_send)
                    finally:
                        self.gateway._readers.discard(reading)
                # Leaving `frames` waits for every frame in flight to queue its replies;
                # closing the outbox then lets the writer drain it and end.
        if close_code is not None:
            await self.websocket.aclose(close_code, close_reason)

    async def _read(self, frames: trio.Nursery, outbox: trio.MemorySendChannel[bytes]) -> tuple[int | None, str]:
        """Take frames off the socket until the peer goes or breaks the protocol."""
        codec = self.codec
        metrics = self.metrics
        while True:
            try:
                message = await self.websocket.get_message()
            except ConnectionClosed:
                return None, ""
            arrived = time.perf_counter()
            if isinstance(message, str):
                return CLOSE_UNSUPPORTED_DATA, "soldout accepts binary msgpack frames only"
            metrics.frame_received(len(message))
            try:
                frame = codec.decode(message)
            except RemoteProtocolError as error:
                return error.close_code, str(error)[:120]
            count = len(frame.requests)
            if self.inflight + count > self.inflight_max:
                error = "too many requests in flight on this connection"
                replies = [codec.reply_map(request, None, status=BUSY, error=error) for request in frame.requests]
                self._tally(frame.requests, replies)
                try:
                    await outbox.send(codec.encode(frame, replies))
                except trio.BrokenResourceError:
                    return None, ""  # the writer saw the connection close
                continue
            size = len(message)
            while self.inflight_bytes and self.inflight_bytes + size > self.inflight_bytes_max:
                # Backpressure on this connection alone: read on once replies went out.
                self._bytes_freed = trio.Event()
                await self._bytes_freed.wait()
            self.inflight += count
            self.inflight_bytes += size
            frames.start_soon(self._answer, frame, size, arrived, outbox)

    async def _answer(self, frame: Frame, size: int, arrived: float, outbox: trio.MemorySendChannel[bytes]) -> None:
        try:
            replies = await self._decide(frame.requests)
            if any(request.op == "reserve" for request in frame.requests):
                self.metrics.reserve_latency(time.perf_counter() - arrived)
            self._tally(frame.requests, replies)
            payload = self.codec.encode(frame, replies)
            # When the writer is gone with the connection, nobody is left to answer.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await outbox.send(payload)
        finally:
            # In flight until the reply is queued: a peer that does not read fills its
            # outbox, its frames wait here, and its reader turns to `busy`.
            self.inflight -= len(frame.requests)
            self.inflight_bytes -= size
            self._bytes_freed.set()

    async def _decide(self, requests: Sequence[Request]) -> list[dict]:
        codec = self.codec
        commands = []
        positions = []
        replies: list[dict | None] = [None] * len(requests)
        for position, request in enumerate(requests):
            if request.error is not None:
                replies[position] = codec.reply_map(request)
            elif request.op in ADMIN_OPS and not self.role.admin:
                replies[position] = codec.reply_map(
                    request, None, status=FORBIDDEN, error=f"{request.op} needs an admin token"
                )
            elif request.command is not None:
                commands.append(request.command)
                positions.append(position)
            elif request.op == "stats":
                replies[position] = codec.reply_map(request, None, status=OK, stats=self.metrics.stats(self.engine))
            else:  # ping
                replies[position] = codec.reply_map(request, None, status=OK)
        if commands:
            try:
                outcomes = await self.engine.execute(commands)
            except EngineClosed:
                outcomes = [None] * len(commands)
            for position, outcome in zip(positions, outcomes, strict=True):
                if outcome is None:
                    error = "server shutting down"
                    replies[position] = codec.reply_map(requests[position], None, status=BUSY, error=error)
                else:
                    replies[position] = codec.reply_map(requests[position], outcome)
        return replies  # type: ignore[return-value]

    def _tally(self, requests: Sequence[Request], replies: Sequence[dict]) -> None:
        tally: dict[tuple[str, str], int] = {}
        for request, reply in zip(requests, replies, strict=True):
            key = (request.op or "invalid", reply["status"])
            tally[key] = tally.get(key, 0) + 1
        self.metrics.answered(tally)

    async def _write(self, outbox: trio.MemoryReceiveChannel[bytes]) -> None:
        """The only code that sends on this socket."""
        metrics = self.metrics
        async with outbox:
            async for payload in outbox:
                try:
                    await self.websocket.send_message(payload)
                except ConnectionClosed:
                    return  # the frame tasks' sends now fail and they end
                metrics.frame_sent(len(payload))
