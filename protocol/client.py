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
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from protocol.codec import ClientCodec, RemoteProtocolError, reply_from_map, request_map
from protocol.limits import Limits
from protocol.messages import (
    AnyReply,
    Cancel,
    Command,
    Confirm,
    PutSku,
    Register,
    Reply,
    Reserve,
    Stock,
    StockReply,
)

log = logging.getLogger("soldout.client")


class ClientError(Exception):
    """The client cannot reach a usable server: refused, unreachable, or closed."""


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
        limits: Limits | None = None,
    ) -> None:
        self.url = url
        self._headers = [("Authorization", f"Bearer {token}")] if token else []
        self._batch_requests_max = batch_requests_max
        self._reconnect_attempts = reconnect_attempts
        self._reconnect_delay_seconds = reconnect_delay_seconds
        self._limits = limits or Limits()
        self._codec = ClientCodec(self._limits)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Call] = {}
        self._queue_send, self._queue_receive = trio.open_memory_channel[_Call](inflight_requests_max)
        self._connected = trio.Event()
        self._closed = False
        self._failure: BaseException | None = None
        self.reconnects = 0

    # ---------------------------------------------------------------- operations

    async def reserve(self, sku: str, *, buyer: str, qty: int = 1, key: str | None = None) -> Reply:
        return await self.call(Reserve(sku, buyer, qty, key))  # type: ignore[return-value]

    async def confirm(self, reservation: str, *, buyer: str) -> Reply:
        return await self.call(Confirm(reservation, buyer))  # type: ignore[return-value]

    async def cancel(self, reservation: str, *, buyer: str) -> Reply:
        return await self.call(Cancel(reservation, buyer))  # type: ignore[return-value]

    async def stock(self, sku: str) -> StockReply:
        return await self.call(Stock(sku))  # type: ignore[return-value]

    async def put_sku(
        self,
        sku: str,
        *,
        stock: int,
        per_buyer_limit: int = 1,
        hold_seconds: float = 900,
        opens_at: float | None = None,
        closes_at: float | None = None,
        registration_required: bool = False,
    ) -> Reply:
        command = PutSku(sku, stock, per_buyer_limit, hold_seconds, opens_at, closes_at, registration_required)
        return await self.call(command)  # type: ignore[return-value]

    async def register(self, sku: str, buyers: Iterable[str]) -> Reply:
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
        if type(command) is Reserve and command.key is None:
            command = Reserve(command.sku, command.buyer, command.qty, uuid.uuid4().hex)
        fields = request_map(0, command)
        op = fields.pop("op")
        fields.pop("id")
        reply = await self._roundtrip(op, fields)
        return reply_from_map(op, reply)

    async def execute(self, commands: Sequence[Command]) -> list[AnyReply]:
        """Send many commands at once; replies in order."""
        replies: list[AnyReply | None] = [None] * len(commands)

        async def one(position: int, command: Command) -> None:
            replies[position] = await self.call(command)

        async with trio.open_nursery() as nursery:
            for position, command in enumerate(commands):
                nursery.start_soon(one, position, command)
        return replies  # type: ignore[return-value]

    async def _roundtrip(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        if self._failure is not None:
            raise ClientError(f"connection to {self.url} failed: {self._failure}") from self._failure
        if self._closed:
            raise ClientError("the client is closed")
        request_id = next(self._ids)
        request = {"id": request_id, "op": op, **fields}
        call = _Call(op, request)
        self._pending[request_id] = call
        try:
            await self._queue_send.send(call)
            await call.done.wait()
        finally:
            self._pending.pop(request_id, None)
        if isinstance(call.reply, BaseException):
            raise ClientError(f"connection to {self.url} failed: {call.reply}") from call.reply
        assert call.reply is not None
        return call.reply

    # -------------------------------------------------------------- the connection

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up, reconnecting and resending, until cancelled."""
        started = False
        failures = 0
        while True:
            async with trio.open_nursery() as connection_nursery:
                try:
                    websocket = await connect_websocket_url(
                        connection_nursery,
                        self.url,
                        extra_headers=self._headers,
                        message_queue_size=16,
                        max_message_size=self._limits.frame_bytes_max * 4,
                    )
                except ConnectionRejected as error:
                    failure = ClientError(f"{self.url} refused the connection: HTTP {error.status_code}")
                except (OSError, HandshakeError) as error:
                    failures += 1
                    if failures <= self._reconnect_attempts:
                        await trio.sleep(self._reconnect_delay_seconds * min(failures, 20))
                        continue
                    failure = ClientError(f"cannot connect to {self.url}: {error}")
                else:
                    failure = None
                if failure is not None:
                    # Every waiting call hears why; a client that never connected raises it.
                    self._fail(failure)
                    if not started:
                        raise failure
                    return
                failures = 0
                if not started:
                    task_status.started()
                    started = True
                else:
                    self.reconnects += 1
                await self._serve_connection(websocket)
                connection_nursery.cancel_scope.cancel()

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
            nursery.start_soon(self._send_loop, websocket)
            await self._read_loop(websocket)
            nursery.cancel_scope.cancel()

    async def _send_loop(self, websocket: WebSocketConnection) -> None:
        receive = self._queue_receive
        batch_max = self._batch_requests_max
        while True:
            calls = [await receive.receive()]
            while len(calls) < batch_max:
                try:
                    calls.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            requests = []
            for call in calls:
                if not call.done.is_set():
                    call.sent = True
                    requests.append(call.request)
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
                call = pending.get(reply.get("id"))  # type: ignore[arg-type]
                if call is not None and not call.done.is_set():
                    call.reply = reply
                    call.done.set()

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        for call in list(self._pending.values()):
            if not call.done.is_set():
                call.reply = error
                call.done.set()

    def close(self) -> None:
        self._closed = True
        self._fail(ClientError("the client is closed"))


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
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        try:
            yield client
        finally:
            client.close()
            nursery.cancel_scope.cancel()
