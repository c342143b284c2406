"""A trio client for soldout's websocket protocol v1: `ClientCore` carried by trio-websocket.

    async with open_client("ws://127.0.0.1:8765/v1", token="front-secret") as client:
        reply = await client.reserve("MI-BAND-1", buyer="u42", qty=1)

Calls made at the same time travel together: the sender takes every call waiting in its
queue (up to `batch_requests_max`) and sends them as one batch frame, and replies are
matched back by id, so many requests are in flight at once. When the connection drops,
the client reconnects and sends every unanswered request again; a reserve always
carries an idempotency key (the client makes one when the caller gives none), so a
retried reserve returns the first hold instead of making a second. All of that is
`protocol.client_core`'s; this module owns the socket, the tasks and the waiting. The
asyncio client (`protocol.aio`) is the same core over `websockets`.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from protocol.client_core import (
    BATCH_REQUESTS_MAX,
    INFLIGHT_REQUESTS_MAX,
    RECONNECT_ATTEMPTS,
    RECONNECT_DELAY_SECONDS,
    REPLY_FRAME_BYTES_MAX,
    Answered,
    ClientCore,
    ClientError,
    ClientOperations,
    Event,
    Failed,
    reconnect_delay_seconds,
)
from protocol.limits import CLIENT_CLOSE_SECONDS_MAX, Limits
from protocol.messages import AnyReply, Command

__all__ = ["REPLY_FRAME_BYTES_MAX", "Client", "ClientError", "open_client"]

log = logging.getLogger("soldout.client")


class _EndWatchingStream(trio.abc.Stream):
    """A stream that sets `ended` when the peer closes it or it breaks."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.ended = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # A send that fails ends the stream too: the handshake must not wait for its timeout.
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Waiter:
    __slots__ = ("done", "error", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Any = None
        self.error: str | None = None


class Client(ClientOperations):
    """A connection to one soldout server, with pipelining, batching and reconnect: a
    `ClientCore` that trio-websocket carries."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        batch_requests_max: int = BATCH_REQUESTS_MAX,
        inflight_requests_max: int = INFLIGHT_REQUESTS_MAX,
        reconnect_attempts: int = RECONNECT_ATTEMPTS,
        reconnect_delay_seconds: float = RECONNECT_DELAY_SECONDS,
        connect_timeout_seconds: float = 10.0,
        limits: Limits | None = None,
    ) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"a soldout url looks like ws://HOST:PORT/v1, not {url!r}")
        self._use_tls = parts.scheme == "wss"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._use_tls else 80)
        self._host_header = parts.netloc
        self._resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._connect_timeout_seconds = connect_timeout_seconds
        self._headers = [("Authorization", f"Bearer {token}")] if token else []
        self._reconnect_attempts = reconnect_attempts
        self._reconnect_delay_seconds = reconnect_delay_seconds
        self._limits = limits or Limits()
        self._core = ClientCore(
            batch_requests_max=batch_requests_max, inflight_requests_max=inflight_requests_max, limits=self._limits
        )
        self._waiters: dict[int, _Waiter] = {}
        # Set when a call is queued: wakes the sender.
        self._queued = trio.Event()
        # Set when calls are answered while callers wait for room in flight.
        self._room = trio.Event()
        self._room_wanted = 0
        self._failure: BaseException | None = None
        self._closing = trio.Event()
        self.reconnects = 0

    async def _pause(self, seconds: float) -> None:
        await trio.sleep(seconds)

    @property
    def resent(self) -> int:
        """Calls sent again on a new connection after the one they went out on dropped."""
        return self._core.resent

    # ---------------------------------------------------------------- calls

    async def execute(self, commands: Sequence[Command]) -> list[AnyReply]:
        core = self._core
        calls: list[int] = []
        try:
            for command in commands:
                await self._wait_for_room()
                calls.append(self._queue_call(core.call(command)))
            return [await self._collect(call) for call in calls]
        finally:
            # Cancelled or failed midway: whatever is not answered yet never will be.
            for call in calls:
                if self._waiters.pop(call, None) is not None:
                    core.abandon(call)

    async def _call_op(self, op: str) -> Any:
        await self._wait_for_room()
        call = self._queue_call(self._core.call_op(op))
        try:
            return await self._collect(call)
        finally:
            if self._waiters.pop(call, None) is not None:
                self._core.abandon(call)

    async def _wait_for_room(self) -> None:
        # Without yielding while there is room, so the calls of one `execute` are all
        # queued before the sender wakes and they leave in few frames.
        while True:
            if self._failure is not None:
                raise ClientError(f"connection to {self.url} failed: {self._failure}") from self._failure
            if self._core.room > 0:
                return
            self._room_wanted += 1
            try:
                await self._room.wait()
            finally:
                self._room_wanted -= 1

    def _queue_call(self, call: int) -> int:
        self._waiters[call] = _Waiter()
        if not self._queued.is_set():
            self._queued.set()
        return call

    async def _collect(self, call: int) -> Any:
        waiter = self._waiters[call]
        await waiter.done.wait()
        del self._waiters[call]
        if waiter.error is not None:
            raise ClientError(f"{self.url}: {waiter.error}")
        return waiter.reply

    def _deliver(self, events: Sequence[Event]) -> None:
        waiters = self._waiters
        for event in events:
            if type(event) is Answered:
                waiter = waiters.get(event.call)
                if waiter is not None:
                    waiter.reply = event.reply
                    waiter.done.set()
            elif type(event) is Failed:
                waiter = waiters.get(event.call)
                if waiter is not None:
                    waiter.error = event.error
                    waiter.done.set()
            else:
                log.warning("unreadable frame from %s: %s", self.url, event.error)
        self._wake_room_waiters()

    def _wake_room_waiters(self) -> None:
        if self._room_wanted and (self._core.room > 0 or self._failure is not None):
            self._room.set()
            self._room = trio.Event()

    # -------------------------------------------------------------- the connection

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up, reconnecting and resending, until cancelled."""
        started = False
        failures = 0

        def connected() -> None:
            nonlocal started, failures
            failures = 0
            if started:
                self.reconnects += 1
            else:
                started = True
                task_status.started()

        while not self._closing.is_set():
            error = await self._connect_and_serve(connected)
            if self._closing.is_set():
                return
            if error is None:
                continue  # the connection closed: connect again at once
            if isinstance(error, ConnectionRejected) and not (started and error.status_code == 503):
                failure = ClientError(f"{self.url} refused the connection: HTTP {error.status_code}")
            else:
                # A server shutting down or full answers 503 for a while: once connected,
                # that is retried like a server that is down.
                failures += 1
                if failures <= self._reconnect_attempts:
                    await trio.sleep(reconnect_delay_seconds(failures, self._reconnect_delay_seconds))
                    continue
                failure = ClientError(f"cannot connect to {self.url}: {error}")
            # Every waiting call hears why; `open_client` raises it if it never connected.
            self._fail(failure)
            if not started:
                task_status.started()
            return

    async def _connect_and_serve(self, connected: Callable[[], None]) -> BaseException | None:
        """One connection, from handshake to close; the error when it could not be made."""
        error: BaseException | None = None
        opened: list[trio.abc.Stream] = []
        # trio-websocket reports a refused handshake from its own reader task too, so
        # the refusal may arrive inside an exception group.
        try:
            async with trio.open_nursery() as connection_nursery:
                websocket = await self._handshake(connection_nursery, opened)
                connected()
                try:
                    await self._serve_connection(websocket)
                finally:
                    # Whatever it owed goes again on the next connection.
                    self._core.connection_lost()
                    self._wake_room_waiters()
                    # The close handshake needs the connection's reader, which lives in
                    # `connection_nursery`, so it runs before that nursery is cancelled.
                    with trio.CancelScope(shield=True), trio.move_on_after(CLIENT_CLOSE_SECONDS_MAX):
                        await websocket.aclose()
                connection_nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            error = group.exceptions[0]
        except* (OSError, HandshakeError, trio.TooSlowError) as group:
            error = group.exceptions[0]
        finally:
            # trio-websocket leaves the TCP stream open when the server refused the
            # handshake, dropped the connection or closed it first: it is ours to close.
            with trio.CancelScope(shield=True):
                for stream in opened:
                    await stream.aclose()
        return error

    async def _handshake(self, connection_nursery: trio.Nursery, opened: list[trio.abc.Stream]) -> WebSocketConnection:
        """Open TCP and upgrade it, failing fast when the peer hangs up mid-handshake.

        trio-websocket waits for the handshake until a timeout when the peer closes
        the TCP connection first (a load balancer in front of a restarting server
        does that), so the stream is watched for its end while the upgrade runs.
        """
        with trio.fail_after(self._connect_timeout_seconds):
            if self._use_tls:
                tcp: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    self._host, self._port, https_compatible=True
                )
            else:
                tcp = await trio.open_tcp_stream(self._host, self._port)
            opened.append(tcp)
            stream = _EndWatchingStream(tcp)
            websocket: WebSocketConnection | None = None
            async with trio.open_nursery() as race:

                async def upgrade() -> None:
                    nonlocal websocket
                    websocket = await wrap_client_stream(
                        connection_nursery,
                        stream,  # type: ignore[arg-type]
                        self._host_header,
                        self._resource,
                        extra_headers=self._headers,
                        message_queue_size=16,
                        max_message_size=REPLY_FRAME_BYTES_MAX,
                    )
                    race.cancel_scope.cancel()

                async def watch() -> None:
                    await stream.ended.wait()
                    race.cancel_scope.cancel()

                race.start_soon(upgrade)
                race.start_soon(watch)
        if websocket is None:
            await tcp.aclose()
            raise HandshakeError(f"{self.url} closed the connection during the handshake")
        return websocket

    async def _serve_connection(self, websocket: WebSocketConnection) -> None:
        async with trio.open_nursery() as nursery:

            async def stop_when_closing() -> None:
                await self._closing.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(self._send_loop, websocket)
            nursery.start_soon(stop_when_closing)
            await self._read_loop(websocket)
            nursery.cancel_scope.cancel()

    async def _send_loop(self, websocket: WebSocketConnection) -> None:
        core = self._core
        # Everything unanswered on the last connection is at the head of the queue: it
        # goes first, in the order it was asked.
        while True:
            if not core.queued:
                await self._queued.wait()
            self._queued = trio.Event()
            # One scheduling round lets every caller that is ready now queue its call,
            # so concurrent calls leave together in one frame.
            await trio.lowlevel.checkpoint()
            try:
                for frame in core.frames_to_send():
                    await websocket.send_message(frame)
            except ConnectionClosed:
                # These calls count as sent: `connection_lost` queues them again.
                return

    async def _read_loop(self, websocket: WebSocketConnection) -> None:
        while True:
            try:
                payload = await websocket.get_message()
            except ConnectionClosed as closed:
                log.info("connection to %s closed (%s); reconnecting", self.url, closed.reason)
                return
            if isinstance(payload, str):
                continue
            self._deliver(self._core.receive_frame(payload))

    @property
    def failure(self) -> BaseException | None:
        """Why the client gave up (refused, unreachable, closed), or None while it is up."""
        return self._failure

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self._deliver(self._core.fail_all(str(error)))

    def close(self) -> None:
        """Stop: waiting calls raise ClientError, the connection closes with a handshake."""
        self._fail(ClientError("the client is closed"))
        self._closing.set()


@asynccontextmanager
async def open_client(
    url: str,
    token: str | None = None,
    *,
    batch_requests_max: int = BATCH_REQUESTS_MAX,
    inflight_requests_max: int = INFLIGHT_REQUESTS_MAX,
    reconnect_attempts: int = RECONNECT_ATTEMPTS,
) -> AsyncIterator[Client]:
    """Connect to a soldout server; the client reconnects by itself until the block ends."""
    client = Client(
        url,
        token,
        batch_requests_max=batch_requests_max,
        inflight_requests_max=inflight_requests_max,
        reconnect_attempts=reconnect_attempts,
    )
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        never_connected = client.failure
        if never_connected is None:
            try:
                yield client
            except Exception as error:
                body_error = error
            finally:
                client.close()
                # The connection closes by itself; a server that does not answer the
                # close handshake is not waited on for long.
                nursery.cancel_scope.deadline = trio.current_time() + CLIENT_CLOSE_SECONDS_MAX
    if never_connected is not None:
        raise never_connected
    if body_error is not None:
        # The caller's own exception leaves as itself, not inside the nursery's group.
        raise body_error
