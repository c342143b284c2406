"""The load driver: each driver process drives its share of the crowd over its share of connections.

The orchestrator (bench/orchestrator.py) starts the drivers with multiprocessing's 'spawn'
context. Each one rebuilds the scenario's plan (deterministic for the seed), takes its
buyers, opens its connections, says it is ready, waits for the start time the
orchestrator gives every driver, drives, and sends back a `DriverResult`: replies by
status, an HDR latency histogram (encoded, so the parent can merge them), a timeline, and
every `ok` hold it was given, which the end checks need.

`ConnectionWork` is the driving logic without I/O: which batch goes next (winners'
follow-ups and `busy` retries first, then the crowd, on schedule in open loop, within
the in-flight window) and what each answer means. Two thin loops drive it: one over
websockets (trio, trio-websocket) for soldout and the echo server, one over Redis
connections (asyncio, redis-py) for the peer; the bytes on the wire are the targets'
(bench/targets.py). So every target is driven the same way: same buyers, same batches,
same connections, same window.

Latency is measured per request from its *intended* send time: in open loop the
schedule's time, so a server that falls behind is charged for the wait
(no coordinated omission); in closed loop the moment the batch was handed to the socket.
"""

from __future__ import annotations

import contextlib
import heapq
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from bench.scenarios import CANCEL, CANCEL_OP, CONFIRM, CONFIRM_OP, RESERVE_OP, Item, Plan, Scenario, split
from bench.targets import Answer, Encoder, redis_answer, redis_encoder, soldout_encoder, websocket_answers
from protocol.client_core import reconnect_delay_seconds, unavailable_retry_pause_seconds
from protocol.limits import CLIENT_RECONNECT_ATTEMPTS, CLIENT_UNAVAILABLE_RETRIES_MAX

__all__ = ["CANCEL_OP", "CONFIRM_OP", "RESERVE_OP", "Answer", "Item"]

FOLLOW_UP_OPS = {CONFIRM: CONFIRM_OP, CANCEL: CANCEL_OP}
OK = "ok"
BUSY = "busy"
SOLD_OUT = "sold_out"
# Not decided for now (in a cluster: the shard has no owner for a moment): the same
# request goes again, with its key, after a growing pause, a bounded number of times.
UNAVAILABLE = "unavailable"
# A reply the transport could not read as a reply (a Redis script error, say).
ERROR = "error"

LATENCY_LOWEST_MICROSECONDS = 1
LATENCY_HIGHEST_MICROSECONDS = 300_000_000
LATENCY_SIGNIFICANT_FIGURES = 3
BUCKET_SECONDS = 0.1
# After the duration cap, how long requests already in flight may take to be answered.
ANSWER_GRACE_SECONDS = 30.0
# How long a driver waits for the parent's start signal before giving up.
START_WAIT_SECONDS = 300.0
FRAME_BYTES_MAX = 64 * 1024 * 1024

# Per driver process, these counters in a shared array feed the live progress line.
PROGRESS_FIELDS = ("sent", "answered", "won", "sold")


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LATENCY_LOWEST_MICROSECONDS, LATENCY_HIGHEST_MICROSECONDS, LATENCY_SIGNIFICANT_FIGURES)


@dataclass(frozen=True)
class DriverSettings:
    target: str  # "soldout", "echo" or "redis"
    url: str
    token: str | None
    scenario: Scenario
    index: int
    buyers: range
    connections: int
    batch: int
    inflight: int
    # Requests per second per connection in open loop; None for closed loop.
    rate_per_connection: float | None
    duration_seconds: float | None
    # This driver's first connection among all drivers' connections, and how many there are:
    # in open loop each connection's schedule is shifted by its share of the interval,
    # so the crowd arrives evenly instead of in bursts of one batch per connection.
    connection_offset: int = 0
    connections_total: int = 1
    # Redis only: the loaded script and the run's key prefix.
    script_sha: str = ""
    redis_prefix: str = ""
    # soldout: every gateway of a cluster (`url` is the first). Connection k of the run
    # starts at gateway k mod their count; a connection that is lost opens again at the
    # next one, and what it had in flight goes again with the same keys.
    urls: tuple[str, ...] = ()

    @property
    def gateways(self) -> tuple[str, ...]:
        return self.urls or (self.url,)


