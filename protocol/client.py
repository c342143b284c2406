"""A trio client for soldout's websocket protocol v1: the one module of `protocol/` that does I/O.

    async with open_client("ws://127.0.0.1:8765/v1", token="front-secret") as client:
        reply = await client.reserve("MI-BAND-1", buyer="u42", qty=1)

Calls made at the same time travel together: the sender takes every call waiting in its
queue (up to `batch_requests_max`) and sends them as one batch frame, and replies are
matched back by id, so many requests are in flight at once. When the connection drops,
the client reconnects and sends every unanswered request again; a reserve always
carries an idempotency key (the client makes one when the caller gives none), so a
retried reserve returns the first hold instead of making a second.
"""

from __future__ import annotations

import itertools
import logging
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
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

from protocol.codec import ClientCodec, RemoteProtocolError, reply_from_map, request_map
from protocol.limits import Limits
from protocol.messages import (
    UNCHANGED,
    AnyReply,
    Cancel,
    Command,
    Confirm,
    GetHold,
    GetSku,
    HoldReply,
    PutSku,
    Register,
    RegisterReply,
    Reply,
    Reserve,
    SkuReply,
    Stock,
    StockReply,
    Unchanged,
)

log = logging.getLogger("soldout.client")

CLOSE_TIMEOUT_SECONDS = 2.0


class ClientError(Exception):
    """The client cannot reach a usable server: refused, unreachable, or closed."""


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


class _Call:
    __slots__ = ("done", "op", "reply", "request", "sent")

    def __init__(self, op: str, request: dict[str, Any]) -> None:
        self.op = op
        self.request = request
        self.sent = False
        self.reply: dict[str, Any] | BaseException | None = None
        self.done = trio.Event()


