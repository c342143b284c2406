"""The gateway: soldout's websocket server (protocol v1, see protocol/SPEC.md).

It accepts a TCP connection only while it has room for it: a handshake slot
(`handshakes_max`, held until the connection is admitted or closed) and a descriptor
outside the reserve kept for journals and snapshots (engine/server/descriptors.py); the rest
wait in the kernel's listen queue. A connection gets `handshake_seconds_max` to send
its upgrade request, and frees its descriptor at once if it hangs up first.

The gateway authenticates the request, then gives each connection one reader (the only
code that takes frames off the socket) and one writer (the only code that puts replies
on it). Each frame's requests go to the engine's batch entry point, which groups them
by shard; replies are queued to the writer as they complete, so frames may be answered
out of order. A connection over its in-flight bound is answered `busy` without
queueing. Bytes in flight are bounded per connection and for the server
(engine/server/inflight.py): a peer that does not read stops only its own reader.

Shutting down: stop reading, answer what is in flight (for at most the grace), close each
connection with 1001; until then new handshakes are answered 503, then the listener closes.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, is_

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from engine.api import Engine, EngineClosed
from engine.server.config import ServerConfig
from engine.server.descriptors import socket_budget
from engine.server.inflight import InflightBytes
from engine.server.listening import open_listeners
from engine.server.memory import MemoryReturner
from engine.server.metrics import ServerMetrics
from engine.server.websocket import ServerWebSocket, close_gently
from protocol.codec import Frame, RemoteProtocolError, ServerCodec
from protocol.limits import (
    ACCEPT_RETRY_SECONDS,
    OUTBOX_FRAMES_MAX,
    RECEIVED_FRAMES_QUEUED_MAX,
    SHUTDOWN_CLOSE_SECONDS,
)
from protocol.messages import BUSY, OK, REPLY_TYPES, AnyReply, Reply, Stats, StatsReply

log = logging.getLogger("soldout.gateway")

_status = attrgetter("status")

ENDPOINT_PATH = "/v1"
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass(frozen=True, slots=True)
class Role:
    """What a connection's token lets it do: every connection may use the frontend ops."""

    admin: bool


FRONTEND = Role(admin=False)
ADMIN = Role(admin=True)


@dataclass(frozen=True, slots=True)
class GatewayStatistics:
    handshakes: int  # sockets not (yet) admitted as connections: waiting, or being refused
    connections: int  # websocket connections, counted against connections_max
    sockets: int  # every socket held, in any phase
    sockets_max: int  # what the descriptor budget and the bounds allow
    inflight_bytes: int  # bytes in flight on every connection together
    inflight_bytes_waiting: int  # readers waiting for the server's bound