@dataclass
class DriverResult:
    index: int
    statuses: dict[str, dict[str, int]]
    histogram: bytes
    answered_per_bucket: list[int]
    # Units taken by ok reserves minus units given back by ok cancels, per bucket.
    held_per_bucket: list[int]
    # Reserves answered ok, and answered sold_out, per bucket.
    ok_per_bucket: list[int]
    sold_out_per_bucket: list[int]
    # Per bucket, the fewest units left that an ok reserve of the first SKU reported:
    # the units left as the server saw them, units given back by expiry included.
    remaining_per_bucket: list[int | None]
    first_send_at: float | None
    last_answer_at: float | None
    # When the last buyer of this driver got a final answer to its reserve.
    crowd_answered_at: float | None
    # SKU index -> the first answer that reported no units left.
    sold_out_at: dict[int, float]
    # (SKU index, buyer number, reservation) of every ok reserve.
    holds: list[tuple[int, int, str]]
    # SKU index -> units confirmed / cancelled by ok replies.
    confirmed: dict[int, int]
    cancelled: dict[int, int]
    sent: int
    crowd_buyers: int
    crowd_answered: int
    busy_retries: int
    unanswered: int = 0
    # Requests sent again after an `unavailable` answer, and those still unavailable after
    # the last try (their outcome unknown).
    unavailable_retries: int = 0
    unavailable_unresolved: int = 0
    # Connections opened again after one was lost, and the requests they sent again.
    reconnects: int = 0
    resent_after_loss: int = 0
    # Crowd buyers never sent because the duration cap came first.
    unsent_buyers: int = 0
    # CPU seconds this driver process spent from the start to its last answer.
    cpu_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class Tally:
    """What one driver process saw, over all its connections."""

    def __init__(self, start_at: float, progress: Any = None, progress_base: int = 0) -> None:
        self.start_at = start_at
        self.histogram = new_histogram()
        self.statuses: dict[str, dict[str, int]] = {RESERVE_OP: {}, CONFIRM_OP: {}, CANCEL_OP: {}}
        self.answered_per_bucket: list[int] = []
        self.held_per_bucket: list[int] = []
        self.ok_per_bucket: list[int] = []
        self.sold_out_per_bucket: list[int] = []
        # Per bucket, the fewest units left that an ok reserve of the first SKU reported.
        self.remaining_per_bucket: list[int | None] = []
        self.first_send_at: float | None = None
        self.last_answer_at: float | None = None
        self.crowd_answered_at: float | None = None
        self.sold_out_at: dict[int, float] = {}
        self.holds: list[tuple[int, int, str]] = []
        self.confirmed: dict[int, int] = {}
        self.cancelled: dict[int, int] = {}
        self.sent = 0
        self.answered = 0
        self.won = 0
        self.sold = 0
        self.crowd_buyers = 0
        self.crowd_answered = 0
        self.busy_retries = 0
        self.unanswered = 0
        self.unavailable_retries = 0
        self.unavailable_unresolved = 0
        self.reconnects = 0
        self.resent_after_loss = 0
        self.unsent_buyers = 0
        self.cpu_started_at: float | None = None
        self.cpu_seconds = 0.0
        self._progress = progress
        self._progress_base = progress_base

    def bucket(self, now: float) -> int:
        index = max(0, int((now - self.start_at) / BUCKET_SECONDS))
        while len(self.answered_per_bucket) <= index:
            self.answered_per_bucket.append(0)
            self.held_per_bucket.append(0)
            self.ok_per_bucket.append(0)
            self.sold_out_per_bucket.append(0)
            self.remaining_per_bucket.append(None)
        return index

    def publish(self) -> None:
        progress = self._progress
        if progress is not None:
            base = self._progress_base
            progress[base] = self.sent
            progress[base + 1] = self.answered
            progress[base + 2] = self.won
            progress[base + 3] = self.sold

    def result(self, index: int, errors: list[str]) -> DriverResult:
        return DriverResult(
            index=index,
            statuses=self.statuses,
            histogram=self.histogram.encode(),
            answered_per_bucket=self.answered_per_bucket,
            held_per_bucket=self.held_per_bucket,
            ok_per_bucket=self.ok_per_bucket,
            sold_out_per_bucket=self.sold_out_per_bucket,
            remaining_per_bucket=self.remaining_per_bucket,
            first_send_at=self.first_send_at,
            last_answer_at=self.last_answer_at,
            crowd_answered_at=self.crowd_answered_at,
            sold_out_at=self.sold_out_at,
            holds=self.holds,
            confirmed=self.confirmed,
            cancelled=self.cancelled,
            sent=self.sent,
            crowd_buyers=self.crowd_buyers,
            crowd_answered=self.crowd_answered,
            busy_retries=self.busy_retries,
            unanswered=self.unanswered,
            unavailable_retries=self.unavailable_retries,
            unavailable_unresolved=self.unavailable_unresolved,
            reconnects=self.reconnects,
            resent_after_loss=self.resent_after_loss,
            unsent_buyers=self.unsent_buyers,
            cpu_seconds=self.cpu_seconds,
            errors=errors,
        )


