"""The shard actor: the one trio task that owns a book.

It waits for a batch in its mailbox (a bounded memory channel of `Batch`es, each the
commands one caller hands over at once), takes whatever else is already there up to
`shard_batch_commands_max` commands, decides every command in arrival order, commits
the records of all of them as one journal entry (one fsync when durable), and only
then releases the replies. Single writer, so no locks; while a commit is on disk the
mailbox fills, and the next batch is larger: group commit that grows with load.

A commit that fails (a full disk, an I/O error) is not a crash: the shard answers that
batch, and everything after it, `unavailable` (none of it is known to be on disk), and
a background task rebuilds its book from the files, with backoff, until the disk takes
writes again. The other shards serve on. A snapshot that fails is logged and retried
later: the journal still holds everything.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from engine.book import Book, Record
from engine.config import EngineConfig
from engine.journal import JournalCorrupt
from engine.manifest import DataDirError
from engine.store import RebuiltBook, ShardStore
from protocol.limits import RETRY_SECONDS_MAX, RETRY_SECONDS_MIN
from protocol.messages import UNAVAILABLE, AnyReply, Command, status_reply

log = logging.getLogger("soldout.shard")

SERVING = "serving"
UNAVAILABLE_STATE = "unavailable"
# What recovery can meet on a disk that failed: kept trying, never a crash.
DISK_FAULTS = (OSError, JournalCorrupt, DataDirError)


class EngineClosed(Exception):
    """The engine was used after its `open_engine` block ended."""


class BatchGroup:
    """The batches of one call, waited for together: the caller wakes once, when the last is answered.

    A frame for many shards hands each its part as a batch; waiting for each in turn would
    wake the caller once per shard.
    """

    __slots__ = ("_waiter", "pending")

    def __init__(self) -> None:
        self.pending = 0  # batches of the group not answered yet
        self._waiter: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        """Until every batch of the group is answered."""
        if not self.pending:
            await trio.lowlevel.checkpoint()
            return
        assert self._waiter is None, "a group has one waiter"
        self._waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _answered(self) -> None:
        self.pending -= 1
        waiter = self._waiter
        if not self.pending and waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)


class Batch:
    """Commands handed to a shard as one unit, and the slot their replies come back in.

    The caller parks in `wait` (or its group's) until the shard calls `resolve`. It is a
    one-shot trio.Event specialised for the hot path: one waiter, no parking lot. A
    caller cancelled while waiting stops waiting; the shard still decides the commands
    (they are already in its mailbox) and the replies go nowhere.
    """

    __slots__ = ("_group", "_waiter", "commands", "done", "replies")

    def __init__(self, commands: Sequence[Command], group: BatchGroup | None = None) -> None:
        self.commands = commands
        self.replies: list[AnyReply] = []
        self.done = False
        self._waiter: trio.lowlevel.Task | None = None
        self._group = group
        if group is not None:
            group.pending += 1

    async def wait(self) -> list[AnyReply]:
        if self.done:
            await trio.lowlevel.checkpoint()
            return self.replies
        assert self._waiter is None, "a batch has one waiter"
        self._waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return self.replies

    def resolve(self, replies: list[AnyReply]) -> None:
        assert not self.done, "a batch is answered once"
        self.replies = replies
        self.done = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)
        if self._group is not None:
            self._group._answered()


CommitObserver = Callable[[int, int, int, float], None]  # shard, commands, records, seconds


@dataclass(frozen=True, slots=True)
class ShardStatistics:
    shard: int
    batches: int
    commands: int
    records: int
    commits: int
    commit_seconds_total: float
    snapshots: int
    mailbox_used: int
    mailbox_max: int
    skus: int
    holds: int
    journal_segment: int
    state: str  # "serving", or "unavailable" while its journal cannot be written
    faults: int  # commits that failed
    snapshot_failures: int


class Shard:
    def __init__(
        self,
        index: int,
        config: EngineConfig,
        store: ShardStore | None,
        commit_observer: CommitObserver | None = None,
    ) -> None:
        self.index = index
        self.config = config
        self.store = store
        self.book = Book(index, config.limits)
        self._wall_clock = config.wall_clock
        self._commit_observer = commit_observer
        self._batch_commands_max = config.limits.shard_batch_commands_max
        self.mailbox, self._inbox = trio.open_memory_channel[Batch](config.limits.mailbox_batches_max)
        self._snapshot_running = False
        self._snapshot_idle = trio.Event()
        self._snapshot_idle.set()
        self._snapshot_retry_at = -math.inf
        self._snapshot_retry_seconds = RETRY_SECONDS_MIN
        self._snapshot_failures = 0
        # Set while the journal cannot be written: what failed, for the log and stats.
        self.fault: BaseException | None = None
        self._faults = 0
        self._reopening = trio.CancelScope()
        # The alarm's wait: its deadline is when the earliest hold runs out (see _expire_when_due).
        self._alarm = trio.CancelScope()
        self._batches = 0
        self._commands = 0
        self._records = 0
        self._commits = 0
        self._commit_seconds = 0.0
        self._snapshots = 0

    async def hand_over(self, batch: Batch) -> None:
        """Put `batch` in the mailbox: at once when there is room (the caller checkpoints
        while it waits for the replies anyway), with trio's backpressure when it is full."""
        # A caller already cancelled hands nothing over: a command in the mailbox is decided.
        await trio.lowlevel.checkpoint_if_cancelled()
        mailbox = self.mailbox
        try:
            try:
                mailbox.send_nowait(batch)
            except trio.WouldBlock:
                await mailbox.send(batch)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise EngineClosed("the engine is closed") from None

    async def load(self) -> RebuiltBook | None:
        """Read the book from the shard's files, changing none (a worker thread reads them).

        Damage stops the start (JournalCorrupt, MissingFile); a disk that fails to read
        starts the shard unavailable instead, retrying.
        """
        if self.store is None:
            return None
        try:
            return await trio.to_thread.run_sync(self.store.load)
        except OSError as error:
            self._start_unavailable(error)
            return None

    async def adopt(self, rebuilt: RebuiltBook | None) -> None:
        """Serve the loaded book: the store cuts its torn tail and records its progress."""
        if self.store is None or rebuilt is None:
            return
        try:
            self.book = await trio.to_thread.run_sync(self.store.adopt, rebuilt)
        except OSError as error:
            self._start_unavailable(error)

    def _start_unavailable(self, error: OSError) -> None:
        self._faults += 1
        self.fault = error
        self._reopening = trio.CancelScope()
        log.error("shard %d: recovery failed on its disk (%s): starting unavailable", self.index, error)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the recovered book: report started, then serve the mailbox until it is closed."""
        async with trio.open_nursery() as background:
            # Holds whose time ran out while the process was down end now, journaled.
            records: list[Record] = []
            self.book.expire_due(self._wall_clock(), records)
            if self.fault is not None:
                background.start_soon(self._reopen_after_fault)
            elif records:
                # On a fault the shard starts unavailable, and its book is rebuilt from the files.
                await self._commit_or_fault(records, 0, background)
            task_status.started()
            alarm = trio.CancelScope()
            background.start_soon(self._expire_when_due, alarm)
            try:
                await self._serve(background)
            finally:
                # Retrying a broken journal has no point once the shard stops, nor the alarm.
                self._reopening.cancel()
                alarm.cancel()

    async def _serve(self, background: trio.Nursery) -> None:
        inbox = self._inbox
        wall_clock = self._wall_clock
        batch_commands_max = self._batch_commands_max
        while True:
            try:
                batch = await inbox.receive()
            except trio.EndOfChannel:
                return
            # The batches decided and committed together: what is waiting, up to the bound.
            batches = [batch]
            commands = len(batch.commands)
            while commands < batch_commands_max:
                try:
                    batch = inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                batches.append(batch)
                commands += len(batch.commands)
            if self.fault is not None:
                # Nothing is decided while the journal cannot be written.
                for batch in batches:
                    batch.resolve([_unavailable(command) for command in batch.commands])
                continue
            book = self.book
            now = wall_clock()
            records: list[Record] = []
            # Due holds expire first, in the first batch (the alarm's is empty).
            replies = [book.execute(batch.commands, now, records) for batch in batches]
            if records and not await self._commit_or_fault(records, commands, background):
                # Not known to be on disk: no reply of these batches may say `ok`.
                replies = [[_unavailable(command) for command in batch.commands] for batch in batches]
            # Only now, with the records on disk, do the callers hear their answers.
            for batch, batch_replies in zip(batches, replies, strict=True):
                batch.resolve(batch_replies)
            self._batches += 1
            self._commands += commands
            self._records += len(records)
            self._set_alarm()
            if self.fault is None and not self._snapshot_running and self._snapshot_due():
                await self._start_snapshot(background)

    async def _expire_when_due(self, stop: trio.CancelScope) -> None:
        """Hand the shard an empty batch when its earliest hold runs out, so that an idle
        shard expires its holds on time (a busy one expires them before each batch anyway).

        One alarm per shard, moved earlier as holds are made: a deadline set per batch
        was the biggest cost of trio's in a shard's loop.
        """
        with stop:
            while True:
                with trio.CancelScope(deadline=self._expiry_deadline()) as self._alarm:
                    await trio.sleep_forever()
                wake = Batch(())
                try:
                    # Straight into the mailbox: a hand-off must not send this on to a successor.
                    await self.mailbox.send(wake)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                # The next deadline is the one after this batch's expiries.
                await wake.wait()

    def _set_alarm(self) -> None:
        """Bring the alarm forward to the earliest hold's expiry (a later one can wait:
        the alarm then finds nothing due and sets itself again)."""
        deadline = self._expiry_deadline()
        if deadline < self._alarm.deadline:
            self._alarm.deadline = deadline

    def _expiry_deadline(self) -> float:
        if self.fault is not None:
            return math.inf
        expires_at = self.book.next_expiry()
        if expires_at is None:
            return math.inf
        return trio.current_time() + max(0.0, expires_at - self._wall_clock())

    async def _commit_or_fault(self, records: list[Record], commands: int, background: trio.Nursery) -> bool:
        """Commit; on a disk error make the shard unavailable and start reopening it."""
        try:
            await self._commit(records, commands)
        except OSError as error:
            self._faults += 1
            self.fault = error
            # The file's state is unknown now: nothing more goes to it, and a clean
            # close must not record its length.
            assert self.store is not None
            self.store.close_after_fault()
            log.error(
                "shard %d: journal commit failed (%s): answering unavailable until its journal can be written again",
                self.index,
                error,
            )
            self._reopening = trio.CancelScope()
            background.start_soon(self._reopen_after_fault)
            return False
        return True

    async def _reopen_after_fault(self) -> None:
        """Rebuild the book from disk, with backoff, until the journal takes writes again."""
        assert self.store is not None
        store = self.store
        delay = RETRY_SECONDS_MIN
        with self._reopening:
            # A snapshot being written holds the store's files: let it finish first.
            await self._snapshot_idle.wait()
            while True:
                await trio.sleep(delay)
                try:
                    book = await trio.to_thread.run_sync(store.restart_from_disk)
                except DISK_FAULTS as error:
                    delay = min(delay * 2, RETRY_SECONDS_MAX)
                    log.warning("shard %d: journal still unavailable (%s); next try in %.1fs", self.index, error, delay)
                    continue
                self.book = book
                self.fault = None
                self._set_alarm()  # the rebuilt book's holds expire on time too
                log.warning("shard %d: journal writable again; serving from %s", self.index, store.directory)
                return

    async def _commit(self, records: list[Record], commands: int) -> None:
        store = self.store
        if store is None:
            return
        started = time.perf_counter()
        if store.durable:
            # The fsync runs in a worker thread so other shards and the gateway go on.
            await trio.to_thread.run_sync(store.commit, records)
        else:
            store.commit(records)
        seconds = time.perf_counter() - started
        self._commits += 1
        self._commit_seconds += seconds
        if self._commit_observer is not None:
            self._commit_observer(self.index, commands, len(records), seconds)

    def _snapshot_due(self) -> bool:
        if self.store is None:
            return False
        return self._snapshot_worth_it(self.store.records_since_snapshot)

    def _snapshot_worth_it(self, records_since_snapshot: int) -> bool:
        """Enough records since the last snapshot to bound replay (and at least half the
        holds, so a big book is not rewritten for a few records), and no retry pending."""
        since = records_since_snapshot
        if since < self.config.snapshot_records_min or since < len(self.book.holds) // 2:
            return False
        return trio.current_time() >= self._snapshot_retry_at

    async def _start_snapshot(self, background: trio.Nursery) -> None:
        assert self.store is not None
        self._snapshot_running = True
        self._snapshot_idle = trio.Event()
        try:
            number = await trio.to_thread.run_sync(self.store.start_snapshot)
        except OSError as error:
            self._snapshot_failed(error)
            return
        # The state is copied now, before the next batch, so the copy is exactly what
        # the journal holds up to the new segment; writing it runs beside new batches.
        data = self.book.to_snapshot()
        background.start_soon(self._write_snapshot, number, data)

    async def _write_snapshot(self, number: int, data: dict) -> None:
        assert self.store is not None
        try:
            await trio.to_thread.run_sync(self.store.finish_snapshot, number, data)
        except OSError as error:
            self._snapshot_failed(error)
        else:
            self._snapshots += 1
            self._snapshot_done()

    def _snapshot_done(self) -> None:
        self._snapshot_retry_seconds = RETRY_SECONDS_MIN
        self._snapshot_running = False
        self._snapshot_idle.set()

    def _snapshot_failed(self, error: Exception) -> None:
        """Log it and try again later: the journal still holds everything."""
        self._snapshot_failures += 1
        delay = self._snapshot_retry_seconds
        self._snapshot_retry_at = trio.current_time() + delay
        self._snapshot_retry_seconds = min(delay * 2, RETRY_SECONDS_MAX)
        log.error("shard %d: snapshot failed (%s); the journal holds everything", self.index, error)
        self._snapshot_running = False
        self._snapshot_idle.set()

    def statistics(self) -> ShardStatistics:
        channel = self.mailbox.statistics()
        return ShardStatistics(
            shard=self.index,
            batches=self._batches,
            commands=self._commands,
            records=self._records,
            commits=self._commits,
            commit_seconds_total=self._commit_seconds,
            snapshots=self._snapshots,
            mailbox_used=channel.current_buffer_used,
            mailbox_max=int(channel.max_buffer_size),
            skus=len(self.book.skus),
            holds=len(self.book.holds),
            journal_segment=self.store.segment if self.store is not None else 0,
            state=SERVING if self.fault is None else UNAVAILABLE_STATE,
            faults=self._faults,
            snapshot_failures=self._snapshot_failures,
        )


UNAVAILABLE_ERROR = "the shard's journal cannot be written; the outcome is unknown: retry with the same key"


def _unavailable(command: Command) -> AnyReply:
    return status_reply(command, UNAVAILABLE, UNAVAILABLE_ERROR)
