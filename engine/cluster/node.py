"""One soldout node of a cluster: the shards it owns served here, every other shard at its owner.

`open_cluster_engine` connects the node's parts: the lease keeper decides which shards
this node owns; for each shard it wins, a `ClusterShard` (the shard actor, committing to
the shard's JetStream journal instead of a file) takes the journal over, recovers the
book and serves, and the node answers the shard's NATS subject (`soldout.shard.<n>`)
through `Engine.answer_remote`; for every other shard the engine holds a `RemoteShard`
that sends batches to that subject. The engine the caller gets is the same `Engine` the
gateway and the embedded API use.

A shard whose commit fails stops deciding (its batches are answered `unavailable`) and
is handed back, to be taken again under a new epoch and recovered from the journal.

An owner snapshots its shard's book as a file-journal shard does (enough records since
the last one, and at least half the holds): the snapshot goes to the object store, is
named in the shard's lease (a compare-and-set only the current owner can win), and only
then are the journal messages it covers purged and the snapshot before it deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from engine.api import Engine
from engine.book import Record
from engine.cluster.journal import Fenced, ShardJournal, ensure_storage
from engine.cluster.journal_format import JournalMessageCorrupt
from engine.cluster.nats import Nats, NatsError, NoResponders, RequestTimeout
from engine.cluster.ownership import OWNERS_BUCKET, LeaseKeeper
from engine.config import EngineConfig
from engine.remote import RemoteShard, ShardUnreachable
from engine.shard import Batch, CommitObserver, EngineClosed, Shard
from protocol.limits import CLUSTER_REQUEST_SECONDS_MAX

log = logging.getLogger("soldout.cluster")


def shard_subject(shard: int) -> str:
    return f"soldout.shard.{shard}"


class NatsShardTransport:
    """A batch for a shard goes to whoever answers its subject: its owner."""

    def __init__(self, nats: Nats, timeout_seconds: float) -> None:
        self._nats = nats
        self._timeout_seconds = timeout_seconds

    async def request(self, shard: int, payload: bytes) -> bytes:
        try:
            return await self._nats.request(shard_subject(shard), payload, timeout_seconds=self._timeout_seconds)
        except (NoResponders, RequestTimeout) as error:
            raise ShardUnreachable(f"shard {shard}: {error}") from error
        except NatsError as error:
            raise ShardUnreachable(f"shard {shard}: {error}") from error


SnapshotRecorder = Callable[[int, int], Awaitable[bool]]  # (shard, sequence) -> named in this node's lease
Successor = Callable[[], "Shard | RemoteShard"]  # where the shard's batches go now


class ClusterShard(Shard):
    """The shard actor over a JetStream journal: a group commit is one acknowledged publish."""

    def __init__(
        self,
        index: int,
        config: EngineConfig,
        journal: ShardJournal,
        *,
        snapshot: int | None = None,
        record_snapshot: SnapshotRecorder | None = None,
        successor: Successor | None = None,
        commit_observer: CommitObserver | None = None,
    ) -> None:
        super().__init__(index, config, None, commit_observer)
        self.journal = journal
        self.failed = trio.Event()  # set when a commit failed: the node hands the shard back
        self.snapshot_sequence = snapshot  # the journal sequence of the snapshot the lease names
        self._record_snapshot = record_snapshot
        self._successor = successor
        self._records_at_snapshot = 0

    async def hand_over(self, batch: Batch) -> None:
        """As a local shard; a batch that meets the mailbox closed by a hand-off goes on to
        wherever the shard's batches go now (its next owner), not back as `busy`."""
        try:
            await super().hand_over(batch)
        except EngineClosed:
            successor = self._successor() if self._successor is not None else self
            if successor is self:
                raise
            await successor.hand_over(batch)

    def _snapshot_due(self) -> bool:
        if self._record_snapshot is None:
            return False
        return self._snapshot_worth_it(self._records - self._records_at_snapshot)

    async def _start_snapshot(self, background: trio.Nursery) -> None:
        self._snapshot_running = True
        self._snapshot_idle = trio.Event()
        # Copied now, right after the last commit and before the next batch: exactly what
        # the journal holds up to its last sequence. Storing it runs beside new batches.
        covered, state = self.journal.last_sequence, self.book.to_snapshot()
        background.start_soon(self._store_snapshot, covered, state, self._records)

    async def _store_snapshot(self, covered: int, state: dict[str, Any], records: int) -> None:
        assert self._record_snapshot is not None
        try:
            await self.journal.snapshot(covered, state)
            if not await self._record_snapshot(self.index, covered):
                # The lease is not ours: purge nothing, the next owner recovers from its own.
                log.warning("shard %d: snapshot at %d not recorded: the lease moved", self.index, covered)
                self._snapshot_done()
                return
        except NatsError as error:
            self._snapshot_failed(error)
            return
        previous, self.snapshot_sequence = self.snapshot_sequence, covered
        self._records_at_snapshot = records
        self._snapshots += 1
        self._snapshot_done()
        try:
            await self.journal.purge_before(covered)
            if previous is not None and previous != covered:
                await self.journal.delete_snapshot(previous)
        except NatsError as error:
            # Recovery starts from the recorded snapshot either way; the next one cleans up.
            log.warning("shard %d: cleaning up before the snapshot at %d failed (%s)", self.index, covered, error)

    async def _commit_or_fault(self, records: list[Record], commands: int, background: trio.Nursery) -> bool:
        started = time.perf_counter()
        try:
            await self.journal.commit(records)
        except (Fenced, NatsError) as error:
            # Fenced: a newer owner holds the shard. Otherwise the outcome is unknown. Either
            # way the book may be ahead of the journal: decide nothing more with it.
            self._faults += 1
            self.fault = error
            log.error("shard %d: commit to the journal failed (%s): stepping down", self.index, error)
            self.failed.set()
            return False
        seconds = time.perf_counter() - started
        self._commits += 1
        self._commit_seconds += seconds
        if self._commit_observer is not None:
            self._commit_observer(self.index, commands, len(records), seconds)
        return True