@dataclass(slots=True)
class Batch:
    items: Sequence[Item]
    first_id: int
    payload: bytes
    intended_at: float = 0.0
    crowd_number: int = -1  # position in the crowd schedule; -1 for follow-ups and retries


class ConnectionWork:
    """One connection's share of the crowd, and what to send next; no I/O."""

    def __init__(
        self,
        crowd: Sequence[Item],
        plan: Plan,
        encode: Encoder,
        tally: Tally,
        *,
        batch: int,
        inflight: int,
        rate: float | None,
        duration_seconds: float | None,
        phase: float = 0.0,
    ) -> None:
        assert batch >= 1
        assert inflight >= 1
        assert 0.0 <= phase < 1.0
        self.plan = plan
        self.actions = plan.actions
        self.encode = encode
        self.tally = tally
        self.batch = batch
        self.inflight_max = inflight
        self.inflight = 0
        self._next_id = 1
        # The crowd goes out in fixed batches. In closed loop they are packed before the
        # clock starts; in open loop, which waits between batches anyway, each is packed
        # when it is due, so a long soak does not hold its whole crowd packed in memory.
        self._crowd: deque[Batch] = deque()
        self._unpacked = crowd
        self._unpacked_next = 0
        self._pack_ahead = not rate
        self._crowd_numbers = 0
        if self._pack_ahead:
            while self._unpacked_next < len(crowd):
                self._crowd.append(self._pack_next())
        elif crowd:
            self._crowd.append(self._pack_next())
        tally.crowd_buyers += len(crowd)
        # Winners' confirms and cancels, and reserves answered busy, wait here: (item, ready at).
        self._follow_ups: deque[tuple[Item, float]] = deque()
        # Requests answered `unavailable`, each waiting out its pause: (ready at, order, item).
        self._retry_later: list[tuple[float, int, Item]] = []
        self._retry_order = 0
        self._unavailable_tries: dict[Item, int] = {}
        # A request sent more than once (unavailable, or its connection lost) is timed
        # from its first intended send, once, when its final answer comes.
        self._first_intended: dict[Item, float] = {}
        self._interval = batch / rate if rate else None
        self._phase = phase
        self._duration_seconds = duration_seconds
        self._start_at = 0.0
        self.deadline: float | None = None
        self.begin(tally.start_at)

    def begin(self, start_at: float) -> None:
        """The common start time (monotonic seconds): the schedule and the duration cap count from it."""
        self._start_at = start_at
        self.tally.start_at = start_at
        if self._duration_seconds is not None:
            self.deadline = start_at + self._duration_seconds

    def _pack_next(self) -> Batch:
        start = self._unpacked_next
        items = self._unpacked[start : start + self.batch]
        self._unpacked_next = start + len(items)
        first_id = self._take_ids(len(items))
        number = self._crowd_numbers
        self._crowd_numbers += 1
        return Batch(items, first_id, self.encode(items, first_id), crowd_number=number)

    def _crowd_left(self) -> int:
        return sum(len(batch.items) for batch in self._crowd) + len(self._unpacked) - self._unpacked_next

    def _take_ids(self, count: int) -> int:
        first = self._next_id
        self._next_id += count
        return first

    @property
    def finished(self) -> bool:
        return not self._crowd and not self._follow_ups and not self._retry_later and self.inflight == 0

    def _room_for(self, count: int) -> bool:
        # A batch larger than the window still goes when nothing else is in flight.
        return self.inflight == 0 or self.inflight + count <= self.inflight_max

    def take(self, now: float) -> Batch | None:
        """The batch to send now, or None (wait for an answer or for `wake_at`)."""
        retry_later = self._retry_later
        while retry_later and retry_later[0][0] <= now:
            ready_at, _, item = heapq.heappop(retry_later)
            self._follow_ups.append((item, ready_at))
        if self._follow_ups:
            count = min(self.batch, len(self._follow_ups))
            if not self._room_for(count):
                return None
            ready = [self._follow_ups.popleft() for _ in range(count)]
            items = [item for item, _ in ready]
            first_id = self._take_ids(count)
            sent = Batch(items, first_id, self.encode(items, first_id), intended_at=ready[0][1])
            return self._sending(sent, now)
        if not self._crowd:
            return None
        if self.deadline is not None and now >= self.deadline:
            # The duration cap: the rest of the crowd never arrives.
            self.tally.unsent_buyers += self._crowd_left()
            self._crowd.clear()
            self._unpacked_next = len(self._unpacked)
            return None
        batch = self._crowd[0]
        intended = self._intended(batch)
        if intended is not None and intended > now:
            return None
        if not self._room_for(len(batch.items)):
            return None
        self._crowd.popleft()
        if not self._crowd and self._unpacked_next < len(self._unpacked):
            self._crowd.append(self._pack_next())
        batch.intended_at = intended if intended is not None else now
        return self._sending(batch, now)

    def _intended(self, batch: Batch) -> float | None:
        if self._interval is None:
            return None
        return self._start_at + (batch.crowd_number + self._phase) * self._interval

    def _sending(self, batch: Batch, now: float) -> Batch:
        count = len(batch.items)
        self.inflight += count
        tally = self.tally
        tally.sent += count
        if tally.first_send_at is None:
            tally.first_send_at = now
        return batch

    def wake_at(self) -> float | None:
        """When the schedule lets the next crowd batch, or an `unavailable` retry, go; None
        when only an answer can help."""
        if self._follow_ups:
            return None
        retry_at = self._retry_later[0][0] if self._retry_later else None
        crowd_at = self._crowd_wake_at()
        if retry_at is None or crowd_at is None:
            return crowd_at if retry_at is None else retry_at
        return min(retry_at, crowd_at)

    def _crowd_wake_at(self) -> float | None:
        if not self._crowd or self._interval is None:
            return None
        if not self._room_for(len(self._crowd[0].items)):
            return None
        intended = self._intended(self._crowd[0])
        if self.deadline is not None and intended is not None:
            return min(intended, self.deadline)
        return intended

    def _retry_unavailable(self, item: Item, intended_at: float, now: float) -> bool:
        """Queue `item` to go again after its pause; False once it has had every try."""
        tries = self._unavailable_tries.get(item, 0) + 1
        if tries > CLIENT_UNAVAILABLE_RETRIES_MAX:
            return False
        self._unavailable_tries[item] = tries
        self._first_intended.setdefault(item, intended_at)
        self._retry_order += 1
        heapq.heappush(self._retry_later, (now + unavailable_retry_pause_seconds(tries), self._retry_order, item))
        return True

    def connection_lost(self, batches: Sequence[Batch], now: float) -> None:
        """The connection went with these batches unanswered: their requests go first on
        the next one, with the same keys (a decided reserve's retry returns its hold)."""
        again: list[tuple[Item, float]] = []
        for batch in sorted(batches, key=lambda batch: batch.first_id):
            self.inflight -= len(batch.items)
            self.tally.resent_after_loss += len(batch.items)
            for item in batch.items:
                self._first_intended.setdefault(item, batch.intended_at)
                again.append((item, now))
        self._follow_ups.extendleft(reversed(again))

    def answered(self, batch: Batch, answers: Sequence[Answer], now: float) -> None:
        """Book the answers to `batch` (in request order), received at `now`."""
        items = batch.items
        assert len(answers) == len(items), f"{len(answers)} answers for a batch of {len(items)}"
        self.inflight -= len(items)
        tally = self.tally
        bucket = tally.bucket(now)
        first_intended = self._first_intended
        # Timed in one go: every request of the batch sent for the first time and decided.
        timed_together = len(items)
        statuses = tally.statuses
        actions = self.actions
        follow_ups = self._follow_ups
        answered = 0
        held = 0
        won = 0
        ok_reserves = 0
        sold_out = 0
        fewest_remaining = None
        crowd_answered = 0
        for item, (status, reservation, remaining) in zip(items, answers, strict=True):
            op = item[0]
            counts = statuses[op]
            counts[status] = counts.get(status, 0) + 1
            again = item in first_intended
            if again:
                timed_together -= 1
            if status == BUSY:
                # Not decided: the same request (same idempotency key) goes again.
                follow_ups.append((item, now))
                tally.busy_retries += 1
                continue
            if status == UNAVAILABLE:
                if self._retry_unavailable(item, batch.intended_at, now):
                    timed_together -= not again
                    tally.unavailable_retries += 1
                    continue
                tally.unavailable_unresolved += 1
            if again:
                _record_latency(tally, now - first_intended.pop(item))
                self._unavailable_tries.pop(item, None)
            answered += 1
            if op == RESERVE_OP:
                crowd_answered += 1
                if status == SOLD_OUT:
                    sold_out += 1
                elif status == OK:
                    sku = item[2]
                    held += 1
                    won += 1
                    ok_reserves += 1
                    tally.holds.append((sku, item[1], reservation))  # type: ignore[arg-type]
                    if sku == 0 and remaining is not None:
                        fewest_remaining = remaining
                    if remaining == 0 and sku not in tally.sold_out_at:
                        tally.sold_out_at[sku] = now
                    follow_up = FOLLOW_UP_OPS.get(actions[item[1]])
                    if follow_up is not None:
                        follow_ups.append(((follow_up, item[1], sku, reservation), now))
            elif status == OK:
                sku = item[2]
                if op == CONFIRM_OP:
                    tally.confirmed[sku] = tally.confirmed.get(sku, 0) + 1
                    tally.sold += 1
                else:
                    tally.cancelled[sku] = tally.cancelled.get(sku, 0) + 1
                    held -= 1
        if timed_together:
            _record_latency(tally, now - batch.intended_at, timed_together)
        tally.answered += answered
        tally.won += won
        tally.answered_per_bucket[bucket] += answered
        tally.held_per_bucket[bucket] += held
        tally.ok_per_bucket[bucket] += ok_reserves
        tally.sold_out_per_bucket[bucket] += sold_out
        if fewest_remaining is not None:
            # A batch is decided in order, so its last ok left the fewest units.
            current = tally.remaining_per_bucket[bucket]
            if current is None or fewest_remaining < current:
                tally.remaining_per_bucket[bucket] = fewest_remaining
        tally.last_answer_at = now
        if crowd_answered:
            tally.crowd_answered += crowd_answered
            tally.crowd_answered_at = now
        tally.publish()

    def abandon(self) -> int:
        """Give up on everything not answered; returns how many requests that was."""
        lost = self.inflight + len(self._follow_ups) + len(self._retry_later)
        self.tally.unsent_buyers += self._crowd_left()
        self.tally.unanswered += lost
        self._crowd.clear()
        self._unpacked_next = len(self._unpacked)
        self._follow_ups.clear()
        self._retry_later.clear()
        self.inflight = 0
        return lost