class Client:
    """A connection to one soldout server, with pipelining, batching and reconnect."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        batch_requests_max: int = 100,
        inflight_requests_max: int = 10_000,
        reconnect_attempts: int = 20,
        reconnect_delay_seconds: float = 0.05,
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
        self._batch_requests_max = batch_requests_max
        self._reconnect_attempts = reconnect_attempts
        self._reconnect_delay_seconds = reconnect_delay_seconds
        self._limits = limits or Limits()
        self._codec = ClientCodec(self._limits)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Call] = {}
        self._queue_send, self._queue_receive = trio.open_memory_channel[_Call](inflight_requests_max)
        self._failure: BaseException | None = None
        self._closing = trio.Event()
        self.reconnects = 0

    # ---------------------------------------------------------------- operations

    async def reserve(self, sku: str, *, buyer: str, qty: int = 1, key: str | None = None) -> Reply:
        return await self.call(Reserve(sku, buyer, qty, key))  # type: ignore[return-value]

    async def confirm(self, reservation: str, *, buyer: str, order: str | None = None) -> Reply:
        return await self.call(Confirm(reservation, buyer, order))  # type: ignore[return-value]

    async def cancel(self, reservation: str, *, buyer: str) -> Reply:
        return await self.call(Cancel(reservation, buyer))  # type: ignore[return-value]

    async def hold(self, reservation: str, *, buyer: str) -> HoldReply:
        """What became of a hold, changing nothing: for a frontend that lost a reply."""
        return await self.call(GetHold(reservation, buyer))  # type: ignore[return-value]

    async def stock(self, sku: str) -> StockReply:
        return await self.call(Stock(sku))  # type: ignore[return-value]

    async def put_sku(
        self,
        sku: str,
        *,
        stock: int | Unchanged = UNCHANGED,
        per_buyer_limit: int | Unchanged = UNCHANGED,
        hold_seconds: float | Unchanged = UNCHANGED,
        opens_at: float | Unchanged | None = UNCHANGED,
        closes_at: float | Unchanged | None = UNCHANGED,
        registration_required: bool | Unchanged = UNCHANGED,
    ) -> Reply:
        """Create a SKU (`stock` required) or change the settings given; the rest stay."""
        command = PutSku(sku, stock, per_buyer_limit, hold_seconds, opens_at, closes_at, registration_required)
        return await self.call(command)  # type: ignore[return-value]

    async def get_sku(self, sku: str) -> SkuReply:
        return await self.call(GetSku(sku))  # type: ignore[return-value]

    async def register(self, sku: str, buyers: Iterable[str]) -> RegisterReply:
        return await self.call(Register(sku, list(buyers)))  # type: ignore[return-value]

    async def ping(self) -> Reply:
        reply = await self._roundtrip("ping", {})
        return Reply(reply["status"], error=reply.get("error"))

    async def stats(self) -> dict[str, Any]:
        reply = await self._roundtrip("stats", {})
        if reply["status"] != "ok":
            raise ClientError(f"stats: {reply['status']}: {reply.get('error', '')}")
        return reply["stats"]

    async def call(self, command: Command) -> AnyReply:
        """Send one command and wait for its reply (batched with concurrent calls)."""
        return (await self.execute((command,)))[0]

    async def execute(self, commands: Sequence[Command]) -> list[AnyReply]:
        """Send many commands at once, in the order given (so one shard decides them in
        that order); replies in the same order."""
        calls: list[_Call] = []
        try:
            for command in commands:
                if type(command) is Reserve and command.key is None:
                    command = Reserve(command.sku, command.buyer, command.qty, uuid.uuid4().hex)
                request = request_map(0, command)
                calls.append(await self._submit(request.pop("op"), request))
            return [reply_from_map(call.op, await self._collect(call)) for call in calls]
        finally:
            for call in calls:
                self._pending.pop(call.request["id"], None)

    async def _roundtrip(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        call = await self._submit(op, fields)
        try:
            return await self._collect(call)
        finally:
            self._pending.pop(call.request["id"], None)

    async def _submit(self, op: str, fields: dict[str, Any]) -> _Call:
        """Queue one request for the sender; calls queued one after another go in that order."""
        if self._failure is not None:
            raise ClientError(f"connection to {self.url} failed: {self._failure}") from self._failure
        request_id = next(self._ids)
        call = _Call(op, {**fields, "id": request_id, "op": op})
        self._pending[request_id] = call
        try:
            # Without yielding while the queue has room, so the calls of one `execute`
            # are all queued before the sender wakes and they leave in few frames.
            try:
                self._queue_send.send_nowait(call)
            except trio.WouldBlock:
                await self._queue_send.send(call)
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        return call

    async def _collect(self, call: _Call) -> dict[str, Any]:
        await call.done.wait()
        if isinstance(call.reply, BaseException):
            raise ClientError(f"{self.url}: {call.reply}") from call.reply
        assert call.reply is not None
        return call.reply

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
            if isinstance(error, ConnectionRejected):
                failure = ClientError(f"{self.url} refused the connection: HTTP {error.status_code}")
            else:
                failures += 1
                if failures <= self._reconnect_attempts:
                    await trio.sleep(self._reconnect_delay_seconds * min(failures, 20))
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
        # trio-websocket reports a refused handshake from its own reader task too, so
        # the refusal may arrive inside an exception group.
        try:
            async with trio.open_nursery() as connection_nursery:
                websocket = await self._handshake(connection_nursery)
                connected()
                try:
                    await self._serve_connection(websocket)
                finally:
                    # The close handshake needs the connection's reader, which lives in
                    # `connection_nursery`, so it runs before that nursery is cancelled.
                    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
                        await websocket.aclose()
                connection_nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            error = group.exceptions[0]
        except* (OSError, HandshakeError, trio.TooSlowError) as group:
            error = group.exceptions[0]
        return error

    async def _handshake(self, connection_nursery: trio.Nursery) -> WebSocketConnection:
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
                        max_message_size=self._limits.frame_bytes_max * 4,
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
        # Everything unanswered goes again first, in the order it was asked.
        unanswered = [call for _, call in sorted(self._pending.items()) if call.sent and not call.done.is_set()]
        try:
            for start in range(0, len(unanswered), self._batch_requests_max):
                chunk = unanswered[start : start + self._batch_requests_max]
                await websocket.send_message(self._codec.encode_batch([call.request for call in chunk]))
        except ConnectionClosed:
            return
        async with trio.open_nursery() as nursery:

            async def stop_when_closing() -> None:
                await self._closing.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(self._send_loop, websocket)
            nursery.start_soon(stop_when_closing)
            await self._read_loop(websocket)
            nursery.cancel_scope.cancel()

    async def _send_loop(self, websocket: WebSocketConnection) -> None:
        receive = self._queue_receive
        batch_max = self._batch_requests_max
        while True:
            first = await receive.receive()
            # From the moment a call leaves the queue it counts as sent: if this
            # connection dies before the frame goes, the next one sends it again.
            first.sent = True
            # One scheduling round lets every caller that is ready now queue its call,
            # so concurrent calls leave together in one frame.
            await trio.lowlevel.checkpoint()
            calls = [first]
            while len(calls) < batch_max:
                try:
                    call = receive.receive_nowait()
                except trio.WouldBlock:
                    break
                call.sent = True
                calls.append(call)
            requests = [call.request for call in calls if not call.done.is_set()]
            if not requests:
                continue
            payload = (
                self._codec.encode_request(requests[0]) if len(requests) == 1 else self._codec.encode_batch(requests)
            )
            try:
                await websocket.send_message(payload)
            except ConnectionClosed:
                # These calls stay pending and go again on the next connection.
                return

    async def _read_loop(self, websocket: WebSocketConnection) -> None:
        pending = self._pending
        while True:
            try:
                payload = await websocket.get_message()
            except ConnectionClosed as closed:
                log.info("connection to %s closed (%s); reconnecting", self.url, closed.reason)
                return
            if isinstance(payload, str):
                continue
            try:
                replies = self._codec.decode_replies(payload)
            except RemoteProtocolError as error:
                log.warning("unreadable frame from %s: %s", self.url, error)
                continue
            for reply in replies:
                request_id = reply.get("id")
                if request_id is None:
                    # The server refused a whole frame (not msgpack, or a batch over its
                    # bound): it cannot say which, so every request sent and unanswered
                    # hears it rather than wait for a reply that will never come.
                    self._refuse_sent_calls(ClientError(f"the server refused a frame: {reply.get('error')}"))
                    continue
                call = pending.get(request_id)
                if call is not None and not call.done.is_set():
                    call.reply = reply
                    call.done.set()

    @property
    def failure(self) -> BaseException | None:
        """Why the client gave up (refused, unreachable, closed), or None while it is up."""
        return self._failure

    def _refuse_sent_calls(self, error: BaseException) -> None:
        for call in list(self._pending.values()):
            if call.sent and not call.done.is_set():
                call.reply = error
                call.done.set()

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        for call in list(self._pending.values()):
            if not call.done.is_set():
                call.reply = error
                call.done.set()

    def close(self) -> None:
        """Stop: waiting calls raise ClientError, the connection closes with a handshake."""
        self._fail(ClientError("the client is closed"))
        self._closing.set()


@asynccontextmanager
async def open_client(
    url: str,
    token: str | None = None,
    *,
    batch_requests_max: int = 100,
    inflight_requests_max: int = 10_000,
    reconnect_attempts: int = 20,
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
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT_SECONDS
    if never_connected is not None:
        raise never_connected
    if body_error is not None:
        # The caller's own exception leaves as itself, not inside the nursery's group.
        raise body_error