class ClusterNode:
    """The shards this node serves, started and stopped as the lease keeper says."""

    def __init__(
        self,
        nats: Nats,
        engine: Engine,
        node: str,
        *,
        replicas: int,
        nursery: trio.Nursery,
        transport: NatsShardTransport,
        commit_observer: CommitObserver | None = None,
    ) -> None:
        self.nats = nats
        self._commit_observer = commit_observer
        self.engine = engine
        self.node = node
        self.replicas = replicas
        self._nursery = nursery
        self._transport = transport
        self._serving: dict[int, tuple[ClusterShard, trio.CancelScope, trio.Event]] = {}
        self.keeper: LeaseKeeper | None = None

    def remote(self, shard: int) -> RemoteShard:
        return RemoteShard(shard, self._transport, self._nursery, self.engine.config.limits)

    async def acquire(self, shard: int, epoch: int, snapshot: int | None) -> bool:
        """Take the shard's journal over for `epoch`, recover its book from the snapshot the
        lease names (`snapshot`, a journal sequence) and the journal after it, and serve it."""
        config = self.engine.config
        journal = ShardJournal(self.nats, shard, epoch, self.node, config.limits, replicas=self.replicas)
        try:
            recovered = await journal.take_over(snapshot)
        except (Fenced, NatsError) as error:
            log.warning("node %s: could not take shard %d over (%s)", self.node, shard, error)
            return False
        except JournalMessageCorrupt as error:
            # Never served from a journal or snapshot that fails its checks.
            log.error("node %s: shard %d's journal is damaged (%s): not serving it", self.node, shard, error)
            return False
        keeper = self.keeper
        actor = ClusterShard(
            shard,
            config,
            journal,
            snapshot=snapshot,
            record_snapshot=keeper.record_snapshot if keeper is not None else None,
            successor=lambda: self.engine.handle(shard),
            commit_observer=self._commit_observer,
        )
        actor.book = recovered.book
        scope = trio.CancelScope()
        stopped = trio.Event()
        await self._nursery.start(self._serve_shard, actor, scope, stopped)
        self.engine.assign(shard, actor)
        self._serving[shard] = (actor, scope, stopped)
        log.info("node %s: serving shard %d (epoch %d)", self.node, shard, epoch)
        return True

    async def release(self, shard: int) -> None:
        """Stop serving the shard: new batches go to its next owner; those handed over are decided first."""
        self.engine.assign(shard, self.remote(shard))
        serving = self._serving.pop(shard, None)
        if serving is None:
            return
        actor, scope, stopped = serving
        actor.mailbox.close()
        await stopped.wait()
        scope.cancel()

    async def _serve_shard(
        self, actor: ClusterShard, scope: trio.CancelScope, stopped: trio.Event, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_actor, actor, stopped)
                await nursery.start(self.nats.serve, shard_subject(actor.index), self.engine.answer_remote)
                task_status.started()
                nursery.start_soon(self._hand_back_on_failure, actor)
                # The actor ends once `release` closed its mailbox and it decided what was in it.
                await stopped.wait()
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _run_actor(actor: ClusterShard, stopped: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await actor.run(task_status=task_status)
        finally:
            stopped.set()

    async def _hand_back_on_failure(self, actor: ClusterShard) -> None:
        await actor.failed.wait()
        if self.keeper is not None and actor.index in self.keeper.held:
            await self.keeper.hand_off_or_let_lapse(actor.index)


@asynccontextmanager
async def open_cluster_engine(
    nats: Nats,
    config: EngineConfig,
    node: str,
    *,
    replicas: int,
    lease_seconds: float,
    owns_shards: bool = True,
    request_timeout_seconds: float = CLUSTER_REQUEST_SECONDS_MAX,
    commit_observer: CommitObserver | None = None,
) -> AsyncIterator[tuple[Engine, ClusterNode]]:
    """An engine whose shards are owned across the cluster; leaves hand this node's shards off."""
    await ensure_storage(nats, replicas)
    bucket = await nats.key_value(OWNERS_BUCKET, replicas=replicas)
    async with trio.open_nursery() as nursery:
        transport = NatsShardTransport(nats, request_timeout_seconds)
        engine = Engine(config, [])
        cluster = ClusterNode(
            nats, engine, node, replicas=replicas, nursery=nursery, transport=transport, commit_observer=commit_observer
        )
        for shard in range(config.shards):
            engine.assign(shard, cluster.remote(shard))
        keeper = LeaseKeeper(
            bucket,
            node,
            config.shards,
            lease_seconds,
            acquire=cluster.acquire,
            release=cluster.release,
            owns_shards=owns_shards,
        )
        cluster.keeper = keeper
        await nursery.start(keeper.run)
        try:
            yield engine, cluster
        finally:
            with trio.CancelScope(shield=True):
                await keeper.stop()
            nursery.cancel_scope.cancel()