def _record_latency(tally: Tally, seconds: float, count: int = 1) -> None:
    latency = int(seconds * 1_000_000)
    latency = min(max(latency, LATENCY_LOWEST_MICROSECONDS), LATENCY_HIGHEST_MICROSECONDS)
    tally.histogram.record_value(latency, count)


def crowd_items(plan: Plan, buyers: range) -> list[Item]:
    sku_indexes = plan.sku_indexes
    return [(RESERVE_OP, number, sku_indexes[number], None) for number in buyers]


class Crowd(Sequence[Item]):
    """A connection's buyers as the crowd's requests, made as they are sliced off."""

    def __init__(self, plan: Plan, buyers: range) -> None:
        self.plan = plan
        self.buyers = buyers

    def __len__(self) -> int:
        return len(self.buyers)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return crowd_items(self.plan, self.buyers[index])
        number = self.buyers[index]
        return (RESERVE_OP, number, self.plan.sku_indexes[number], None)


def connection_shares(settings: DriverSettings, plan: Plan) -> list[Crowd]:
    """This driver's buyers, cut into one contiguous share per connection."""
    return [Crowd(plan, share) for share in split(settings.buyers, settings.connections)]


def connection_phase(settings: DriverSettings, number: int) -> float:
    """Where in the open-loop interval this driver's connection `number` sends its batches."""
    return (settings.connection_offset + number) / max(settings.connections_total, 1) % 1.0


