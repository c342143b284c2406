"""A plain model of the engine, written from its contract, to check the engine against.

The contract is DESIGN.md, issue 2 and the order of precedence the book documents:
a reserve answers the first of invalid, unknown_sku, (a used idempotency key returns
its hold), not_open, closed, not_registered, limit_exceeded, sold_out, and otherwise
holds its units. The model keeps plain dictionaries of SKUs and holds and recounts
everything from the holds on every question, so that it is obviously right rather
than fast. It never imports the engine's book.

Every operation takes `now` (epoch seconds) and first expires the holds whose time
ran out by then, as the engine does at the start of every batch. A reserve that
creates a hold takes `new_reservation`, the id the engine chose for it: ids are the
engine's to choose, and the model only checks that an id is not already in use.

`observe_engine` at the bottom is the one bridge to the engine's insides: it reads
every SKU and hold the shards know, in the model's terms, so tests can compare whole
states (`Model.view`).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

from protocol.limits import Limits
from protocol.messages import (
    CLOSED,
    CONFLICT,
    EXPIRED,
    INVALID,
    LIMIT_EXCEEDED,
    NOT_FOUND,
    NOT_OPEN,
    NOT_REGISTERED,
    OK,
    SOLD_OUT,
    UNCHANGED,
    UNKNOWN_SKU,
    AnyReply,
    HoldReply,
    RegisterReply,
    Reply,
    SkuReply,
    StockReply,
)

# The longest hold put_sku accepts: a year (a leap one).
HOLD_SECONDS_MAX = 366 * 86400

# Where a hold is in its life; it leaves "held" exactly once.
HELD = "held"
CONFIRMED = "confirmed"
CANCELLED = "cancelled"
EXPIRED_HOLD = "expired"


class ModelError(AssertionError):
    """The engine did something the model cannot follow (such as reusing a live id)."""


@dataclass
class ModelSku:
    stock: int
    per_buyer_limit: int
    hold_seconds: float
    opens_at: float | None
    closes_at: float | None
    registration_required: bool
    registered: set[str] = field(default_factory=set)
    keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> reservation id


@dataclass(slots=True)
class ModelHold:
    sku: str
    buyer: str
    qty: int
    expires_at: float
    key: str | None
    state: str = HELD
    order: str | None = None


# What a test compares, as plain data. A SKU: (stock, per_buyer_limit, hold_seconds,
# opens_at, closes_at, registration_required, registered buyers, {key: reservation}).
SkuView = tuple[int, int, float, float | None, float | None, bool, frozenset[str], dict[str, str]]
# A hold: (sku, buyer, qty, expires_at, key, state, order).
HoldView = tuple[str, str, int, float, str | None, str, str | None]


@dataclass
class View:
    """A whole state: every SKU's settings and every hold, by name and by reservation id."""

    skus: dict[str, SkuView] = field(default_factory=dict)
    holds: dict[str, HoldView] = field(default_factory=dict)

    def update(self, other: View) -> None:
        self.skus.update(other.skus)
        self.holds.update(other.holds)


def _name_is_valid(value: object, string_bytes_max: int) -> bool:
    if not isinstance(value, str) or value == "":
        return False
    return len(value.encode("utf-8", "surrogatepass")) <= string_bytes_max


