"""An asyncio client for soldout's websocket protocol v1: `ClientCore` carried by `websockets`.

For frontends on asyncio (FastAPI, Starlette, aiohttp, Django's async views):

    async with open_client("ws://127.0.0.1:8765/v1", token="front-secret") as client:
        reply = await client.reserve("MI-BAND-1", buyer="u42", qty=1)

The methods, their arguments and their reply types are the trio client's
(`protocol.client`): both are `protocol.client_core.ClientOperations` over the same
sans-IO `ClientCore`, which batches concurrent calls into frames, matches replies by id,
bounds the calls in flight, gives every reserve an idempotency key and, after a dropped
connection, sends every unanswered call again. This module owns the socket, two tasks
(the connection's reader, which is also the reconnect loop, and its sender) and the
futures the callers wait on.

A call whose task is cancelled (or times out under `asyncio.timeout`) raises
CancelledError (or TimeoutError) at once; its id is never used again, so its reply, if
the server sends one, is dropped rather than answered into another call, and it is not
sent again after a reconnect. Install with `pip install 'soldout[asyncio]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

try:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
except ImportError as missing:  # pragma: no cover - depends on the install
    raise ImportError(
        "protocol.aio needs the websockets library: pip install 'soldout[asyncio]'", name=missing.name
    ) from missing

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

__all__ = ["Client", "ClientError", "open_client"]

log = logging.getLogger("soldout.client")


class Client(ClientOperations):
    """A connection to one soldout server, with pipelining, batching and reconnect."""

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
        self._headers = [("Authorization", f"Bearer {token}")] if token else []
        self._reconnect_attempts = reconnect_attempts
        self._reconnect_delay_seconds = reconnect_delay_seconds
        self._connect_timeout_seconds = connect_timeout_seconds
        self._core = ClientCore(
            batch_requests_max=batch_requests_max, inflight_requests_max=inflight_requests_max, limits=limits
        )
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        # Set when a call is queued: wakes the sender.
        self._queued = asyncio.Event()
        # Set when calls are answered while callers wait for room in flight.
        self._room = asyncio.Event()
        self._room_wanted = 0
        self._closing = asyncio.Event()
        self._failure: BaseException | None = None
        self._websocket: ClientConnection | None = None
        self.reconnects = 0

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    @property
    def resent(self) -> int:
        """Calls sent again on a new connection after the one they went out on dropped."""
        return self._core.resent

    @property
    def failure(self) -> BaseException | None:
        """Why the client gave up (refused, unreachable, closed), or None while it is up."""
        return self._failure

    # ---------------------------------------------------------------- calls

    async def execute(self, commands: Sequence[Command]) -> list[AnyReply]:
        core = self._core
        calls: list[int] = []
        try:
            for command in commands:
                if self._failure is not None or core.room <= 0:
                    await self._wait_for_room()
                calls.append(self._queue_call(core.call(command)))
            return [await self._collect(call) for call in calls]
        finally:
            # Cancelled or failed midway: whatever is not answered yet never will be.
            for call in calls:
                self._forget(call)

    async def _call_op(self, op: str) -> Any:
        if self._failure is not None or self._core.room <= 0:
            await self._wait_for_room()
        call = self._queue_call(self._core.call_op(op))
        try:
            return await self._collect(call)
        finally:
            self._forget(call)

    async def _wait_for_room(self) -> None:
        while True:
            if self._failure is not None:
                raise ClientError(f"connection to {self.url} failed: {self._failure}") from self._failure
            if self._core.room > 0:
                return
            self._room_wanted += 1
            try:
                self._room.clear()
                await self._room.wait()
            finally:
                self._room_wanted -= 1

    def _queue_call(self, call: int) -> int:
        self._waiters[call] = asyncio.get_running_loop().create_future()
        if not self._queued.is_set():
            self._queued.set()
        return call

    async def _collect(self, call: int) -> Any:
        reply = await self._waiters[call]
        del self._waiters[call]
        return reply

    def _forget(self, call: int) -> None:
        waiter = self._waiters.pop(call, None)
        if waiter is None:
            return  # collected
        # A cancelled task cancels the future it awaited: done or not, the call may be
        # unanswered, and the core must never answer nor resend it (a no-op if answered).
        self._core.abandon(call)
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled():
            waiter.exception()  # retrieved: asyncio must not log it as lost

    def _deliver(self, events: Sequence[Event]) -> None:
        waiters = self._waiters
        for event in events:
            if type(event) is Answered:
                waiter = waiters.get(event.call)
                if waiter is not None and not waiter.done():
                    waiter.set_result(event.reply)
            elif type(event) is Failed:
                waiter = waiters.get(event.call)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(ClientError(f"{self.url}: {event.error}"))
            else:
                log.warning("unreadable frame from %s: %s", self.url, event.error)
        if self._room_wanted and (self._core.room > 0 or self._failure is not None):
            self._room.set()

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self._deliver(self._core.fail_all(str(error)))

    def close(self) -> None:
        """Stop: waiting calls raise ClientError; `open_client` closes the connection."""
        if self._failure is None:
            self._fail(ClientError("the client is closed"))
        self._closing.set()

    # -------------------------------------------------------------- the connection

    async def run(self, started: asyncio.Future[None]) -> None:
        """Keep a connection up, reconnecting with backoff and resending, until closed.
        `started` is done once the first connection is up, or the client gave up."""
        failures = 0
        connected_before = False
        try:
            while not self._closing.is_set():
                try:
                    websocket = await connect(
                        self.url,
                        additional_headers=self._headers,
                        compression=None,
                        max_size=REPLY_FRAME_BYTES_MAX,
                        open_timeout=self._connect_timeout_seconds,
                        close_timeout=CLIENT_CLOSE_SECONDS_MAX,
                    )
                except InvalidStatus as refused:
                    status = refused.response.status_code
                    if not (connected_before and status == 503):
                        self._fail(ClientError(f"{self.url} refused the connection: HTTP {status}"))
                        return
                    # A server shutting down or full answers 503 for a while: once
                    # connected, that is retried like a server that is down.
                    error: BaseException = refused
                except (OSError, InvalidHandshake, TimeoutError) as failed:
                    error = failed
                else:
                    failures = 0
                    if connected_before:
                        self.reconnects += 1
                    connected_before = True
                    if not started.done():
                        started.set_result(None)
                    await self._serve_connection(websocket)
                    continue  # the connection closed: connect again at once
                failures += 1
                if failures > self._reconnect_attempts:
                    self._fail(ClientError(f"cannot connect to {self.url}: {error}"))
                    return
                with contextlib.suppress(TimeoutError):
                    delay = reconnect_delay_seconds(failures, self._reconnect_delay_seconds)
                    await asyncio.wait_for(self._closing.wait(), delay)
        except BaseException as error:
            # Cancelled, or a bug: no caller may wait for ever.
            if self._failure is None:
                self._fail(ClientError(f"the client stopped: {error!r}"))
            raise
        finally:
            if not started.done():
                started.set_result(None)

    async def _serve_connection(self, websocket: ClientConnection) -> None:
        self._websocket = websocket
        sender = asyncio.create_task(self._send_loop(websocket))
        try:
            await self._read_loop(websocket)
        finally:
            self._websocket = None
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            # Whatever it owed goes again on the next connection.
            self._core.connection_lost()
            self._deliver(())
            await websocket.close()

    async def _send_loop(self, websocket: ClientConnection) -> None:
        core = self._core
        queued = self._queued
        # Everything unanswered on the last connection is at the head of the queue: it
        # goes first, in the order it was asked.
        try:
            while True:
                if not core.queued:
                    await queued.wait()
                queued.clear()
                # One round of the loop lets every caller that is ready now queue its call,
                # so concurrent calls leave together in one frame.
                await asyncio.sleep(0)
                for frame in core.frames_to_send():
                    await websocket.send(frame)
        except ConnectionClosed:
            return  # these calls count as sent: `connection_lost` queues them again

    async def _read_loop(self, websocket: ClientConnection) -> None:
        core = self._core
        while True:
            try:
                payload = await websocket.recv()
            except ConnectionClosed as closed:
                if not self._closing.is_set():
                    log.info("connection to %s closed (%s); reconnecting", self.url, closed)
                return
            if isinstance(payload, str):
                continue
            self._deliver(core.receive_frame(payload))

    async def aclose(self, runner: asyncio.Task[None]) -> None:
        """Close the connection with a handshake (bounded by CLIENT_CLOSE_SECONDS_MAX) and end `runner`."""
        self.close()
        websocket = self._websocket
        try:
            if websocket is not None:
                await websocket.close()
        finally:
            if not runner.done():
                runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


@contextlib.asynccontextmanager
async def open_client(
    url: str,
    token: str | None = None,
    *,
    batch_requests_max: int = BATCH_REQUESTS_MAX,
    inflight_requests_max: int = INFLIGHT_REQUESTS_MAX,
    reconnect_attempts: int = RECONNECT_ATTEMPTS,
    reconnect_delay_seconds: float = RECONNECT_DELAY_SECONDS,
) -> AsyncIterator[Client]:
    """Connect to a soldout server; the client reconnects by itself until the block ends.
    Raises ClientError when the server refuses the connection or cannot be reached."""
    client = Client(
        url,
        token,
        batch_requests_max=batch_requests_max,
        inflight_requests_max=inflight_requests_max,
        reconnect_attempts=reconnect_attempts,
        reconnect_delay_seconds=reconnect_delay_seconds,
    )
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(client.run(started), name=f"soldout client {url}")
    try:
        await started
    except BaseException:
        await client.aclose(runner)
        raise
    if client.failure is not None:
        await client.aclose(runner)
        raise client.failure
    try:
        yield client
    finally:
        await client.aclose(runner)