def connection_work(
    settings: DriverSettings, plan: Plan, encode: Encoder, tally: Tally, number: int, share: Sequence[Item]
) -> ConnectionWork:
    """The work of this driver's connection `number`, for every target alike."""
    return ConnectionWork(
        share,
        plan,
        encode,
        tally,
        batch=settings.batch,
        inflight=settings.inflight,
        rate=settings.rate_per_connection,
        duration_seconds=settings.duration_seconds,
        phase=connection_phase(settings, number),
    )


# ---------------------------------------------------------------- soldout and echo, over websockets


async def drive_websockets(settings: DriverSettings, plan: Plan, tally: Tally, started: Callable[[], Any]) -> list[str]:
    """Open the connections, wait for the start (`started` blocks until then), drive them all."""
    import trio

    encode = soldout_encoder(plan)
    headers = [("Authorization", f"Bearer {settings.token}")] if settings.token else []
    works = [
        connection_work(settings, plan, encode, tally, number, share)
        for number, share in enumerate(connection_shares(settings, plan))
    ]
    errors: list[str] = []
    go = trio.Event()
    async with trio.open_nursery() as connections:
        for number, work in enumerate(works):
            first = (settings.connection_offset + number) % len(settings.gateways)
            await connections.start(_keep_driving, settings.gateways, first, headers, work, go, errors)
        start_at = await trio.to_thread.run_sync(started)
        for work in works:
            work.begin(start_at)
        await trio.sleep(max(0.0, start_at - time.monotonic()))
        tally.cpu_started_at = time.process_time()
        go.set()
    return errors