class Gateway:
    """Serves one engine over websockets; `serve` runs until cancelled or `shutdown`."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.config = config
        self.limits = config.limits
        self.metrics = metrics or ServerMetrics()
        self.inflight_bytes = InflightBytes(self.limits.server_inflight_bytes_max)
        self.memory = MemoryReturner()
        self._frontend_tokens = [token.encode() for token in config.frontend_tokens]
        self._admin_tokens = [token.encode() for token in config.admin_tokens]
        self._connections = 0
        self._handshakes = 0
        self._sockets = 0
        self._sockets_max = 0
        self._handshake_slots = trio.Semaphore(self.limits.handshakes_max)
        self._socket_slots = trio.Semaphore(0)
        self._connection_ended = trio.lowlevel.ParkingLot()
        self._stopping = trio.Event()
        self._readers: set[trio.CancelScope] = set()

    def statistics(self) -> GatewayStatistics:
        return GatewayStatistics(
            handshakes=self._handshakes,
            connections=self._connections,
            sockets=self._sockets,
            sockets_max=self._sockets_max,
            inflight_bytes=self.inflight_bytes.used,
            inflight_bytes_waiting=self.inflight_bytes.waiting,
        )

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ------------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen; report the bound port through `task_status`; run until shut down."""
        self.config.check_bind_address()
        if self.config.open_access:
            log.warning(
                "no tokens configured: every connection gets both roles; bound to loopback %s", self.config.host
            )
        if not self._sockets_max:
            self.budget_sockets()
        listeners = await open_listeners(self.config.host, self.config.port, "server.port")
        try:
            async with trio.open_nursery() as sockets:
                sockets.start_soon(self.memory.run)
                for listener in listeners:
                    sockets.start_soon(self._accept, listener, sockets)
                task_status.started(listeners[0].socket.getsockname()[1])
                await self._stopping.wait()
                closing = len(self._readers)
                for scope in list(self._readers):
                    scope.cancel()
                # Connections answer what is in flight and close; meanwhile handshakes
                # are still read and answered 503. Then the listener and they go.
                with trio.move_on_after(self.config.shutdown_grace_seconds):
                    while self._connections:
                        await self._connection_ended.park()
                if closing:
                    # A client told 1001 reconnects at once: let it hear 503, not a reset
                    # from a listener closing under it.
                    await trio.sleep(SHUTDOWN_CLOSE_SECONDS)
                sockets.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    def budget_sockets(self) -> None:
        """Size the socket bound from the descriptors free now (call it with the engine open).

        Raises DescriptorLimitTooLow (a ConfigError) when too few are left.
        """
        budget = socket_budget(self.config.engine.shards)
        wanted = self.limits.connections_max + self.limits.handshakes_max
        self._sockets_max = min(wanted, budget.sockets_max)
        if budget.sockets_max < wanted:
            log.warning(
                "the descriptor limit (RLIMIT_NOFILE %d, %d open, %d kept for journals and snapshots) allows "
                "%d sockets, fewer than connections_max + handshakes_max = %d; raise it (ulimit -n) to reach them",
                budget.descriptor_limit,
                budget.descriptors_open,
                budget.reserve,
                budget.sockets_max,
                wanted,
            )
        self._socket_slots = trio.Semaphore(self._sockets_max)

    def shutdown(self) -> None:
        """Stop reading, answer what is in flight, close connections with 1001, stop listening."""
        self._stopping.set()

    async def _accept(self, listener: trio.SocketListener, sockets: trio.Nursery) -> None:
        """Accept while there is room: a socket beyond the bounds is never taken off the queue."""
        while True:
            await self._handshake_slots.acquire()
            await self._socket_slots.acquire()
            try:
                stream = await listener.accept()
            except BaseException as error:
                self._handshake_slots.release()
                self._socket_slots.release()
                if isinstance(error, OSError) and error.errno in ACCEPT_RESOURCE_ERRNOS:
                    log.error("accept failed: %s; retrying", error)
                    await trio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                raise
            self._handshakes += 1
            self._sockets += 1
            sockets.start_soon(self._serve_socket, stream)

    async def _serve_socket(self, stream: trio.SocketStream) -> None:
        """One socket from accept to close: its handshake, its connection, its descriptor."""
        handshake = _Handshake(self)
        request = None
        try:
            websocket = ServerWebSocket(
                stream,
                max_message_size=self.limits.frame_bytes_max,
                message_queue_size=RECEIVED_FRAMES_QUEUED_MAX,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(websocket.read)
                request = await websocket.wait_for_request(self.limits.handshake_seconds_max)
                if request is None:
                    # Hung up, broke HTTP (wsproto answered 400), or too slow: nothing
                    # of ours is on its way to it, so the descriptor goes at once.
                    self.metrics.connection_refused("handshake")
                else:
                    await self._handle(request, handshake)
                nursery.cancel_scope.cancel()
            if request is not None:
                # A refused peer keeps its handshake slot while it reads its answer.
                linger = SHUTDOWN_CLOSE_SECONDS if self.stopping else self.limits.handshake_seconds_max
                await close_gently(stream, linger)
        finally:
            handshake.end()
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self._sockets -= 1
            self._socket_slots.release()

    # --------------------------------------------------------------- handshake

    async def _handle(self, request: WebSocketRequest, handshake: _Handshake) -> None:
        path = request.path.split("?", 1)[0]
        if path != ENDPOINT_PATH:
            self.metrics.connection_refused("path")
            await _refuse(request, 404, body=b"soldout speaks protocol v1 at /v1\n")
            return
        authorizations = [value for name, value in request.headers if name.lower() == b"authorization"]
        if len(authorizations) > 1:
            # Which one would count is a guess; a proxy that adds its own must replace the client's.
            self.metrics.connection_refused("headers")
            await _refuse(request, 400, body=b"more than one Authorization header\n")
            return
        role = self._authenticate(authorizations[0] if authorizations else b"")
        if role is None:
            self.metrics.connection_refused("auth")
            await _refuse(
                request, 401, extra_headers=[(b"WWW-Authenticate", b'Bearer realm="soldout"')], body=b"unknown token\n"
            )
            return
        if self.stopping:
            self.metrics.connection_refused("shutdown")
            await _refuse(request, 503, body=b"server shutting down\n")
            return
        if self._connections >= self.limits.connections_max:
            self.metrics.connection_refused("capacity")
            await _refuse(request, 503, body=b"too many connections\n")
            return
        self._connections += 1
        handshake.end()  # admitted: from now on it counts against connections_max
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
            self._connection_ended.unpark_all()

    def _authenticate(self, authorization: bytes) -> Role | None:
        if self.config.open_access:
            return ADMIN
        scheme, _, credentials = authorization.partition(b" ")
        token = credentials.strip() if scheme.lower() == b"bearer" else b""
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


class _Handshake:
    """A socket's hold on a handshake slot, from accept until it is admitted or closed."""

    __slots__ = ("_gateway", "_held")

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._held = True

    def end(self) -> None:
        if self._held:
            self._held = False
            self._gateway._handshakes -= 1
            self._gateway._handshake_slots.release()


async def _refuse(
    request: WebSocketRequest, status_code: int, *, body: bytes, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer the upgrade with an HTTP error; the socket's owner then hangs up."""
    with contextlib.suppress(ConnectionClosed):
        await request.reject(status_code, extra_headers=extra_headers, body=body)


class Connection:
    """One websocket connection: a reader, a writer, and a task per frame in flight.

    A frame's bytes are held (against the connection's bound and the server's) from the
    moment the reader takes it until its reply is written; a reply larger than its frame
    holds its own size. So what a peer that sends and never reads can pin is bounded.
    """

    def __init__(self, gateway: Gateway, websocket: WebSocketConnection, role: Role) -> None:
        self.gateway = gateway
        self.engine = gateway.engine
        self.metrics = gateway.metrics
        self.websocket = websocket
        self.role = role
        self.codec = ServerCodec(gateway.limits, admin=role.admin)
        self.inflight = 0
        self.inflight_max = gateway.limits.inflight_requests_max
        bytes_max = gateway.limits.inflight_bytes_max
        assert bytes_max is not None
        self.inflight_bytes = InflightBytes(bytes_max)
        self.inflight_bytes_peak = 0
        self._server_bytes = gateway.inflight_bytes

    async def run(self) -> None:
        outbox_send, outbox_receive = trio.open_memory_channel[tuple[bytes, int]](OUTBOX_FRAMES_MAX)
        close_code: int | None = CLOSE_GOING_AWAY
        close_reason = "server shutting down"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, outbox_receive)
                async with outbox_send, trio.open_nursery() as frames:
                    with trio.CancelScope() as reading:
                        self.gateway._readers.add(reading)
                        if self.gateway.stopping:
                            reading.cancel()  # accepted as the shutdown began
                        try:
                            close_code, close_reason = await self._read(frames, outbox_send)
                        finally:
                            self.gateway._readers.discard(reading)
                    # Leaving `frames` waits for every frame in flight to queue its replies;
                    # closing the outbox then lets the writer drain it and end.
            if close_code is not None:
                seconds = SHUTDOWN_CLOSE_SECONDS if self.gateway.stopping else self.gateway.limits.handshake_seconds_max
                with trio.move_on_after(seconds):
                    await self.websocket.aclose(close_code, close_reason)
        finally:
            self.gateway.memory.freed(self.inflight_bytes_peak)

    # ------------------------------------------------------------ bytes in flight

    async def _take(self, size: int) -> None:
        """Hold `size` bytes: wait for this connection's room, then the server's."""
        await self.inflight_bytes.take(size)
        try:
            if self.inflight_bytes.used == size:
                # Nothing else in flight here: this connection goes on, one frame at a
                # time, however much the others hold.
                self._server_bytes.add(size)
            else:
                await self._server_bytes.take(size)
        except BaseException:
            self.inflight_bytes.release(size)
            raise
        self.inflight_bytes_peak = max(self.inflight_bytes_peak, self.inflight_bytes.used)

    def _add(self, size: int) -> None:
        self.inflight_bytes.add(size)
        self._server_bytes.add(size)

    def _release(self, size: int) -> None:
        self.inflight_bytes.release(size)
        self._server_bytes.release(size)

    # ------------------------------------------------------------ reading

    async def _read(
        self, frames: trio.Nursery, outbox: trio.MemorySendChannel[tuple[bytes, int]]
    ) -> tuple[int | None, str]:
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
            size = len(message)
            metrics.frame_received(size)
            # Backpressure: decode nothing more until there is room for it.
            await self._take(size)
            try:
                frame = codec.decode(message)
            except RemoteProtocolError as error:
                self._release(size)
                return error.close_code, str(error)[:120]
            del message  # the decoded frame is what stays in flight
            count = len(frame)
            if self.inflight + count > self.inflight_max:
                busy = Reply(BUSY, error="too many requests in flight on this connection")
                replies = [busy] * count
                self._tally(frame, replies)
                payload = codec.encode(frame, replies)
                self._add(len(payload))
                self._release(size)
                try:
                    await outbox.send((payload, len(payload)))
                except trio.BrokenResourceError:
                    self._release(len(payload))
                    return None, ""  # the writer saw the connection close
                continue
            self.inflight += count
            frames.start_soon(self._answer, frame, size, arrived, outbox)

    async def _answer(
        self, frame: Frame, size: int, arrived: float, outbox: trio.MemorySendChannel[tuple[bytes, int]]
    ) -> None:
        count = len(frame)
        held = size
        try:
            replies = await self._decide(frame)
            if "reserve" in frame.ops:
                self.metrics.reserve_latency(time.perf_counter() - arrived)
            self._tally(frame, replies)
            payload = self.codec.encode(frame, replies)
            del frame, replies  # only the payload waits for the outbox
            if len(payload) > held:
                self._add(len(payload) - held)
                held = len(payload)
            # In flight until the reply is queued: a peer that does not read fills its
            # outbox, its frames wait here, and its reader turns to `busy`.
            try:
                await outbox.send((payload, held))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the writer is gone with the connection: nobody is left to answer
            else:
                held = 0  # the writer gives it back once written
        finally:
            self.inflight -= count
            if held:
                self._release(held)

    async def _decide(self, frame: Frame) -> list[AnyReply]:
        """The frame's replies: the engine decides its commands, the gateway its stats."""
        commands = frame.commands
        if frame.stats:
            stats = StatsReply(OK, stats=self.metrics.stats(self.engine))
            commands = [stats if type(command) is Stats else command for command in commands]
        try:
            return await self.engine.decide(commands)  # type: ignore[arg-type]
        except EngineClosed:
            # What was decided without a shard keeps its answer; the rest waited in vain.
            busy = Reply(BUSY, error="server shutting down")
            return [command if type(command) in REPLY_TYPES else busy for command in commands]  # type: ignore[misc]

    def _tally(self, frame: Frame, replies: Sequence[AnyReply]) -> None:
        """Count the frame's answers by (op, status); a request without a known op counts as "invalid"."""
        # Counter counts in C: a frame may hold a thousand requests.
        ops = frame.ops
        op = ops[0]
        if op is not None and ops.count(op) == len(ops):
            # A frame of one op (a crowd's reserves): count its statuses alone; a frame of
            # one answer (the book answers a refusal with one object) without counting.
            first = replies[0]
            if all(map(is_, replies, repeat(first))):
                self.metrics.answered({(op, first.status): len(replies)})
                return
            self.metrics.answered({(op, status): count for status, count in Counter(map(_status, replies)).items()})
            return
        tally = Counter(zip(ops, map(_status, replies)))  # noqa: B905 (one reply per request)
        if None in ops:
            for (op, status), count in [(key, count) for key, count in tally.items() if key[0] is None]:
                del tally[op, status]
                tally["invalid", status] = tally.get(("invalid", status), 0) + count
        self.metrics.answered(tally)  # type: ignore[arg-type]

    # ------------------------------------------------------------ writing

    async def _write(self, outbox: trio.MemoryReceiveChannel[tuple[bytes, int]]) -> None:
        """The only code that sends on this socket; it gives back each reply's bytes once written."""
        metrics = self.metrics
        connected = True
        try:
            async with outbox:
                async for payload, held in outbox:
                    try:
                        if connected:
                            await self.websocket.send_message(payload)
                            metrics.frame_sent(len(payload))
                    except ConnectionClosed:
                        # Keep taking what the frame tasks queue, so that each of them
                        # ends and gives its bytes back.
                        connected = False
                    finally:
                        self._release(held)
        finally:
            # Cancelled with replies still queued: give their bytes back too.
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                while True:
                    _, held = outbox.receive_nowait()
                    self._release(held)
