"""The client's whole logic for protocol v1, sans-IO: calls in, frames out; frames in, answers out.

`ClientCore` is what the trio client (`protocol.client`) and the asyncio client
(`protocol.aio`) share; each is this core plus a websocket library. The core owns:

- the ids: every call gets a fresh one, never reused, so a reply can only ever answer
  the call that asked (a call given up on is never answered into another);
- the idempotency keys: a reserve without one gets a random key when it is made, so
  that sending it again after a dropped connection returns the first hold;
- the batching: `frame_to_send` takes every call waiting, up to `batch_requests_max`,
  into one frame (a map for one request, an array for more), in the order they were made;
- the matching: `receive_frame` turns a frame of replies into `Answered` events by id,
  whatever order the frames arrive in; a reply the server could not give an id (it
  refused a whole frame) fails every call sent and unanswered, as `Failed` events;
- the bound on calls in flight: made and not yet answered (`room` says how many more);
- the resend: `connection_lost` puts every call sent and unanswered back at the head of
  the queue, in the order it was made, for the next connection's first frames.

It never imports trio or asyncio, opens no socket and reads no clock; the transports
wait for room, for frames and for answers, and decide when to reconnect (the delay
comes from `reconnect_delay_seconds`). Misuse raises `LocalProtocolError`; a frame
that is not a reply frame becomes an `Unreadable` event, and the calls it may have
answered wait for the next connection.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from protocol.codec import ClientCodec, LocalProtocolError, RemoteProtocolError, reply_from_map, request_map
from protocol.limits import (
    CLIENT_BATCH_REQUESTS_MAX,
    CLIENT_INFLIGHT_REQUESTS_MAX,
    CLIENT_RECONNECT_ATTEMPTS,
    CLIENT_RECONNECT_DELAY_SECONDS,
    CLIENT_RECONNECT_DELAY_STEPS_MAX,
    CLIENT_REPLY_FRAME_BYTES_MAX,
    CLIENT_UNAVAILABLE_RETRIES_MAX,
    CLIENT_UNAVAILABLE_RETRY_SECONDS,
    CLIENT_UNAVAILABLE_RETRY_SECONDS_MAX,
    Limits,
)
from protocol.messages import (
    UNAVAILABLE,
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

# The clients' bounds and backoff live with every other bound, in protocol/limits.py.
BATCH_REQUESTS_MAX: Final = CLIENT_BATCH_REQUESTS_MAX
INFLIGHT_REQUESTS_MAX: Final = CLIENT_INFLIGHT_REQUESTS_MAX
RECONNECT_ATTEMPTS: Final = CLIENT_RECONNECT_ATTEMPTS
RECONNECT_DELAY_SECONDS: Final = CLIENT_RECONNECT_DELAY_SECONDS
REPLY_FRAME_BYTES_MAX: Final = CLIENT_REPLY_FRAME_BYTES_MAX
RECONNECT_DELAY_STEPS_MAX: Final = CLIENT_RECONNECT_DELAY_STEPS_MAX


class ClientError(Exception):
    """The client cannot reach a usable server: refused, unreachable, or closed; or the
    server refused a call's frame. Raised by both clients."""


def reconnect_delay_seconds(failures: int, delay_seconds: float = RECONNECT_DELAY_SECONDS) -> float:
    """How long to wait before connecting again after `failures` attempts in a row failed."""
    assert failures >= 1, failures
    return delay_seconds * min(failures, RECONNECT_DELAY_STEPS_MAX)


def unavailable_retry_pause_seconds(attempt: int) -> float:
    """The pause before the `attempt`-th resend of a reserve answered `unavailable`:
    doubling from the first, up to the last (every client and the bench use it)."""
    assert attempt >= 1
    return min(CLIENT_UNAVAILABLE_RETRY_SECONDS * 2 ** (attempt - 1), CLIENT_UNAVAILABLE_RETRY_SECONDS_MAX)


def random_key() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Answered:
    """The server answered call `call`. `reply` is the typed reply of a command or a
    ping, and the reply map itself for `stats`."""

    call: int
    reply: Any


