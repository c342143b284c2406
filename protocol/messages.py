"""The messages soldout speaks: commands in, replies out.

These are the typed objects that the codec decodes frames into, that the in-process
API builds, and that a shard's book applies. They carry values as the caller gave
them: the book validates every field, so a command may hold any type here and bad
values still end as an `invalid` reply, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

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


@dataclass(frozen=True, slots=True)
class Reserve:
    """Set `qty` units of `sku` aside for `buyer`; `key` makes a retry safe."""

    sku: Any
    buyer: Any
    qty: Any = 1
    key: Any = None


@dataclass(frozen=True, slots=True)
class Confirm:
    """The hold's units are sold for good."""

    reservation: Any
    buyer: Any


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
    """Create a SKU, or change its settings and restock it (`stock` is the total)."""

    sku: Any
    stock: Any
    per_buyer_limit: Any = 1
    hold_seconds: Any = 900
    opens_at: Any = None
    closes_at: Any = None
    registration_required: Any = False


@dataclass(frozen=True, slots=True)
class Register:
    """Let `buyers` reserve `sku` when it requires registration."""

    sku: Any
    buyers: Any


Command = Reserve | Confirm | Cancel | Stock | PutSku | Register


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


AnyReply = Reply | StockReply


def invalid(error: str) -> Reply:
    return Reply(INVALID, error=error)
