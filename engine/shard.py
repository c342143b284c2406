"""The shard actor: the one trio task that owns a book.

It waits for a ticket in its mailbox (a bounded memory channel), takes whatever else
is already there up to the batch bound, decides every command in arrival order,
commits the batch's records as one journal entry (one fsync when durable), and only
then releases the replies. Single writer, so no locks; while a commit is on disk the
mailbox fills, and the next batch is larger: group commit that grows with load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from engine.book import Book, Record
from engine.config import EngineConfig
from engine.store import ShardStore, write_snapshot
from protocol.messages import AnyReply, Command


class Ticket:
    """Commands handed to a shard as one unit, and the slot their replies come back in.

    The caller parks in `wait` until the shard calls `resolve`. It is a one-shot
    trio.Event specialised for the hot path: one waiter, no parking lot. A caller
    cancelled while waiting stops waiting; the shard still decides the commands
    (they are already in its mailbox) and the replies go nowhere.
    """

    __slots__ = ("_waiter", "commands", "done", "replies")

    def __init__(self, commands: Sequence[Command]) -> None:
        self.commands = commands
        self.replies: list[AnyReply] = []
        self.done = False
        self._waiter: trio.lowlevel.Task | None = None

    async def wait(self) -> list[AnyReply]:
        if self.done:
            await trio.lowlevel.checkpoint()
            return self.replies
        assert self._waiter is None, "a ticket has one waiter"
        self._waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return self.replies

    def resolve(self, replies: list[AnyReply]) -> None:
        assert not self.done, "a ticket is answered once"
        self.replies = replies
        self.done = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)


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
        self.mailbox, self._inbox = trio.open_memory_channel[Ticket](config.limits.mailbox_batches_max)
        self._snapshot_running = False
        self._batches = 0
        self._commands = 0
        self._records = 0
        self._commits = 0
        self._commit_seconds = 0.0
        self._snapshots = 0

    async def recover(self) -> None:
        """Rebuild the book from the shard's files (a worker thread reads them)."""
        if self.store is not None:
            self.book = await trio.to_thread.run_sync(self.store.recover)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the recovered book: report started, then serve the mailbox until it is closed."""
        # Holds whose time ran out while the process was down end now, journaled.
        records: list[Record] = []
        self.book.expire_due(self._wall_clock(), records)
        if records:
            await self._commit(records, 0)
        async with trio.open_nursery() as snapshot_nursery:
            task_status.started()
            await self._serve(snapshot_nursery)

    async def _serve(self, snapshot_nursery: trio.Nursery) -> None:
        inbox = self._inbox
        book = self.book
        wall_clock = self._wall_clock
        batch_commands_max = self._batch_commands_max
        while True:
            ticket: Ticket | None = None
            with trio.move_on_at(self._expiry_deadline()):
                try:
                    ticket = await inbox.receive()
                except trio.EndOfChannel:
                    return
            tickets: list[Ticket] = []
            commands = 0
            if ticket is not None:
                tickets.append(ticket)
                commands = len(ticket.commands)
                while commands < batch_commands_max:
                    try:
                        ticket = inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    tickets.append(ticket)
                    commands += len(ticket.commands)
            now = wall_clock()
            records: list[Record] = []
            if len(tickets) == 1:
                replies = [book.execute(tickets[0].commands, now, records)]
            elif tickets:
                # One call for the whole batch, then each ticket takes its share.
                decided = book.execute([c for ticket in tickets for c in ticket.commands], now, records)
                replies = []
                start = 0
                for ticket in tickets:
                    end = start + len(ticket.commands)
                    replies.append(decided[start:end])
                    start = end
            else:
                replies = []
                book.expire_due(now, records)
            if records:
                await self._commit(records, commands)
            # Only now, with the batch on disk, do the callers hear their answers.
            for ticket, ticket_replies in zip(tickets, replies, strict=True):
                ticket.resolve(ticket_replies)
            self._batches += 1
            self._commands += commands
            self._records += len(records)
            if self.store is not None and not self._snapshot_running and self._snapshot_due():
                self._start_snapshot(snapshot_nursery)

    def _expiry_deadline(self) -> float:
        expires_at = self.book.next_expiry()
        if expires_at is None:
            return math.inf
        return trio.current_time() + max(0.0, expires_at - self._wall_clock())

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
        assert self.store is not None
        since = self.store.records_since_snapshot
        return since >= self.config.snapshot_records_min and since >= len(self.book.holds) // 2

    def _start_snapshot(self, snapshot_nursery: trio.Nursery) -> None:
        assert self.store is not None
        # The state is copied now, between batches, so the copy is exactly what the
        # journal holds up to the new segment; writing it runs beside new batches.
        number = self.store.start_snapshot()
        data = self.book.to_snapshot()
        self._snapshot_running = True
        snapshot_nursery.start_soon(self._write_snapshot, number, data)

    async def _write_snapshot(self, number: int, data: dict) -> None:
        assert self.store is not None
        try:
            await trio.to_thread.run_sync(write_snapshot, self.store.directory, number, data)
            self._snapshots += 1
        finally:
            self._snapshot_running = False

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
        )
