"""The messages soldout speaks: commands in, replies out.

A command that exists is valid: `protocol.parser.CommandParser` builds every command
the codec decodes and every one the in-process API is given, checking each field once,
so the book that applies a command trusts its fields. Replies are what the book
returns and what the codec encodes; the gateway's own answers (ping, stats, busy,
forbidden) are replies of the same types.

Commands and replies are plain slotted dataclasses (a frozen dataclass costs five times
as much to build, and the gateway builds one per request). Treat them as values: the
book hands out shared instances of its status-only replies.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final


class Status(StrEnum):
    """A reply's status; the value is its wire string. A business outcome is a status, never an exception."""

    OK = "ok"
    SOLD_OUT = "sold_out"
    LIMIT_EXCEEDED = "limit_exceeded"
    NOT_OPEN = "not_open"
    CLOSED = "closed"
    UNKNOWN_SKU = "unknown_sku"
    NOT_REGISTERED = "not_registered"
    INVALID = "invalid"
    BUSY = "busy"
    EXPIRED = "expired"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    FORBIDDEN = "forbidden"
    # The shard could not commit: the request may or may not have been decided. A retry
    # with the same idempotency key is safe; a client treats any status it does not know
    # the same way.
    UNAVAILABLE = "unavailable"

    def __repr__(self) -> str:
        # A reply prints as it did when statuses were strings: Reply(status='ok', ...).
        return repr(self.value)


OK: Final = Status.OK
SOLD_OUT: Final = Status.SOLD_OUT
LIMIT_EXCEEDED: Final = Status.LIMIT_EXCEEDED
NOT_OPEN: Final = Status.NOT_OPEN
CLOSED: Final = Status.CLOSED
UNKNOWN_SKU: Final = Status.UNKNOWN_SKU
NOT_REGISTERED: Final = Status.NOT_REGISTERED
INVALID: Final = Status.INVALID
BUSY: Final = Status.BUSY
EXPIRED: Final = Status.EXPIRED
NOT_FOUND: Final = Status.NOT_FOUND
CONFLICT: Final = Status.CONFLICT
FORBIDDEN: Final = Status.FORBIDDEN
UNAVAILABLE: Final = Status.UNAVAILABLE

# The refusals of a reserve in their order of precedence: the first check that fails is
# the answer. (A reserve whose idempotency key was used returns that hold, `ok`, after
# the unknown_sku check and before the sale-window checks.)
RESERVE_PRECEDENCE: Final = (INVALID, UNKNOWN_SKU, NOT_OPEN, CLOSED, NOT_REGISTERED, LIMIT_EXCEEDED, SOLD_OUT)
# Statuses that say nothing about the request itself: the server could not decide it.
NOT_DECIDED: Final = (BUSY, UNAVAILABLE)
RESERVE_STATUSES: Final = frozenset({OK, *RESERVE_PRECEDENCE, *NOT_DECIDED})
HOLD_STATUSES: Final = frozenset({OK, EXPIRED, NOT_FOUND, CONFLICT, INVALID, *NOT_DECIDED})


class HoldState(StrEnum):
    """Where a hold is: created HELD, it ends exactly once, in one of the other three."""

    HELD = "held"
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    def __repr__(self) -> str:
        return repr(self.value)


class Unchanged:
    """The value of a put_sku field left out: the SKU keeps its current setting."""

    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()

# The settings a SKU is created with when put_sku leaves them out.
PER_BUYER_LIMIT_DEFAULT: Final = 1
HOLD_SECONDS_DEFAULT: Final = 900


# ------------------------------------------------------------------ commands


@dataclass(slots=True)
class Reserve:
    """Set `qty` units of `sku` aside for `buyer`; `key` makes a retry safe."""

    sku: str
    buyer: str
    qty: int = 1
    key: str | None = None


@dataclass(slots=True)
class Confirm:
    """The hold's units are sold for good; `order` links it to the order system's id."""

    reservation: str
    buyer: str
    order: str | None = None


@dataclass(slots=True)
class Cancel:
    """The hold's units go back on sale."""

    reservation: str
    buyer: str


@dataclass(slots=True)
class Stock:
    """How many units of `sku` exist, are available, held and sold."""

    sku: str


