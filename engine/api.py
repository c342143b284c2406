"""The embedded API: `open_engine(config)` and the `Engine` that tests, the gateway and
the CLI all use. It routes each command to its shard and waits for the reply.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from engine.config import EngineConfig
from engine.remote import RemoteShard
from engine.router import shard_for_reservation, shard_for_sku
from engine.shard import Batch, BatchGroup, CommitObserver, Shard, ShardStatistics
from engine.shard import EngineClosed as EngineClosed  # raised by the methods below
from engine.store import DataDir, ShardStore
from protocol.codec import ServerCodec
from protocol.limits import SKU_SHARD_CACHE_ENTRIES_MAX
from protocol.messages import (
    INVALID,
    NOT_FOUND,
    OK,
    REPLY_TYPES,
    SHARD_COMMANDS,
    UNAVAILABLE,
    UNCHANGED,
    AnyReply,
    Cancel,
    Command,
    Confirm,
    GetHold,
    HoldReply,
    Register,
    RegisterReply,
    Reply,
    Reserve,
    SkuReply,
    StockReply,
    Unchanged,
    status_reply,
)
from protocol.parser import CommandParser

# What a frame or a caller hands the engine: commands, and replies already decided
# (the parser's `invalid`, the gateway's `forbidden`), which keep their place.
Item = Command | AnyReply


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    shards: tuple[ShardStatistics, ...]

    @property
    def commands(self) -> int:
        return sum(shard.commands for shard in self.shards)

    @property
    def holds(self) -> int:
        return sum(shard.holds for shard in self.shards)


@dataclass(frozen=True, slots=True)
class SkuCounts:
    sku: str
    stock: int
    available: int
    held: int
    sold: int
    # Holds made and ended since the SKU was created.
    holds_created: int = 0
    holds_confirmed: int = 0
    holds_cancelled: int = 0
    holds_expired: int = 0


class Engine:
    """A running set of shards. Every method is safe to call from many tasks at once.

    Each method's arguments go through the parser (`protocol.parser`), so a shard is
    handed valid commands only; the gateway hands over what its codec parsed, through
    `decide`.
    """

    def __init__(self, config: EngineConfig, shards: list[Shard]) -> None:
        self.config = config
        self.parser = CommandParser(config.limits)
        self._shard_count = config.shards
        # Where each shard's batches go: its actor in this process, or its owner elsewhere
        # (an engine of a cluster node starts with none here and is assigned them).
        assert not shards or len(shards) == config.shards
        self._handles: list[Shard | RemoteShard] = list(shards) if shards else [None] * config.shards  # type: ignore[list-item]
        self._sku_shards: dict[str, int] = {}
        self._codec = ServerCodec(config.limits, admin=True)

    def assign(self, shard: int, handle: Shard | RemoteShard) -> None:
        """Send `shard`'s batches to `handle` from now on (its owner changed)."""
        self._handles[shard] = handle

    def handle(self, shard: int) -> Shard | RemoteShard:
        """Where `shard`'s batches go now."""
        return self._handles[shard]

    def is_local(self, shard: int) -> bool:
        return isinstance(self._handles[shard], Shard)

    @property
    def _shards(self) -> list[Shard]:
        """The shards decided in this process now."""
        return [handle for handle in self._handles if isinstance(handle, Shard)]

    # ------------------------------------------------------------ one command each

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
        """Create `sku` (`stock` is then required), or change the settings given and keep the rest.

        `stock` is the total, held and sold included. `opens_at=None` / `closes_at=None`
        clear the sale window's start / end; a setting not given stays as it is.
        """
        command = self.parser.put_sku(
            sku,
            stock=stock,
            per_buyer_limit=per_buyer_limit,
            hold_seconds=hold_seconds,
            opens_at=opens_at,
            closes_at=closes_at,
            registration_required=registration_required,
        )
        return await self._one(command)  # type: ignore[return-value]

    async def get_sku(self, sku: str) -> SkuReply:
        """Every setting and count of `sku`, its registered buyers, and whether it is open now."""
        return await self._one(self.parser.get_sku(sku))  # type: ignore[return-value]

    async def register(self, sku: str, buyers: Iterable[str]) -> RegisterReply:
        """Let `buyers` reserve `sku`; any number of them, sent in bounded commands.

        The reply counts the buyers newly registered and those registered already.
        """
        # Every name is checked before any part is sent, so a bad one registers no one.
        command = self.parser.register(sku, buyers, bounded=False)
        if type(command) is not Register:
            return command  # type: ignore[return-value]
        size = self.config.limits.register_buyers_max
        everyone = command.buyers
        parts = [Register(command.sku, everyone[start : start + size]) for start in range(0, len(everyone), size)]
        replies = await self.decide(parts or [command])
        failed = [reply for reply in replies if reply.status != OK]
        if failed:
            return failed[0]  # type: ignore[return-value]
        return RegisterReply(
            OK,
            registered=sum(reply.registered for reply in replies),  # type: ignore[union-attr]
            already=sum(reply.already for reply in replies),  # type: ignore[union-attr]
        )

    async def reserve(self, sku: str, *, buyer: str, qty: int = 1, key: str | None = None) -> Reply:
        """Hold `qty` units of `sku` for `buyer`; a retry with the same `key` returns the first hold."""
        return await self._one(self.parser.reserve(sku, buyer, qty, key))  # type: ignore[return-value]

    async def confirm(self, reservation: str, *, buyer: str, order: str | None = None) -> Reply:
        """Sell the hold's units for good; `order` links the hold to the order system's id."""
        return await self._one(self.parser.confirm(reservation, buyer, order))  # type: ignore[return-value]

    async def cancel(self, reservation: str, *, buyer: str) -> Reply:
        return await self._one(self.parser.cancel(reservation, buyer))  # type: ignore[return-value]

    async def hold(self, reservation: str, *, buyer: str) -> HoldReply:
        """What became of a hold (its SKU, units, state, expiry and order), changing nothing."""
        return await self._one(self.parser.hold(reservation, buyer))  # type: ignore[return-value]

    async def stock(self, sku: str) -> StockReply:
        return await self._one(self.parser.stock(sku))  # type: ignore[return-value]

    async def _one(self, item: Item) -> AnyReply:
        shard = self.route(item)
        if type(shard) is not int:
            return shard  # type: ignore[return-value]
        batch = Batch((item,))  # type: ignore[arg-type]
        await self._handles[shard].hand_over(batch)
        return (await batch.wait())[0]

    # ------------------------------------------------------------ batches

    async def execute(self, commands: Sequence[Command]) -> list[AnyReply]:
        """Decide commands built by the caller: replies in request order.

        Each command's fields are checked first (a bad one is answered `invalid` in its
        place); then as `decide`.
        """
        return await self.decide(self.parser.check_all(commands))

    async def decide(self, items: Sequence[Item], *, local_only: bool = False) -> list[AnyReply]:
        """Decide parsed commands (a frame's): replies in request order.

        The one scatter and gather of a frame: each shard's part goes to it as one batch,
        applied and committed together, and the shards work on their parts at the same
        time, in this process or at their owners. An item that is a reply already stays in
        its place. `local_only`: a part for a shard this process does not own is answered
        `unavailable` instead of being sent on (an owner never forwards what it was sent).
        """
        count = len(items)
        if count == 0:
            return []
        # The hot path inlined: a reserve for a SKU whose shard is known; `route` the rest.
        known = self._sku_shards.get
        targets: list[int | AnyReply | None] = [known(item.sku) if type(item) is Reserve else None for item in items]  # type: ignore[union-attr]
        if None in targets:
            route = self.route
            targets = [route(item) if target is None else target for item, target in zip(items, targets, strict=True)]
        if local_only:
            targets = [
                _unavailable(items[position]) if type(target) is int and not self.is_local(target) else target
                for position, target in enumerate(targets)
            ]
        first = targets[0]
        handles = self._handles
        if type(first) is int and targets.count(first) == count:
            # The common case: a frame for one hot SKU, or a single shard.
            batch = Batch(items)  # type: ignore[arg-type]
            await handles[first].hand_over(batch)
            return await batch.wait()
        replies: list[AnyReply] = targets  # type: ignore[assignment]  # shards' places are filled in below
        positions: dict[int, list[int]] = {}
        for position, target in enumerate(targets):
            if type(target) is int:
                shard_positions = positions.get(target)
                if shard_positions is None:
                    positions[target] = [position]
                else:
                    shard_positions.append(position)
        # One wake-up for the frame, when its last shard answers.
        group = BatchGroup()
        batches: list[tuple[Batch, list[int]]] = []
        for shard, shard_positions in positions.items():
            batch = Batch([items[position] for position in shard_positions], group)  # type: ignore[misc]
            await handles[shard].hand_over(batch)
            batches.append((batch, shard_positions))
        await group.wait()
        for batch, shard_positions in batches:
            for position, reply in zip(shard_positions, batch.replies, strict=True):
                replies[position] = reply
        return replies

    def route(self, item: Item) -> int | AnyReply:
        """The shard that decides `item`, or its reply when no shard needs to see it."""
        kind = type(item)
        # The hot path: a reserve for a SKU already seen.
        if kind is Reserve:
            shard = self._sku_shards.get(item.sku)  # type: ignore[union-attr]
            if shard is not None:
                return shard
        elif kind is Confirm or kind is Cancel or kind is GetHold:
            shard = shard_for_reservation(item.reservation, self._shard_count)  # type: ignore[union-attr]
            return status_reply(item, NOT_FOUND) if shard is None else shard
        elif kind in REPLY_TYPES:
            return item  # type: ignore[return-value]
        elif kind not in SHARD_COMMANDS:
            return Reply(INVALID, error=f"{kind.__name__} is not a command")
        sku = item.sku  # type: ignore[union-attr]
        shard = shard_for_sku(sku, self._shard_count)
        # Remember the shard of valid SKU names, up to a bound.
        if len(self._sku_shards) < SKU_SHARD_CACHE_ENTRIES_MAX:
            self._sku_shards[sku] = shard
        return shard

    async def answer_remote(self, payload: bytes) -> bytes:
        """Answer a batch another process sent for shards this one owns (engine/remote.py):
        a protocol v1 batch frame in, its replies out, decided through `decide`."""
        codec = self._codec
        frame = codec.decode(payload)
        return codec.encode(frame, await self.decide(frame.commands, local_only=True))  # type: ignore[arg-type]

    # ------------------------------------------------------------ looking inside

    @property
    def shard_count(self) -> int:
        return self._shard_count

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(tuple(shard.statistics() for shard in self._shards))

    def sku_counts(self) -> list[SkuCounts]:
        """Every SKU's counts as the shards hold them now, for metrics and reports.

        Read between batches, so a count may include a batch whose commit is still
        on its way to disk; use `stock` for an answer that is committed.
        """
        counts = []
        for shard in self._shards:
            for state in shard.book.skus.values():
                counts.append(
                    SkuCounts(
                        state.sku,
                        state.stock,
                        state.available,
                        state.held,
                        state.sold,
                        state.holds_created,
                        state.holds_confirmed,
                        state.holds_cancelled,
                        state.holds_expired,
                    )
                )
        return counts


