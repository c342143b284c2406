"""The embedded API: `open_engine(config)` and the `Engine` that tests, the gateway and
the CLI all use. It routes each command to its shard and waits for the reply.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from engine.book import name_error
from engine.config import EngineConfig
from engine.router import shard_for_reservation, shard_for_sku
from engine.shard import CommitObserver, Shard, ShardStatistics, Ticket
from engine.store import DataDir, ShardStore
from protocol.messages import (
    BUSY,
    INVALID,
    NOT_FOUND,
    OK,
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
    status_reply,
)

SKU_SHARD_CACHE_MAX = 100_000


class EngineClosed(Exception):
    """The engine was used after its `open_engine` block ended."""


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
    """A running set of shards. Every method is safe to call from many tasks at once."""

    def __init__(self, config: EngineConfig, shards: list[Shard]) -> None:
        self.config = config
        self._shards = shards
        self._shard_count = len(shards)
        self._string_bytes_max = config.limits.string_bytes_max
        self._sku_shards: dict[str, int] = {}

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
        command = PutSku(sku, stock, per_buyer_limit, hold_seconds, opens_at, closes_at, registration_required)
        return await self._one(command)  # type: ignore[return-value]

    async def get_sku(self, sku: str) -> SkuReply:
        """Every setting and count of `sku`, its registered buyers, and whether it is open now."""
        return await self._one(GetSku(sku))  # type: ignore[return-value]

    async def register(self, sku: str, buyers: Iterable[str]) -> RegisterReply:
        """Let `buyers` reserve `sku`; any number of them, sent in bounded commands.

        The reply counts the buyers newly registered and those registered already.
        """
        if isinstance(buyers, (str, bytes)) or not isinstance(buyers, Iterable):
            return RegisterReply(INVALID, error="buyers must be a list of buyer ids")
        buyers = list(buyers)
        # Every name is checked before any part is sent, so a bad one registers no one.
        for buyer in buyers:
            error = name_error(buyer, "buyer", self._string_bytes_max)
            if error:
                return RegisterReply(INVALID, error=error)
        size = self.config.limits.register_buyers_max
        commands = [Register(sku, buyers[start : start + size]) for start in range(0, len(buyers), size)]
        replies = await self.execute(commands or [Register(sku, [])])
        failed = [reply for reply in replies if reply.status != "ok"]
        if failed:
            return failed[0]  # type: ignore[return-value]
        return RegisterReply(
            OK,
            registered=sum(reply.registered for reply in replies),  # type: ignore[union-attr]
            already=sum(reply.already for reply in replies),  # type: ignore[union-attr]
        )

    async def reserve(self, sku: str, *, buyer: str, qty: int = 1, key: str | None = None) -> Reply:
        """Hold `qty` units of `sku` for `buyer`; a retry with the same `key` returns the first hold."""
        return await self._one(Reserve(sku, buyer, qty, key))  # type: ignore[return-value]

    async def confirm(self, reservation: str, *, buyer: str, order: str | None = None) -> Reply:
        """Sell the hold's units for good; `order` links the hold to the order system's id."""
        return await self._one(Confirm(reservation, buyer, order))  # type: ignore[return-value]

    async def cancel(self, reservation: str, *, buyer: str) -> Reply:
        return await self._one(Cancel(reservation, buyer))  # type: ignore[return-value]

    async def hold(self, reservation: str, *, buyer: str) -> HoldReply:
        """What became of a hold (its SKU, units, state, expiry and order), changing nothing."""
        return await self._one(GetHold(reservation, buyer))  # type: ignore[return-value]

    async def stock(self, sku: str) -> StockReply:
        return await self._one(Stock(sku))  # type: ignore[return-value]

    async def _one(self, command: Command) -> AnyReply:
        shard = self.route(command)
        if type(shard) is not int:
            return shard
        ticket = Ticket((command,))
        await self._send(shard, ticket)
        return (await ticket.wait())[0]

    # ------------------------------------------------------------ batches

    async def execute(self, commands: Sequence[Command], *, wait: bool = True) -> list[AnyReply]:
        """Decide a batch: replies in request order.

        Each shard's part goes to it as one ticket, applied and committed together;
        the shards work on their parts at the same time. With `wait=False` a part
        whose shard's mailbox is full is answered `busy` instead of waiting for room.
        """
        count = len(commands)
        if count == 0:
            return []
        route = self.route
        targets = [route(command) for command in commands]
        first = targets[0]
        if type(first) is int and targets.count(first) == count:
            # The common case: a frame for one hot SKU, or a single shard.
            ticket = Ticket(commands)
            if not await self._hand_over(first, ticket, wait):
                return [_busy(command) for command in commands]
            return await ticket.wait()
        replies: list[AnyReply | None] = [None] * count
        positions: dict[int, list[int]] = {}
        for position, target in enumerate(targets):
            if type(target) is int:
                positions.setdefault(target, []).append(position)
            else:
                replies[position] = target
        handed: list[tuple[Ticket, list[int]]] = []
        for shard, shard_positions in positions.items():
            ticket = Ticket([commands[position] for position in shard_positions])
            if await self._hand_over(shard, ticket, wait):
                handed.append((ticket, shard_positions))
            else:
                for position in shard_positions:
                    replies[position] = _busy(commands[position])
        for ticket, shard_positions in handed:
            for position, reply in zip(shard_positions, await ticket.wait(), strict=True):
                replies[position] = reply
        return replies  # type: ignore[return-value]

    def route(self, command: Command) -> int | AnyReply:
        """The shard that decides `command`, or the reply when no shard needs to see it."""
        # The hot path: a reserve for a SKU already seen. Everything else takes the long way.
        if type(command) is Reserve:
            sku = command.sku
            if type(sku) is str:
                shard = self._sku_shards.get(sku)
                if shard is not None:
                    return shard
        return self._route_checked(command)

    def _route_checked(self, command: Command) -> int | AnyReply:
        kind = type(command)
        if kind is Confirm or kind is Cancel or kind is GetHold:
            error = name_error(command.reservation, "reservation", self._string_bytes_max) or name_error(
                command.buyer, "buyer", self._string_bytes_max
            )
            if error:
                return status_reply(command, INVALID, error)
            shard = shard_for_reservation(command.reservation, self._shard_count)
            return status_reply(command, NOT_FOUND) if shard is None else shard
        if kind not in (Reserve, Stock, PutSku, Register, GetSku):
            return Reply(INVALID, error=f"{kind.__name__} is not a command")
        sku = command.sku
        error = name_error(sku, "sku", self._string_bytes_max)
        if error:
            return status_reply(command, INVALID, error)
        shard = shard_for_sku(sku, self._shard_count)
        # Remember the shard of valid SKU names, up to a bound: names that are not
        # SKUs (a client's typos, an attacker's noise) cannot grow memory without end.
        if len(self._sku_shards) < SKU_SHARD_CACHE_MAX:
            self._sku_shards[sku] = shard
        return shard

    async def _hand_over(self, shard: int, ticket: Ticket, wait: bool) -> bool:
        if wait:
            await self._send(shard, ticket)
            return True
        try:
            self._shards[shard].mailbox.send_nowait(ticket)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise EngineClosed("the engine is closed") from None
        return True

    async def _send(self, shard: int, ticket: Ticket) -> None:
        mailbox = self._shards[shard].mailbox
        # A caller already cancelled hands nothing over: a command in the mailbox is decided.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            # Without waiting when there is room (the caller checkpoints while it waits
            # for the reply anyway); with trio's backpressure when the mailbox is full.
            try:
                mailbox.send_nowait(ticket)
            except trio.WouldBlock:
                await mailbox.send(ticket)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise EngineClosed("the engine is closed") from None

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


def _busy(command: Command) -> AnyReply:
    return status_reply(command, BUSY, "the shard's mailbox is full; retry later")


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