@dataclass(slots=True)
class PutSku:
    """Create a SKU, or change the settings given and keep the rest (`stock` is the total).

    A field left UNCHANGED keeps the SKU's current value; when the SKU is created it takes
    the default (`stock` has none: creating a SKU needs it). `opens_at` / `closes_at` set
    to None clear the sale window's start or end.
    """

    sku: str
    stock: int | Unchanged = UNCHANGED
    per_buyer_limit: int | Unchanged = UNCHANGED
    hold_seconds: float | Unchanged = UNCHANGED
    opens_at: float | Unchanged | None = UNCHANGED
    closes_at: float | Unchanged | None = UNCHANGED
    registration_required: bool | Unchanged = UNCHANGED


@dataclass(slots=True)
class GetSku:
    """Every setting and count of `sku`, the number of registered buyers, and whether it is open."""

    sku: str


@dataclass(slots=True)
class GetHold:
    """Look a hold up without changing it: its SKU, units, state, expiry and order."""

    reservation: str
    buyer: str


@dataclass(slots=True)
class Register:
    """Let `buyers` reserve `sku` when it requires registration."""

    sku: str
    buyers: list[str]


@dataclass(slots=True)
class Stats:
    """The server's counters: answered by the gateway, which holds them, never by a shard."""


Command = Reserve | Confirm | Cancel | Stock | PutSku | Register | GetSku | GetHold
# What a shard decides; Stats is the gateway's.
SHARD_COMMANDS: Final = (Reserve, Confirm, Cancel, Stock, PutSku, Register, GetSku, GetHold)


# ------------------------------------------------------------------- replies


@dataclass(slots=True)
class Reply:
    """The answer to reserve, confirm, cancel, put_sku, register's refusals, ping, and every refusal.

    `reservation`, `expires_at` (epoch seconds) and `remaining` (the SKU's available
    units once this hold is made) are set on a reserve that is `ok`; `error` says what
    was wrong with an `invalid` request, or why one was `busy` or `forbidden`.
    """

    status: Status
    reservation: str | None = None
    expires_at: float | None = None
    remaining: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(slots=True)
class StockReply:
    """The answer to stock: `available == stock - held - sold`."""

    status: Status
    stock: int | None = None
    available: int | None = None
    held: int | None = None
    sold: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(slots=True)
class RegisterReply:
    """The answer to register: buyers newly registered, and those registered already."""

    status: Status
    registered: int | None = None
    already: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(slots=True)
class SkuReply:
    """The answer to get_sku. `open`: a reserve now would pass the sale-window checks."""

    status: Status
    sku: str | None = None
    stock: int | None = None
    available: int | None = None
    held: int | None = None
    sold: int | None = None
    per_buyer_limit: int | None = None
    hold_seconds: float | None = None
    opens_at: float | None = None
    closes_at: float | None = None
    registration_required: bool | None = None
    registered: int | None = None
    open: bool | None = None
    shard: int | None = None  # the shard that owns the SKU
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(slots=True)
class HoldReply:
    """The answer to hold: `state` is held, confirmed, cancelled or expired."""

    status: Status
    sku: str | None = None
    qty: int | None = None
    state: HoldState | None = None
    expires_at: float | None = None
    order: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(slots=True)
class StatsReply:
    """The answer to stats: the server's counters, as SPEC.md's `stats` map."""

    status: Status
    stats: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


AnyReply = Reply | StockReply | RegisterReply | SkuReply | HoldReply | StatsReply
REPLY_TYPES: Final = (Reply, StockReply, RegisterReply, SkuReply, HoldReply, StatsReply)

_REPLY_TYPE_OF: Final[dict[type, type]] = {
    Stock: StockReply,
    Register: RegisterReply,
    GetSku: SkuReply,
    GetHold: HoldReply,
    Stats: StatsReply,
}


def reply_type(command: object) -> type:
    """The reply type that answers `command` (Reply for every other command)."""
    return _REPLY_TYPE_OF.get(type(command), Reply)


def status_reply(command: object, status: Status, error: str | None = None) -> AnyReply:
    """A reply of the type `command` is answered with, carrying only a status and error."""
    return reply_type(command)(status, error=error)  # type: ignore[no-any-return]


def invalid(error: str) -> Reply:
    return Reply(INVALID, error=error)