def _unavailable(item: Item) -> AnyReply:
    return status_reply(item, UNAVAILABLE, "this node does not own the shard now; retry with the same key")


@asynccontextmanager
async def open_engine(
    config: EngineConfig | None = None, *, commit_observer: CommitObserver | None = None
) -> AsyncIterator[Engine]:
    """Recover (or create) the shards, run them, and stop them cleanly on exit.

    Every shard has recovered its journal before the body runs; on exit the
    mailboxes close, each shard finishes what was handed to it, and the journals close.
    """
    config = config or EngineConfig()
    data_dir = DataDir(config.data_dir, config.shards, config.limits) if config.data_dir is not None else None
    stores: list[ShardStore | None] = [
        ShardStore(data_dir.shard_directory(index), index, config.durable, config.limits) if data_dir else None
        for index in range(config.shards)
    ]
    shards = [Shard(index, config, stores[index], commit_observer) for index in range(config.shards)]
    try:
        # Recovery runs before any task starts, so a damaged journal or a wrong shard
        # count surfaces as itself (JournalCorrupt, DataDirError), not inside a group.
        # Recovery builds millions of objects and no garbage: the collector would only
        # walk them again and again (it took most of the reopen time of 1M holds).
        collecting = gc.isenabled()
        gc.disable()
        try:
            # Every shard is read before any file changes: a start refused for damage
            # in one shard leaves the others' files as they were.
            loaded = [await shard.load() for shard in shards]
            for shard, rebuilt in zip(shards, loaded, strict=True):
                await shard.adopt(rebuilt)
            del loaded
        finally:
            if collecting:
                gc.enable()
        body_error: Exception | None = None
        async with trio.open_nursery() as nursery:
            for shard in shards:
                await nursery.start(shard.run)
            try:
                yield Engine(config, shards)
            except Exception as error:
                body_error = error
            finally:
                for shard in shards:
                    shard.mailbox.close()
        if body_error is not None:
            # The caller's own exception leaves as itself, not inside the nursery's group.
            raise body_error
    finally:
        for store in stores:
            if store is not None:
                store.close()
        if data_dir is not None:
            data_dir.close()
