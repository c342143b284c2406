"""The messages soldout speaks: commands in, replies out.

These are the typed objects that the codec decodes frames into, that the in-process
API builds, and that a shard's book applies. They carry values as the caller gave
them: the book validates every field, so a command may hold any type here and bad
values still end as an `invalid` reply, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

# Reply statuses. A business outcome is a status, never an exception.
OK: Final = "ok"
SOLD_OUT: Final = "sold_out"
LIMIT_EXCEEDED: Final = "limit_exceeded"
NOT_OPEN: Final = "not_open"
CLOSED: Final = "closed"
UNKNOWN_SKU: Final = "unknown_sku"
NOT_REGISTERED: Final = "not_registered"
INVALID: Final = "invalid"
BUSY: Final = "busy"
EXPIRED: Final = "expired"
NOT_FOUND: Final = "not_found"
CONFLICT: Final = "conflict"
FORBIDDEN: Final = "forbidden"
# The shard could not commit: the request may or may not have been decided. A retry
# with the same idempotency key is safe; a client treats any status it does not know
# the same way.
UNAVAILABLE: Final = "unavailable"

RESERVE_STATUSES: Final = frozenset(
    {OK, SOLD_OUT, LIMIT_EXCEEDED, NOT_OPEN, CLOSED, UNKNOWN_SKU, NOT_REGISTERED, INVALID, BUSY, UNAVAILABLE}
)
HOLD_STATUSES: Final = frozenset({OK, EXPIRED, NOT_FOUND, CONFLICT, INVALID, BUSY, UNAVAILABLE})


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

# Hold states, as the hold op and the export name them.
HoldState = Literal["held", "confirmed", "cancelled", "expired"]


@dataclass(frozen=True, slots=True)
class Reserve:
    """Set `qty` units of `sku` aside for `buyer`; `key` makes a retry safe."""

    sku: Any
    buyer: Any
    qty: Any = 1
    key: Any = None


@dataclass(frozen=True, slots=True)
class Confirm:
    """The hold's units are sold for good; `order` links it to the order system's id."""

    reservation: Any
    buyer: Any
    order: Any = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """The hold's units go back on sale."""

    reservation: Any
    buyer: Any


@dataclass(frozen=True, slots=True)
class Stock:
    """How many units of `sku` exist, are available, held and sold."""

    sku: Any


@dataclass(frozen=True, slots=True)
class PutSku:
    """Create a SKU, or change the settings given and keep the rest (`stock` is the total).

    A field left UNCHANGED keeps the SKU's current value; when the SKU is created it takes
    the default (`stock` has none: creating a SKU needs it). `opens_at` / `closes_at` set
    to None clear the sale window's start or end.
    """

    sku: Any
    stock: Any = UNCHANGED
    per_buyer_limit: Any = UNCHANGED
    hold_seconds: Any = UNCHANGED
    opens_at: Any = UNCHANGED
    closes_at: Any = UNCHANGED
    registration_required: Any = UNCHANGED


@dataclass(frozen=True, slots=True)
class GetSku:
    """Every setting and count of `sku`, the number of registered buyers, and whether it is open."""

    sku: Any


@dataclass(frozen=True, slots=True)
class GetHold:
    """Look a hold up without changing it: its SKU, units, state, expiry and order."""

    reservation: Any
    buyer: Any


@dataclass(frozen=True, slots=True)
class Register:
    """Let `buyers` reserve `sku` when it requires registration."""

    sku: Any
    buyers: Any


Command = Reserve | Confirm | Cancel | Stock | PutSku | Register | GetSku | GetHold


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to reserve, confirm, cancel, put_sku and register.

    `reservation`, `expires_at` (epoch seconds) and `remaining` are set on a reserve
    that is `ok`; `error` says what was wrong with an `invalid` request.
    """

    status: str
    reservation: str | None = None
    expires_at: float | None = None
    remaining: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True, slots=True)
class StockReply:
    """The answer to stock: `available == stock - held - sold`."""

    status: str
    stock: int | None = None
    available: int | None = None
    held: int | None = None
    sold: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True, slots=True)
class RegisterReply:
    """The answer to register: buyers newly registered, and those registered already."""

    status: str
    registered: int | None = None
    already: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True, slots=True)
class SkuReply:
    """The answer to get_sku. `open`: a reserve now would pass the sale-window checks."""

    status: str
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
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True, slots=True)
class HoldReply:
    """The answer to hold: `state` is held, confirmed, cancelled or expired."""

    status: str
    sku: str | None = None
    qty: int | None = None
    state: HoldState | None = None
    expires_at: float | None = None
    order: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


AnyReply = Reply | StockReply | RegisterReply | SkuReply | HoldReply


def invalid(error: str) -> Reply:
    return Reply(INVALID, error=error)


def status_reply(command: object, status: str, error: str | None = None) -> AnyReply:
    """A reply of the type `command` is answered with, carrying only a status and error."""
    kind = type(command)
    if kind is Stock:
        return StockReply(status, error=error)
    if kind is Register:
        return RegisterReply(status, error=error)
    if kind is GetSku:
        return SkuReply(status, error=error)
    if kind is GetHold:
        return HoldReply(status, error=error)
    return Reply(status, error=error)