def _is_whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_epoch_seconds(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0


def _invalid(why: str) -> Reply:
    return Reply(INVALID, error=why)


class Model:
    """SKUs and holds as plain dictionaries; answers as the engine must."""

    def __init__(self, limits: Limits | None = None, shards: int = 1) -> None:
        self.limits = limits or Limits()
        # get_sku names the SKU's shard: CRC-32 of its UTF-8 bytes, modulo the shard count.
        self.shards = shards
        self.skus: dict[str, ModelSku] = {}
        self.holds: dict[str, ModelHold] = {}  # by reservation id

    def copy(self) -> Model:
        """An independent copy: later operations on either leave the other as it was."""
        other = Model(self.limits, self.shards)
        other.skus = {
            sku: dataclasses.replace(state, registered=set(state.registered), keys=dict(state.keys))
            for sku, state in self.skus.items()
        }
        other.holds = {reservation: dataclasses.replace(hold) for reservation, hold in self.holds.items()}
        return other

    # ------------------------------------------------------------ counting

    def _units(self, sku: str, states: tuple[str, ...], buyer: str | None = None) -> int:
        return sum(
            hold.qty
            for hold in self.holds.values()
            if hold.sku == sku and hold.state in states and (buyer is None or hold.buyer == buyer)
        )

    def held(self, sku: str) -> int:
        return self._units(sku, (HELD,))

    def sold(self, sku: str) -> int:
        return self._units(sku, (CONFIRMED,))

    def available(self, sku: str) -> int:
        return self.skus[sku].stock - self.held(sku) - self.sold(sku)

    def buyer_units(self, sku: str, buyer: str) -> int:
        """Units a buyer holds or bought: what the per-buyer limit bounds."""
        return self._units(sku, (HELD, CONFIRMED), buyer)

    def knows(self, reservation: object) -> bool:
        return isinstance(reservation, str) and reservation in self.holds

    # ------------------------------------------------------------ time

    def expire(self, now: float) -> None:
        """Every hold whose time ran out by `now` ends as expired."""
        for hold in self.holds.values():
            if hold.state == HELD and hold.expires_at <= now:
                hold.state = EXPIRED_HOLD

    # ------------------------------------------------------------ operations

    def put_sku(
        self,
        sku: Any,
        stock: Any,
        per_buyer_limit: Any,
        hold_seconds: Any,
        opens_at: Any,
        closes_at: Any,
        registration_required: Any,
        now: float,
    ) -> Reply:
        self.expire(now)
        limits = self.limits
        if not _name_is_valid(sku, limits.string_bytes_max):
            return _invalid("sku")
        existing = self.skus.get(sku)
        # A setting left out keeps its value; a new SKU takes the defaults, and needs a stock.
        if existing is None and stock is UNCHANGED:
            return _invalid("stock is required to create a SKU")
        base = existing or ModelSku(0, 1, 900, None, None, False)
        stock = base.stock if stock is UNCHANGED else stock
        per_buyer_limit = base.per_buyer_limit if per_buyer_limit is UNCHANGED else per_buyer_limit
        hold_seconds = base.hold_seconds if hold_seconds is UNCHANGED else hold_seconds
        opens_at = base.opens_at if opens_at is UNCHANGED else opens_at
        closes_at = base.closes_at if closes_at is UNCHANGED else closes_at
        if registration_required is UNCHANGED:
            registration_required = base.registration_required
        if not _is_whole_number(stock) or not 0 <= stock <= limits.stock_max:
            return _invalid("stock")
        if not _is_whole_number(per_buyer_limit) or not 1 <= per_buyer_limit <= limits.stock_max:
            return _invalid("per_buyer_limit")
        if not _is_epoch_seconds(hold_seconds) or not 0 < hold_seconds <= HOLD_SECONDS_MAX:
            return _invalid("hold_seconds")
        if opens_at is not None and not _is_epoch_seconds(opens_at):
            return _invalid("opens_at")
        if closes_at is not None and not _is_epoch_seconds(closes_at):
            return _invalid("closes_at")
        if opens_at is not None and closes_at is not None and closes_at <= opens_at:
            return _invalid("closes_at before opens_at")
        if not isinstance(registration_required, bool):
            return _invalid("registration_required")
        if existing is not None:
            if stock < self.held(sku) + self.sold(sku):
                return _invalid("stock below units held and sold")
            buyers = {hold.buyer for hold in self.holds.values() if hold.sku == sku}
            if any(self.buyer_units(sku, buyer) > per_buyer_limit for buyer in buyers):
                return _invalid("per_buyer_limit below a buyer's units")
            existing.stock = stock
            existing.per_buyer_limit = per_buyer_limit
            existing.hold_seconds = hold_seconds
            existing.opens_at = opens_at
            existing.closes_at = closes_at
            existing.registration_required = registration_required
        else:
            self.skus[sku] = ModelSku(stock, per_buyer_limit, hold_seconds, opens_at, closes_at, registration_required)
        return Reply(OK)

    def register(self, sku: Any, buyers: Any, now: float) -> RegisterReply:
        self.expire(now)
        string_bytes_max = self.limits.string_bytes_max
        if not _name_is_valid(sku, string_bytes_max):
            return RegisterReply(INVALID, error="sku")
        if not isinstance(buyers, list | tuple):
            return RegisterReply(INVALID, error="buyers")
        if not all(_name_is_valid(buyer, string_bytes_max) for buyer in buyers):
            return RegisterReply(INVALID, error="buyer")
        state = self.skus.get(sku)
        if state is None:
            return RegisterReply(UNKNOWN_SKU)
        distinct = set(buyers)
        already = len(distinct & state.registered)
        state.registered.update(distinct)
        return RegisterReply(OK, registered=len(distinct) - already, already=already)

    def reserve(
        self, sku: Any, buyer: Any, qty: Any, key: Any, now: float, new_reservation: str | None = None
    ) -> Reply:
        self.expire(now)
        limits = self.limits
        if not _name_is_valid(sku, limits.string_bytes_max):
            return _invalid("sku")
        if not _name_is_valid(buyer, limits.string_bytes_max):
            return _invalid("buyer")
        if not _is_whole_number(qty) or not 1 <= qty <= limits.qty_max:
            return _invalid("qty")
        if key is not None and not _name_is_valid(key, limits.string_bytes_max):
            return _invalid("key")
        state = self.skus.get(sku)
        if state is None:
            return Reply(UNKNOWN_SKU)
        if key is not None and key in state.keys:
            reservation = state.keys[key]
            hold = self.holds[reservation]
            if hold.buyer != buyer or hold.qty != qty:
                return _invalid("key used with another buyer or qty")
            return Reply(OK, reservation=reservation, expires_at=hold.expires_at, remaining=self.available(sku))
        if state.opens_at is not None and now < state.opens_at:
            return Reply(NOT_OPEN)
        if state.closes_at is not None and now >= state.closes_at:
            return Reply(CLOSED)
        if state.registration_required and buyer not in state.registered:
            return Reply(NOT_REGISTERED)
        if self.buyer_units(sku, buyer) + qty > state.per_buyer_limit:
            return Reply(LIMIT_EXCEEDED)
        available = self.available(sku)
        if qty > available:
            return Reply(SOLD_OUT)
        if not isinstance(new_reservation, str) or new_reservation == "":
            raise ModelError(f"a new hold needs the id the engine gave it, got {new_reservation!r}")
        if new_reservation in self.holds:
            raise ModelError(f"the engine reused reservation id {new_reservation!r} for a second hold")
        expires_at = now + state.hold_seconds
        self.holds[new_reservation] = ModelHold(sku, buyer, qty, expires_at, key)
        if key is not None:
            state.keys[key] = new_reservation
        return Reply(OK, reservation=new_reservation, expires_at=expires_at, remaining=available - qty)

    def confirm(self, reservation: Any, buyer: Any, now: float, order: Any = None) -> Reply:
        return self._end(reservation, buyer, now, CONFIRMED, order)

    def cancel(self, reservation: Any, buyer: Any, now: float) -> Reply:
        return self._end(reservation, buyer, now, CANCELLED, None)

    def _end(self, reservation: Any, buyer: Any, now: float, ending: str, order: Any) -> Reply:
        self.expire(now)
        string_bytes_max = self.limits.string_bytes_max
        if not _name_is_valid(reservation, string_bytes_max) or not _name_is_valid(buyer, string_bytes_max):
            return _invalid("reservation or buyer")
        if order is not None and not _name_is_valid(order, string_bytes_max):
            return _invalid("order")
        hold = self.holds.get(reservation)
        # A wrong buyer is told exactly what an unknown id is told.
        if hold is None or hold.buyer != buyer:
            return Reply(NOT_FOUND)
        if hold.state == HELD:
            hold.state = ending
            hold.order = order
            return Reply(OK)
        if hold.state == ending:
            if order is not None and order != hold.order:
                return Reply(CONFLICT)  # confirmed for another order
            return Reply(OK)  # a retry of what already happened
        if hold.state == EXPIRED_HOLD:
            return Reply(EXPIRED)
        return Reply(CONFLICT)

    def hold(self, reservation: Any, buyer: Any, now: float) -> HoldReply:
        self.expire(now)
        string_bytes_max = self.limits.string_bytes_max
        if not _name_is_valid(reservation, string_bytes_max) or not _name_is_valid(buyer, string_bytes_max):
            return HoldReply(INVALID, error="reservation or buyer")
        hold = self.holds.get(reservation)
        if hold is None or hold.buyer != buyer:
            return HoldReply(NOT_FOUND)
        return HoldReply(OK, sku=hold.sku, qty=hold.qty, state=hold.state, expires_at=hold.expires_at, order=hold.order)

    def get_sku(self, sku: Any, now: float) -> SkuReply:
        self.expire(now)
        if not _name_is_valid(sku, self.limits.string_bytes_max):
            return SkuReply(INVALID, error="sku")
        state = self.skus.get(sku)
        if state is None:
            return SkuReply(UNKNOWN_SKU)
        held, sold = self.held(sku), self.sold(sku)
        opened = state.opens_at is None or now >= state.opens_at
        is_open = opened and (state.closes_at is None or now < state.closes_at)
        return SkuReply(
            OK,
            sku=sku,
            stock=state.stock,
            available=state.stock - held - sold,
            held=held,
            sold=sold,
            per_buyer_limit=state.per_buyer_limit,
            hold_seconds=state.hold_seconds,
            opens_at=state.opens_at,
            closes_at=state.closes_at,
            registration_required=state.registration_required,
            registered=len(state.registered),
            open=is_open,
            shard=zlib.crc32(sku.encode("utf-8")) % self.shards,
        )

    def stock(self, sku: Any, now: float) -> StockReply:
        self.expire(now)
        if not _name_is_valid(sku, self.limits.string_bytes_max):
            return StockReply(INVALID, error="sku")
        state = self.skus.get(sku)
        if state is None:
            return StockReply(UNKNOWN_SKU)
        held, sold = self.held(sku), self.sold(sku)
        return StockReply(OK, stock=state.stock, available=state.stock - held - sold, held=held, sold=sold)

    # ------------------------------------------------------------ checking

    def check_invariants(self) -> None:
        """DESIGN.md's invariants, on the model's own state."""
        for sku, state in self.skus.items():
            held, sold = self.held(sku), self.sold(sku)
            assert held >= 0, f"{sku}: negative units held"
            assert sold >= 0, f"{sku}: negative units sold"
            assert held + sold <= state.stock, f"{sku}: held {held} + sold {sold} > stock {state.stock}"
            for buyer in {hold.buyer for hold in self.holds.values() if hold.sku == sku}:
                units = self.buyer_units(sku, buyer)
                assert units <= state.per_buyer_limit, f"{sku}: {buyer} has {units} units"
            for key, reservation in state.keys.items():
                assert self.holds[reservation].key == key, f"{sku}: key {key} names another hold"
        keyed = [(hold.sku, hold.key) for hold in self.holds.values() if hold.key is not None]
        assert len(keyed) == len(set(keyed)), "a key made two holds"

    def view(self) -> View:
        return View(
            skus={
                sku: (
                    state.stock,
                    state.per_buyer_limit,
                    state.hold_seconds,
                    state.opens_at,
                    state.closes_at,
                    state.registration_required,
                    frozenset(state.registered),
                    dict(state.keys),
                )
                for sku, state in self.skus.items()
            },
            holds={
                reservation: (hold.sku, hold.buyer, hold.qty, hold.expires_at, hold.key, hold.state, hold.order)
                for reservation, hold in self.holds.items()
            },
        )


def assert_same_reply(actual: AnyReply, expected: AnyReply, what: object) -> None:
    """The engine's reply is the model's; an `invalid` must say why, in any words."""
    if expected.status == INVALID:
        assert type(actual) is type(expected), f"{what}: {actual!r}, expected an invalid {type(expected).__name__}"
        assert actual.status == INVALID, f"{what}: {actual!r}, expected invalid"
        assert actual.error, f"{what}: invalid without a reason"
        return
    assert actual == expected, f"{what}: engine answered {actual!r}, model expected {expected!r}"


# ---------------------------------------------------------------- the engine's side


def observe_engine(engine: Any) -> View:
    """Every SKU and hold the engine's shards know, in the model's terms.

    Reads the shards' books directly (and has each check its own invariants), so call
    it between commands, from the trio thread that runs the engine. The books'
    internals are used only here.
    """
    from engine.book import format_reservation

    view = View()
    for shard in engine._shards:
        book = shard.book
        book.check_invariants()
        for sku, state in book.skus.items():
            keys = {key: format_reservation(shard.index, number) for key, number in state.keys.items()}
            view.skus[sku] = (
                state.stock,
                state.per_buyer_limit,
                state.hold_seconds,
                state.opens_at,
                state.closes_at,
                state.registration_required,
                frozenset(state.registered),
                keys,
            )
        for number, hold in book.holds.items():
            view.holds[format_reservation(shard.index, number)] = (
                hold.sku.sku,
                hold.buyer,
                hold.qty,
                hold.expires_at,
                hold.key,
                hold.state.value,
                hold.order,
            )
    return view