def _connection_errors() -> tuple[type[BaseException], ...]:
    import trio
    from trio_websocket import ConnectionClosed, HandshakeError

    return (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError)


async def _keep_driving(
    urls: Sequence[str],
    first: int,
    headers: list,
    work: ConnectionWork,
    go: Any,
    errors: list[str],
    *,
    task_status: Any,
) -> None:
    """One connection of the crowd, from its first gateway on: when it is lost (its
    gateway died), what it had in flight goes again through the next gateway, with the
    same keys, after the clients' own reconnect pause, a bounded number of times."""
    import trio
    from trio_websocket import open_websocket_url

    lost = _connection_errors()
    at = first
    failures = 0
    ready = False
    while True:
        url = urls[at % len(urls)]
        outstanding: dict[int, Batch] = {}
        try:
            async with open_websocket_url(url, extra_headers=headers, max_message_size=FRAME_BYTES_MAX) as websocket:
                if not ready:
                    ready = True
                    task_status.started()
                    await go.wait()
                failures = 0
                await _drive_one_websocket(websocket, work, errors, outstanding)
                return
        except* lost as group:
            if not ready:
                raise
            error = group.exceptions[0]
        work.connection_lost(list(outstanding.values()), time.monotonic())
        failures += 1
        if failures > CLIENT_RECONNECT_ATTEMPTS:
            lost_count = work.abandon()
            errors.append(f"{lost_count} requests abandoned: no gateway answered in {failures - 1} tries ({error!r})")
            return
        work.tally.reconnects += 1
        at += 1
        await trio.sleep(reconnect_delay_seconds(failures))


async def _drive_one_websocket(
    websocket: Any, work: ConnectionWork, errors: list[str], outstanding: dict[int, Batch]
) -> None:
    import trio

    changed = [trio.Event()]

    async def send(receiving: trio.CancelScope) -> None:
        while True:
            batch = work.take(time.monotonic())
            if batch is not None:
                outstanding[batch.first_id] = batch
                await websocket.send_message(batch.payload)
                continue
            if work.finished:
                # Nothing in flight and nothing left (the duration cap can end the work
                # here): the receiver would wait for a frame that never comes.
                receiving.cancel()
                return
            wake = work.wake_at()
            event = changed[0] = trio.Event()
            if wake is None:
                await event.wait()
            else:
                with trio.move_on_after(max(0.0, wake - time.monotonic())):
                    await event.wait()

    async def receive(receiving: trio.CancelScope) -> None:
        with receiving:
            while not work.finished:
                payload = await websocket.get_message()
                now = time.monotonic()
                first_id, answers = websocket_answers(payload, outstanding)
                batch = outstanding.pop(first_id)
                work.answered(batch, answers, now)
                changed[0].set()

    give_up_at = float("inf") if work.deadline is None else _trio_time(work.deadline + ANSWER_GRACE_SECONDS)
    with trio.move_on_at(give_up_at):
        async with trio.open_nursery() as nursery:
            receiving = trio.CancelScope()
            nursery.start_soon(send, receiving)
            nursery.start_soon(receive, receiving)
    if not work.finished:
        lost = work.abandon()
        errors.append(f"{lost} requests still unanswered {ANSWER_GRACE_SECONDS:.0f} s after the duration cap")