@dataclass(frozen=True, slots=True)
class Failed:
    """Call `call` will never be answered: the server refused its frame, or the client gave up."""

    call: int
    error: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A frame from the server that is not a reply frame (a server bug): nothing it held is matched."""

    error: str


Event = Answered | Failed | Unreadable


class _Call:
    __slots__ = ("abandoned", "op", "request", "sent")

    def __init__(self, op: str, request: dict[str, Any]) -> None:
        self.op = op
        self.request = request
        # Handed to a frame on the current connection, and not answered yet.
        self.sent = False
        # The caller gave up after it was sent: its reply is dropped when it comes.
        self.abandoned = False


# Replies that are not `reply_from_map`'s to build.
def _ping_reply(reply: dict[str, Any]) -> Reply:
    return Reply(reply["status"], error=reply.get("error"))


def _stats_reply(reply: dict[str, Any]) -> dict[str, Any]:
    return reply


_RAW_OPS: Final[dict[str, Callable[[dict[str, Any]], Any]]] = {"ping": _ping_reply, "stats": _stats_reply}


class ClientCore:
    """The calls of one client, over however many connections it takes to answer them."""

    def __init__(
        self,
        *,
        batch_requests_max: int = BATCH_REQUESTS_MAX,
        inflight_requests_max: int = INFLIGHT_REQUESTS_MAX,
        limits: Limits | None = None,
        make_key: Callable[[], str] = random_key,
    ) -> None:
        limits = limits or Limits()
        if not 1 <= batch_requests_max <= limits.batch_requests_max:
            raise ValueError(f"batch_requests_max must be 1 to {limits.batch_requests_max}, not {batch_requests_max}")
        if inflight_requests_max < 1:
            raise ValueError(f"inflight_requests_max must be positive, not {inflight_requests_max}")
        self.batch_requests_max = batch_requests_max
        self.inflight_requests_max = inflight_requests_max
        self._codec = ClientCodec(limits)
        self._make_key = make_key
        self._next_id = 1
        # Every call made and not answered: queued, sent, or sent and abandoned.
        self._calls: dict[int, _Call] = {}
        # Calls to send on this connection, in the order they were made.
        self._queue: deque[int] = deque()
        self.frames_sent = 0
        self.resent = 0

    # ---------------------------------------------------------------- calls

    @property
    def in_flight(self) -> int:
        """Calls made and not answered, abandoned ones still awaiting their reply included."""
        return len(self._calls)

    @property
    def room(self) -> int:
        """How many more calls may be made before one must be answered."""
        return self.inflight_requests_max - len(self._calls)

    @property
    def queued(self) -> int:
        """Calls waiting for `frame_to_send`."""
        return len(self._queue)

    def call(self, command: Command) -> int:
        """Make a call for `command`; returns its id, which its `Answered` or `Failed` will carry."""
        if type(command) is Reserve and command.key is None:
            command = Reserve(command.sku, command.buyer, command.qty, self._make_key())
        request_id = self._take_id()
        request = request_map(request_id, command)
        self._queue_call(request_id, _Call(request["op"], request))
        return request_id

    def call_op(self, op: str) -> int:
        """Make a call for an op without fields of its own: `ping` or `stats`."""
        if op not in _RAW_OPS:
            raise LocalProtocolError(f"call_op is for {sorted(_RAW_OPS)}, not {op!r:.80}; use call(command)")
        request_id = self._take_id()
        self._queue_call(request_id, _Call(op, {"id": request_id, "op": op}))
        return request_id

    def abandon(self, call: int) -> None:
        """The caller gave up on `call`: it is never answered. Not yet sent, it never goes;
        sent, it is not sent again, and it counts as in flight until its reply or the
        connection's end, so that the server's bound is not overrun."""
        state = self._calls.get(call)
        if state is None:
            return  # answered or failed already: the transport drops what it got
        if state.sent:
            state.abandoned = True
        else:
            del self._calls[call]
            # Rare (a caller cancelled before its frame left), so a linear removal will do.
            self._queue.remove(call)

    def _take_id(self) -> int:
        if len(self._calls) >= self.inflight_requests_max:
            raise LocalProtocolError(
                f"{self.inflight_requests_max} calls are in flight already; wait for room before calling"
            )
        request_id = self._next_id
        self._next_id = request_id + 1
        return request_id

    def _queue_call(self, request_id: int, state: _Call) -> None:
        self._calls[request_id] = state
        self._queue.append(request_id)

    # ---------------------------------------------------------------- frames out

    def frame_to_send(self) -> bytes | None:
        """The next frame to send on the connection: every queued call up to the batch
        bound, in order; None when nothing waits. Its calls count as sent from now: if the
        frame never leaves, `connection_lost` sends them again."""
        queue = self._queue
        if not queue:
            return None
        calls = self._calls
        requests = []
        for _ in range(min(len(queue), self.batch_requests_max)):
            state = calls[queue.popleft()]
            state.sent = True
            requests.append(state.request)
        self.frames_sent += 1
        if len(requests) == 1:
            return self._codec.encode_request(requests[0])
        return self._codec.encode_batch(requests)

    def frames_to_send(self) -> Iterable[bytes]:
        """Every frame `frame_to_send` has now."""
        while (frame := self.frame_to_send()) is not None:
            yield frame

    # ---------------------------------------------------------------- frames in

    def receive_frame(self, payload: bytes) -> list[Event]:
        """The events a reply frame makes: an answer for every reply to a call sent and
        not abandoned; replies to anything else (abandoned calls, ids this client never
        used) are dropped."""
        try:
            replies = self._codec.decode_replies(payload)
        except RemoteProtocolError as error:
            return [Unreadable(str(error))]
        events: list[Event] = []
        calls = self._calls
        for reply in replies:
            request_id = reply["id"]
            if request_id is None:
                # The server refused a whole frame (not msgpack, or a batch over its bound)
                # and cannot say which: every call sent and unanswered hears it, rather than
                # wait for a reply that will never come.
                events += self._fail_sent(f"the server refused a frame: {reply.get('status')}: {reply.get('error')}")
                continue
            state = calls.get(request_id)
            if state is None or not state.sent:
                continue
            del calls[request_id]
            if state.abandoned:
                continue
            raw = _RAW_OPS.get(state.op)
            events.append(Answered(request_id, reply_from_map(state.op, reply) if raw is None else raw(reply)))
        return events

    def _fail_sent(self, error: str) -> list[Event]:
        failed: list[Event] = []
        for request_id, state in list(self._calls.items()):
            if state.sent:
                del self._calls[request_id]
                if not state.abandoned:
                    failed.append(Failed(request_id, error))
        return failed

    # ---------------------------------------------------------------- connections

    def connection_lost(self) -> None:
        """The connection is gone, with whatever replies it still owed: every call sent and
        unanswered goes first on the next one, in the order it was made (reserves with the
        same keys); abandoned calls are forgotten, their replies can no longer come."""
        resend: list[int] = []
        for request_id, state in list(self._calls.items()):
            if not state.sent:
                continue
            if state.abandoned:
                del self._calls[request_id]
                continue
            state.sent = False
            resend.append(request_id)
        if resend:
            # Ids grow with every call, and sent calls left the queue's head: sorted, they
            # go back ahead of every call still queued, and in the order they were made.
            resend.sort()
            assert not self._queue or resend[-1] < self._queue[0]
            self._queue.extendleft(reversed(resend))
            self.resent += len(resend)

    def fail_all(self, error: str) -> list[Failed]:
        """Give up on every call (the client closes, or cannot reach the server): each hears `error`."""
        failed = [Failed(request_id, error) for request_id, state in self._calls.items() if not state.abandoned]
        self._calls.clear()
        self._queue.clear()
        return failed


# ------------------------------------------------------------------ the methods both clients offer


class ClientOperations:
    """Every operation of protocol v1 as a method, over the transport's `execute` and
    `_call_op`: the trio and the asyncio client share these, so their methods and reply
    types cannot drift apart."""

    # Reserves sent again because they were answered `unavailable`.
    unavailable_retries = 0

    async def execute(self, commands: Sequence[Command]) -> list[AnyReply]:
        """Send many commands at once, in the order given (so one shard decides them in
        that order); replies in the same order."""
        raise NotImplementedError

    async def _call_op(self, op: str) -> Any:
        raise NotImplementedError

    async def _pause(self, seconds: float) -> None:
        """Sleep, the transport's way (trio or asyncio)."""
        raise NotImplementedError

    async def call(self, command: Command) -> AnyReply:
        """Send one command and wait for its reply (batched with concurrent calls)."""
        return (await self.execute((command,)))[0]

    async def reserve(self, sku: str, *, buyer: str, qty: int = 1, key: str | None = None) -> Reply:
        """Hold `qty` units; `key` (one is made when none is given) makes a retry safe.

        A reserve answered `unavailable` (its shard's journal failed, or in a cluster the
        shard has no owner for a moment) may or may not have been decided: it is sent
        again with the same key, with a growing pause, a bounded number of times, and the
        first answer that is not `unavailable` is returned (a retry of a decided reserve
        returns its hold). After the last try the `unavailable` reply is returned.
        """
        command = Reserve(sku, buyer, qty, key if key is not None else random_key())
        reply: Reply = await self.call(command)  # type: ignore[assignment]
        for attempt in range(1, CLIENT_UNAVAILABLE_RETRIES_MAX + 1):
            if reply.status != UNAVAILABLE:
                break
            self.unavailable_retries += 1
            await self._pause(unavailable_retry_pause_seconds(attempt))
            reply = await self.call(command)  # type: ignore[assignment]
        return reply

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
        return await self._call_op("ping")  # type: ignore[no-any-return]

    async def stats(self) -> dict[str, Any]:
        reply = await self._call_op("stats")
        if reply["status"] != "ok":
            raise ClientError(f"stats: {reply['status']}: {reply.get('error', '')}")
        return reply["stats"]  # type: ignore[no-any-return]
