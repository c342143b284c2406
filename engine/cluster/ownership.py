"""Shard ownership by lease, kept in a replicated JetStream key-value bucket.

Every node keeps a heartbeat key (`node.<name>`) fresh; the owner of shard n holds the
key `shard.<n>` and renews it with a compare-and-set every `lease_seconds / 3`. Liveness
is judged by what each node sees change, on its own monotonic clock, never by comparing
wall clocks: a heartbeat or a lease whose revision has not moved for `lease_seconds` is
dead. The plan (`engine.cluster.leases`) says which free shards to take and which to
hand off; taking is a create (or a compare-and-set over a dead lease), so two nodes never
both win. A shard's epoch is the revision of the write that took it, which the bucket
never reuses: every takeover has a higher epoch than the one before, as the journal's
fencing needs.

A node stops serving a shard the moment a renewal fails, and on its own when it has not
renewed for two thirds of `lease_seconds` (so it is gone before anyone may take over).
A handed-off lease is written back as released (no owner), never deleted.

The lease value also names the shard's current snapshot (the journal sequence it
covers): the owner records a new one with a compare-and-set on its own lease, which a
former owner can never win, and every later owner recovers from the one it names. So
the value is [owner, epoch, snapshot sequence or None].

Taking a shard over (fencing, reading the snapshot, replaying the journal) runs in a
task of its own, never inside a round: a long replay must not delay the renewals of the
shards this node already serves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgpack
import trio

from engine.cluster.leases import Lease, plan
from engine.cluster.nats import KeyExists, KeyValueBucket, NatsError, WrongRevision

log = logging.getLogger("soldout.cluster")

OWNERS_BUCKET = "soldout_owners"
RELEASED = ""  # the owner of a lease handed off
# A heartbeat says whether its node takes shards: a gateway-only node is live (the
# cluster view lists it) but no share of the shards is planned for it.
OWNING_HEARTBEAT = b"owner"
GATEWAY_HEARTBEAT = b"gateway"


def shard_key(shard: int) -> str:
    return f"shard.{shard}"


def node_key(node: str) -> str:
    return f"node.{node}"


@dataclass(slots=True)
class _Seen:
    revision: int
    changed_at: float  # trio.current_time() when this node first saw the revision


@dataclass(slots=True)
class _Held:
    epoch: int
    revision: int
    snapshot: int | None  # the journal sequence of the shard's current snapshot


@dataclass(frozen=True, slots=True)
class LeaseValue:
    owner: str  # RELEASED when no node owns the shard
    epoch: int
    snapshot: int | None = None


# (shard, epoch, current snapshot's sequence) -> serving now
Acquire = Callable[[int, int, int | None], Awaitable[bool]]
Release = Callable[[int], Awaitable[None]]  # shard: stop serving it (and commit what was decided)


class LeaseKeeper:
    """One node's side of the ownership protocol: `run` keeps it going until cancelled."""

    def __init__(
        self,
        bucket: KeyValueBucket,
        node: str,
        shards: int,
        lease_seconds: float,
        *,
        acquire: Acquire,
        release: Release,
        owns_shards: bool = True,
    ) -> None:
        assert lease_seconds > 0
        self.bucket = bucket
        self.node = node
        self.shards = shards
        self.lease_seconds = lease_seconds
        self.owns_shards = owns_shards
        self._acquire = acquire
        self._release = release
        self.held: dict[int, _Held] = {}
        self.owners: dict[int, str | None] = {}  # as last seen, for the cluster view
        self.live_nodes: list[str] = [node]
        self._seen: dict[str, _Seen] = {}
        self._heartbeat_revision: int | None = None
        self._renewed_at = -math.inf
        # Writes to one lease take turns: each is a compare-and-set on the last revision.
        self._writing: dict[int, trio.Lock] = {}
        self._takeovers: trio.Nursery | None = None
        self.acquiring: set[int] = set()  # shards whose takeover task is running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew, watch and rebalance until cancelled; started once it has looked at the bucket.

        Renewing runs on its own, every `lease_seconds / 3`, beside the rounds that take
        and hand off shards, and a watchdog steps down the moment the last renewal is two
        thirds of a lease old, even while a call to NATS hangs: a slow round, a slow
        takeover or a NATS server that stops answering can never keep a node serving a
        shard past the point where another node may take it over.
        """
        async with trio.open_nursery() as nursery:
            self._takeovers = nursery
            await nursery.start(self._every_third_of_a_lease, "renewing", self.renew)
            nursery.start_soon(self._step_down_when_stale)
            await self._every_third_of_a_lease("ownership round", self.rebalance, task_status=task_status)

    async def _every_third_of_a_lease(
        self,
        what: str,
        step: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run `step` every `lease_seconds / 3`, until cancelled; started after the first.
        A step that fails on NATS is logged and tried again at the next turn."""
        started = False
        while True:
            try:
                await step()
            except* NatsError as failure:
                log.warning("node %s: %s failed (%s); retrying", self.node, what, _first(failure))
            if not started:
                task_status.started()
                started = True
            await trio.sleep(self.lease_seconds / 3)

    async def renew(self) -> None:
        """The heartbeat and every held lease, written at once."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._renew)

    async def rebalance(self) -> None:
        """Look at the bucket, then take and hand off shards as the plan says (all at once)."""
        leases, owning = await self._look()
        if not self.owns_shards:
            return
        step = plan(self.node, self.shards, leases, owning)
        async with trio.open_nursery() as nursery:
            for shard in step.take:
                nursery.start_soon(self._take, shard)
            for shard in step.hand_off:
                if shard not in self.acquiring:  # handed off once it serves, if the plan still says so
                    nursery.start_soon(self.hand_off, shard)

    async def stop(self) -> None:
        """Hand every shard off cleanly (a node leaving on purpose); a lease that cannot be
        written back lapses instead, and is taken over after `lease_seconds`."""
        async with trio.open_nursery() as nursery:
            for shard in sorted(self.held):
                nursery.start_soon(self.hand_off_or_let_lapse, shard)

    async def hand_off_or_let_lapse(self, shard: int) -> None:
        try:
            await self.hand_off(shard)
        except NatsError as error:
            log.warning("node %s: handing shard %d off failed (%s); its lease lapses", self.node, shard, error)

    # ---------------------------------------------------------------- the steps

    async def _heartbeat(self) -> None:
        key = node_key(self.node)
        value = OWNING_HEARTBEAT if self.owns_shards else GATEWAY_HEARTBEAT
        if self._heartbeat_revision is not None:
            try:
                self._heartbeat_revision = await self.bucket.update(key, value, self._heartbeat_revision)
                return
            except WrongRevision:
                pass
        current = await self.bucket.get(key)
        if current is None:
            try:
                self._heartbeat_revision = await self.bucket.create(key, value)
                return
            except KeyExists:
                current = await self.bucket.get(key)
        assert current is not None
        self._heartbeat_revision = await self.bucket.update(key, value, current[1])

    async def _renew(self) -> None:
        """Renew every held lease at once (one round trip, however many shards).

        The leases count as renewed from when the writes were sent, not from when they
        were acknowledged: another node measures a lease from when it first sees the
        write, which is never earlier, so stepping down by that clock is always in time."""
        sent_at = trio.current_time()
        lost: list[int] = []
        async with trio.open_nursery() as nursery:
            for shard, held in sorted(self.held.items()):
                nursery.start_soon(self._renew_one, shard, held, lost)
        for shard in lost:
            # Someone else wrote the lease: it is not ours any more. Stop at once (unless
            # the shard was handed back meanwhile, its commit having failed).
            log.warning("node %s: lost the lease of shard %d", self.node, shard)
            if self.held.pop(shard, None) is not None:
                await self._release(shard)
        if not lost:
            self._renewed_at = sent_at

    async def _renew_one(self, shard: int, held: _Held, lost: list[int]) -> None:
        async with self._writing_of(shard):
            if self.held.get(shard) is not held:
                return  # handed off meanwhile
            try:
                held.revision = await self.bucket.update(
                    shard_key(shard), _encode(LeaseValue(self.node, held.epoch, held.snapshot)), held.revision
                )
            except WrongRevision:
                lost.append(shard)

    async def _look(self) -> tuple[dict[int, Lease | None], list[str]]:
        now = trio.current_time()
        keys = await self.bucket.keys()
        values: dict[str, tuple[bytes, int]] = {}

        async def get(key: str) -> None:
            entry = await self.bucket.get(key)
            if entry is not None:
                values[key] = entry

        async with trio.open_nursery() as nursery:  # one round trip for every key
            for key in keys:
                nursery.start_soon(get, key)
        for key, (_, revision) in values.items():
            seen = self._seen.get(key)
            if seen is None or seen.revision != revision:
                self._seen[key] = _Seen(revision, now)

        def fresh(key: str) -> bool:
            seen = self._seen.get(key)
            return seen is not None and now - seen.changed_at < self.lease_seconds

        heartbeats = {key.removeprefix("node."): value for key, (value, _) in values.items() if key.startswith("node.")}
        live = sorted({node for node in heartbeats if fresh(node_key(node))} | {self.node})
        # This node by what it is; the others by what their heartbeats say.
        owning = [
            node
            for node in live
            if (self.owns_shards if node == self.node else heartbeats.get(node) != GATEWAY_HEARTBEAT)
        ]
        leases: dict[int, Lease | None] = {}
        for shard in range(self.shards):
            key = shard_key(shard)
            if shard in self.held:
                leases[shard] = Lease(self.node, self.held[shard].epoch)
            elif key in values and fresh(key):
                value = _decode(values[key][0])
                leases[shard] = None if value.owner == RELEASED else Lease(value.owner, value.epoch)
            else:
                leases[shard] = None
        self.live_nodes = live
        self.owners = {shard: lease.node if lease else None for shard, lease in leases.items()}
        return leases, owning

    async def _take(self, shard: int) -> None:
        key = shard_key(shard)
        current = await self.bucket.get(key)
        snapshot: int | None = None
        try:
            if current is None:
                epoch = await self.bucket.create(key, _encode(LeaseValue(self.node, 0)))
            else:
                value = _decode(current[0])
                seen = self._seen.get(key)
                if seen is None or seen.revision != current[1]:
                    return  # it moved since we looked: its owner is alive, or someone took it
                dead = trio.current_time() - seen.changed_at >= self.lease_seconds
                if value.owner != RELEASED and not dead:
                    return  # its owner still renews it (only its heartbeat was late)
                snapshot = value.snapshot
                epoch = await self.bucket.update(key, _encode(LeaseValue(self.node, 0, snapshot)), current[1])
        except (KeyExists, WrongRevision):
            return  # another node won it
        # The epoch is the revision that took it; the value says so from the first renewal.
        revision = await self.bucket.update(key, _encode(LeaseValue(self.node, epoch, snapshot)), epoch)
        held = _Held(epoch, revision, snapshot)
        self.held[shard] = held
        log.info("node %s: took shard %d (epoch %d)", self.node, shard, epoch)
        self.acquiring.add(shard)
        assert self._takeovers is not None, "shards are taken only while `run` runs"
        self._takeovers.start_soon(self._serve_taken, shard, held)

    async def _serve_taken(self, shard: int, held: _Held) -> None:
        """Recover and serve a shard just taken; give it back if that fails or the lease went meanwhile."""
        try:
            serving = await self._acquire(shard, held.epoch, held.snapshot)
        finally:
            self.acquiring.discard(shard)
        if self.held.get(shard) is not held:
            # Lost (a failed renewal, a stale step-down) while recovering: stop at once.
            if serving:
                await self._release(shard)
            return
        if not serving:
            await self.hand_off_or_let_lapse(shard)

    def _writing_of(self, shard: int) -> trio.Lock:
        return self._writing.setdefault(shard, trio.Lock())

    async def record_snapshot(self, shard: int, sequence: int) -> bool:
        """Name the snapshot covering `sequence` in the shard's lease; False when the lease
        is not this node's any more (then nothing may be purged on its account)."""
        async with self._writing_of(shard):
            held = self.held.get(shard)
            if held is None:
                return False
            try:
                held.revision = await self.bucket.update(
                    shard_key(shard), _encode(LeaseValue(self.node, held.epoch, sequence)), held.revision
                )
            except WrongRevision:
                return False  # a newer owner took it; the next renewal stops this node serving it
            held.snapshot = sequence
            return True

    async def hand_off(self, shard: int) -> None:
        """Stop serving `shard` (the release callback), then write its lease back as released."""
        held = self.held.pop(shard, None)
        if held is None:
            return
        await self._release(shard)
        async with self._writing_of(shard):
            try:
                await self.bucket.update(
                    shard_key(shard), _encode(LeaseValue(RELEASED, held.epoch, held.snapshot)), held.revision
                )
                log.info("node %s: handed shard %d off (epoch %d)", self.node, shard, held.epoch)
            except WrongRevision:
                pass  # already taken over

    async def _step_down_when_stale(self) -> None:
        """Not renewed for two thirds of the lease: stop serving before anyone may take over."""
        while True:
            deadline = self._renewed_at + self.lease_seconds * 2 / 3
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            if self.held:
                log.error("node %s: leases not renewed in time; stepping down from %s", self.node, sorted(self.held))
                for shard in list(self.held):
                    if self.held.pop(shard, None) is not None:
                        await self._release(shard)
            await trio.sleep(self.lease_seconds / 6)


def _first(failure: BaseExceptionGroup) -> BaseException:
    """The first NATS error of a group, to log in one line."""
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    return failure


def _encode(value: LeaseValue) -> bytes:
    return msgpack.packb([value.owner, value.epoch, value.snapshot])


def _decode(data: bytes) -> LeaseValue:
    """A lease as written; unreadable is free, taken over under a new epoch and replayed
    from the start of the journal (nothing before a snapshot is purged until one is named)."""
    try:
        fields = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException):
        return LeaseValue(RELEASED, 0)
    if type(fields) is not list or len(fields) not in (2, 3):
        return LeaseValue(RELEASED, 0)
    owner, epoch, snapshot = (*fields, None) if len(fields) == 2 else fields
    if type(owner) is not str or type(epoch) is not int or (snapshot is not None and type(snapshot) is not int):
        return LeaseValue(RELEASED, 0)
    return LeaseValue(owner, epoch, snapshot)