def _trio_time(monotonic: float) -> float:
    import trio

    return trio.current_time() + (monotonic - time.monotonic())


# ---------------------------------------------------------------- the Redis peer, over its own connections


async def drive_redis(settings: DriverSettings, plan: Plan, tally: Tally, started: Callable[[], Any]) -> list[str]:
    """As `drive_websockets`: the same shares, batches, window and schedule; one Redis
    connection per soldout connection, each with its pipelined batches in flight."""
    import asyncio

    from redis.asyncio.connection import Connection, parse_url
    from redis.exceptions import ResponseError

    options = parse_url(settings.url)
    connections = []
    works = []
    for number, share in enumerate(connection_shares(settings, plan)):
        connection = Connection(
            host=options.get("host", "127.0.0.1"),
            port=options.get("port", 6379),
            db=options.get("db", 0),
            password=options.get("password"),
            username=options.get("username"),
            decode_responses=True,
        )
        await connection.connect()
        connections.append(connection)
        encode = redis_encoder(
            connection.pack_commands, settings.script_sha, settings.redis_prefix, settings.scenario.skus
        )
        works.append(connection_work(settings, plan, encode, tally, number, share))
    start_at = await asyncio.to_thread(started)
    for work in works:
        work.begin(start_at)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    tally.cpu_started_at = time.process_time()
    errors: list[str] = []

    async def drive_one(connection: Any, work: ConnectionWork) -> None:
        sent: deque[Any] = deque()
        # The sender waits for answers (window full, or nothing left but answers to come);
        # the receiver waits for something to be sent.
        answered = [asyncio.Event()]
        batch_sent = [asyncio.Event()]

        async def send() -> None:
            while True:
                batch = work.take(time.monotonic())
                if batch is not None:
                    sent.append(batch)
                    batch_sent[0].set()
                    await connection.send_packed_command(batch.payload, check_health=False)
                    continue
                if work.finished:
                    batch_sent[0].set()
                    return
                wake = work.wake_at()
                event = answered[0] = asyncio.Event()
                timeout = None if wake is None else max(0.0, wake - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout)

        async def receive() -> None:
            while not work.finished:
                if not sent:
                    event = batch_sent[0] = asyncio.Event()
                    await event.wait()
                    continue
                batch = sent.popleft()
                answers = []
                for _ in batch.items:
                    try:
                        answers.append(redis_answer(await connection.read_response()))
                    except ResponseError as error:
                        answers.append((ERROR, None, None))
                        if len(errors) < 10:
                            errors.append(f"Redis error: {error}")
                work.answered(batch, answers, time.monotonic())
                answered[0].set()

        give_up = None if work.deadline is None else work.deadline + ANSWER_GRACE_SECONDS - time.monotonic()
        try:
            async with asyncio.timeout(give_up):
                await asyncio.gather(send(), receive())
        except TimeoutError:
            if not work.finished:
                lost = work.abandon()
                errors.append(f"{lost} requests still unanswered {ANSWER_GRACE_SECONDS:.0f} s after the duration cap")

    try:
        pairs = zip(connections, works, strict=True)
        await asyncio.gather(*(drive_one(connection, work) for connection, work in pairs))
    finally:
        for connection in connections:
            await connection.disconnect()
    return errors


# ---------------------------------------------------------------- the process


def process_main(
    settings: DriverSettings,
    progress: Any,
    messages: Any,
    go: Any,
    start_value: Any,
) -> None:
    """Entry point of a driver process (multiprocessing, 'spawn' context)."""
    try:
        plan = settings.scenario.plan()
        tally = Tally(0.0, progress, settings.index * len(PROGRESS_FIELDS))

        def started() -> float:
            messages.put(("ready", settings.index, None))
            if not go.wait(START_WAIT_SECONDS):
                raise TimeoutError("the bench never gave the start signal")
            return start_value.value

        if settings.target == "redis":
            import asyncio

            errors = asyncio.run(drive_redis(settings, plan, tally, started))
        else:
            import trio

            errors = trio.run(drive_websockets, settings, plan, tally, started)
        if tally.cpu_started_at is not None:
            tally.cpu_seconds = time.process_time() - tally.cpu_started_at
        messages.put(("result", settings.index, tally.result(settings.index, errors)))
    except BaseException:
        messages.put(("error", settings.index, traceback.format_exc()))
