"""The one parser: a request map, or an API call's arguments, become a valid command.

Every field of every command is checked here, once, against the `Limits`: the codec
hands each decoded request map to `CommandParser.request`, the embedded API passes its
arguments (or a command built by hand) through the other methods, and the server's
config file builds its SKUs' put_sku commands here too. What comes out is a command
whose fields have their types and bounds, or the `invalid` reply that says what is
wrong. The book then decides against its state and never checks a field again.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Final

from protocol.limits import ECHO_CHARS_MAX, HOLD_SECONDS_MAX, ID_MAX, ID_MIN, Limits
from protocol.messages import (
    FORBIDDEN,
    INVALID,
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
    Stats,
    Stock,
    StockReply,
)

FRONTEND_OPS: Final = frozenset({"reserve", "confirm", "cancel", "hold", "stock", "ping"})
ADMIN_OPS: Final = frozenset({"put_sku", "get_sku", "register", "stats"})
OPS: Final = FRONTEND_OPS | ADMIN_OPS

# The fields of each op besides "id" and "op": required (in the order a missing one is
# reported), then optional.
OP_FIELDS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "reserve": (("sku", "buyer", "qty"), ("key",)),
    "confirm": (("reservation", "buyer"), ("order",)),
    "cancel": (("reservation", "buyer"), ()),
    "hold": (("reservation", "buyer"), ()),
    "stock": (("sku",), ()),
    "ping": ((), ()),
    "put_sku": (
        ("sku",),
        ("stock", "per_buyer_limit", "hold_seconds", "opens_at", "closes_at", "registration_required"),
    ),
    "get_sku": (("sku",), ()),
    "register": (("sku", "buyers"), ()),
    "stats": ((), ()),
}
assert frozenset(OP_FIELDS) == OPS
PUT_SKU_SETTINGS: Final = OP_FIELDS["put_sku"][1]
_PUT_SKU_NAMES: Final = frozenset({"id", "op", "sku", *PUT_SKU_SETTINGS})

# The replies that need no shard: ping's, and the command that only the gateway answers.
PING_REPLY: Final = Reply(OK)
STATS: Final = Stats()

# What `request` returns: the request's id (None when the map has no valid one), its op
# (None unless it is a known one), and the command, or the reply already decided.
Parsed = tuple[int | None, str | None, "Command | Stats | AnyReply"]


def clip(value: object) -> str:
    """`value` as text short enough to quote back to a peer."""
    kind = type(value)
    if kind is str:
        text = value
    elif kind in (int, float, bool, bytes) or value is None:
        text = repr(value)
    else:
        # A container may nest a thousand deep: its repr could raise RecursionError.
        return f"a value of type {kind.__name__}"
    if len(text) > ECHO_CHARS_MAX:
        return text[:ECHO_CHARS_MAX] + "..."
    return text  # type: ignore[return-value]


def name_error(value: object, what: str, string_bytes_max: int) -> str | None:
    """Why `value` is not a valid SKU, buyer, key, order or reservation id; None when it is."""
    if type(value) is not str:
        return f"{what} must be a string"
    if value.isascii():  # O(1) in CPython: one byte per character, nothing to encode
        if 0 < len(value) <= string_bytes_max:
            return None
    elif value:
        try:
            if len(value.encode("utf-8")) <= string_bytes_max:
                return None
        except UnicodeEncodeError:
            return f"{what} is not valid Unicode text (it has a lone surrogate)"
    if not value:
        return f"{what} must not be empty"
    return f"{what} is longer than {string_bytes_max} bytes"


def is_epoch_seconds(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0  # type: ignore[arg-type]


class CommandParser:
    """Builds valid commands under one set of limits; see the module's docstring."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._string_bytes_max = limits.string_bytes_max
        self._qty_max = limits.qty_max
        self._stock_max = limits.stock_max
        self._register_buyers_max = limits.register_buyers_max
        self._from_map = {
            "reserve": self._reserve_map,
            "confirm": self._confirm_map,
            "cancel": self._cancel_map,
            "hold": self._hold_map,
            "stock": self._stock_map,
            "ping": self._ping_map,
            "put_sku": self._put_sku_map,
            "get_sku": self._get_sku_map,
            "register": self._register_map,
            "stats": self._stats_map,
        }

    # ------------------------------------------------------------ from the wire

    def requests(
        self, maps: list[Any], admin: bool = True
    ) -> tuple[list[int | None], list[str | None], list[Command | Stats | AnyReply], int] | None:
        """The maps of a batch as parallel lists of ids, ops and commands, and the count of
        stats requests; None when an element is not a map. Each map as `request` makes it.
        """
        ids: list[int | None] = []
        ops: list[str | None] = []
        commands: list[Command | Stats | AnyReply] = []
        add_id = ids.append
        add_op = ops.append
        add_command = commands.append
        request = self.request
        stats = 0
        for fields in maps:
            if type(fields) is not dict:
                return None
            # A frame of valid reserves alone never gets here: the codec's fast path
            # (protocol/reserve_frames.py) decodes it.
            request_id, op, command = request(fields, admin)
            add_id(request_id)
            add_op(op)
            add_command(command)
            if command is STATS:
                stats += 1
        return ids, ops, commands, stats

    def plain_reserve(self, sku: Any, buyer: Any, qty: Any, key: Any) -> bool:
        """The common reserve, checked fast: ASCII names within the bound, a qty in range.

        True means valid; False means `reserve` must look closer (a name may be valid
        UTF-8 beyond ASCII, or something is wrong and needs its message).
        """
        names_max = self._string_bytes_max
        return (
            type(sku) is str
            and sku.isascii()
            and 0 < len(sku) <= names_max
            and type(buyer) is str
            and buyer.isascii()
            and 0 < len(buyer) <= names_max
            and type(qty) is int
            and 0 < qty <= self._qty_max
            and (key is None or (type(key) is str and key.isascii() and 0 < len(key) <= names_max))
        )

    def request(self, fields: dict[Any, Any], admin: bool = True) -> Parsed:
        """One decoded request map, well formed or not, as (id, op, command or reply); never raises.

        A map that breaks the protocol is answered `invalid`; an admin op on a
        connection without an admin token `forbidden`, whatever its values.
        """
        request_id = fields.get("id")
        op = fields.get("op")
        parse = self._from_map.get(op) if type(op) is str else None
        if type(request_id) is int and ID_MIN <= request_id <= ID_MAX:
            if parse is not None:
                if admin or op not in ADMIN_OPS:
                    item = parse(fields)
                    if item is not None:
                        return request_id, op, item
                elif self._names_error(fields, op) is None:
                    return request_id, op, Reply(FORBIDDEN, error=f"{op} needs an admin token")
        else:
            request_id = None
        if parse is None:
            op = None
        return request_id, op, Reply(INVALID, error=self._map_error(fields))

    # Each `_<op>_map` returns None when the map's field names are wrong (then
    # `_map_error` says how). The map is known to hold "id" and "op", so a count of its
    # entries and a lookup of each required field prove it holds exactly the allowed names.

    def _reserve_map(self, fields: dict[Any, Any]) -> Reserve | Reply | None:
        count = len(fields)
        if count == 5:
            key = None
        elif count == 6 and "key" in fields:
            key = fields["key"]
        else:
            return None
        try:
            sku = fields["sku"]
            buyer = fields["buyer"]
            qty = fields["qty"]
        except KeyError:
            return None
        return self.reserve(sku, buyer, qty, key)

    def _confirm_map(self, fields: dict[Any, Any]) -> Confirm | Reply | None:
        count = len(fields)
        if count == 4:
            order = None
        elif count == 5 and "order" in fields:
            order = fields["order"]
        else:
            return None
        if "reservation" not in fields or "buyer" not in fields:
            return None
        return self.confirm(fields["reservation"], fields["buyer"], order)

    def _cancel_map(self, fields: dict[Any, Any]) -> Cancel | Reply | None:
        if len(fields) != 4 or "reservation" not in fields or "buyer" not in fields:
            return None
        return self.cancel(fields["reservation"], fields["buyer"])

    def _hold_map(self, fields: dict[Any, Any]) -> GetHold | AnyReply | None:
        if len(fields) != 4 or "reservation" not in fields or "buyer" not in fields:
            return None
        return self.hold(fields["reservation"], fields["buyer"])

    def _stock_map(self, fields: dict[Any, Any]) -> Stock | AnyReply | None:
        if len(fields) != 3 or "sku" not in fields:
            return None
        return self.stock(fields["sku"])

    def _get_sku_map(self, fields: dict[Any, Any]) -> GetSku | AnyReply | None:
        if len(fields) != 3 or "sku" not in fields:
            return None
        return self.get_sku(fields["sku"])

    def _ping_map(self, fields: dict[Any, Any]) -> Reply | None:
        return PING_REPLY if len(fields) == 2 else None

    def _stats_map(self, fields: dict[Any, Any]) -> Stats | None:
        return STATS if len(fields) == 2 else None

    def _put_sku_map(self, fields: dict[Any, Any]) -> PutSku | Reply | None:
        if "sku" not in fields or not fields.keys() <= _PUT_SKU_NAMES:
            return None
        # A field left out keeps the SKU's current value; null is a value (it clears a time).
        return self.put_sku(fields["sku"], **{name: fields[name] for name in PUT_SKU_SETTINGS if name in fields})

    def _register_map(self, fields: dict[Any, Any]) -> Register | RegisterReply | None:
        if len(fields) != 4 or "sku" not in fields or "buyers" not in fields:
            return None
        return self.register(fields["sku"], fields["buyers"])

    def _names_error(self, fields: dict[Any, Any], op: str) -> str | None:
        """Why the map's field names are wrong for `op`; None when they are right."""
        required, optional = OP_FIELDS[op]
        for name in fields:
            if type(name) is not str:
                return f"field names must be strings, not {clip(name)}"
            if name != "id" and name != "op" and name not in required and name not in optional:
                return f"unknown field: {clip(name)}"
        for name in required:
            if name not in fields:
                return f"missing field: {name}"
        return None

    def _map_error(self, fields: dict[Any, Any]) -> str:
        """Why a request map is not a valid request: the first problem, in a fixed order."""
        if "id" not in fields:
            return "missing field: id"
        request_id = fields["id"]
        if type(request_id) is not int or not ID_MIN <= request_id <= ID_MAX:
            return "id must be an integer from -2**63 to 2**63-1"
        if "op" not in fields:
            return "missing field: op"
        op = fields["op"]
        if type(op) is not str:
            return "op must be a string"
        if op not in OP_FIELDS:
            return f"unknown op: {clip(op)}"
        error = self._names_error(fields, op)
        if error is None:
            raise AssertionError(f"no error found in a request its parser refused: {[clip(name) for name in fields]}")
        return error

    # ------------------------------------------------------------ from arguments

    def _name(self, value: object, what: str) -> str | None:
        return name_error(value, what, self._string_bytes_max)

    def reserve(self, sku: Any, buyer: Any, qty: Any = 1, key: Any = None) -> Reserve | Reply:
        error = self._name(sku, "sku") or self._name(buyer, "buyer")
        if error:
            return Reply(INVALID, error=error)
        if type(qty) is not int or not 0 < qty <= self._qty_max:
            return Reply(INVALID, error=f"qty must be an integer from 1 to {self._qty_max}")
        if key is not None:
            error = self._name(key, "key")
            if error:
                return Reply(INVALID, error=error)
        return Reserve(sku, buyer, qty, key)

    def _hold_names(self, reservation: Any, buyer: Any) -> str | None:
        return self._name(reservation, "reservation") or self._name(buyer, "buyer")

    def confirm(self, reservation: Any, buyer: Any, order: Any = None) -> Confirm | Reply:
        error = self._hold_names(reservation, buyer) or (self._name(order, "order") if order is not None else None)
        if error:
            return Reply(INVALID, error=error)
        return Confirm(reservation, buyer, order)

    def cancel(self, reservation: Any, buyer: Any) -> Cancel | Reply:
        error = self._hold_names(reservation, buyer)
        if error:
            return Reply(INVALID, error=error)
        return Cancel(reservation, buyer)

    def hold(self, reservation: Any, buyer: Any) -> GetHold | AnyReply:
        error = self._hold_names(reservation, buyer)
        if error:
            return HoldReply(INVALID, error=error)
        return GetHold(reservation, buyer)

    def stock(self, sku: Any) -> Stock | AnyReply:
        error = self._name(sku, "sku")
        if error:
            return StockReply(INVALID, error=error)
        return Stock(sku)

    def get_sku(self, sku: Any) -> GetSku | AnyReply:
        error = self._name(sku, "sku")
        if error:
            return SkuReply(INVALID, error=error)
        return GetSku(sku)

    def put_sku(
        self,
        sku: Any,
        *,
        stock: Any = UNCHANGED,
        per_buyer_limit: Any = UNCHANGED,
        hold_seconds: Any = UNCHANGED,
        opens_at: Any = UNCHANGED,
        closes_at: Any = UNCHANGED,
        registration_required: Any = UNCHANGED,
    ) -> PutSku | Reply:
        """The settings given, each checked alone; those that depend on the SKU's state are the book's."""
        error = self.put_sku_error(
            sku, stock, per_buyer_limit, hold_seconds, opens_at, closes_at, registration_required
        )
        if error:
            return Reply(INVALID, error=error)
        return PutSku(sku, stock, per_buyer_limit, hold_seconds, opens_at, closes_at, registration_required)

    def put_sku_error(
        self,
        sku: Any,
        stock: Any = UNCHANGED,
        per_buyer_limit: Any = UNCHANGED,
        hold_seconds: Any = UNCHANGED,
        opens_at: Any = UNCHANGED,
        closes_at: Any = UNCHANGED,
        registration_required: Any = UNCHANGED,
    ) -> str | None:
        error = self._name(sku, "sku")
        if error:
            return error
        stock_max = self._stock_max
        if stock is not UNCHANGED and (type(stock) is not int or not 0 <= stock <= stock_max):
            return f"stock must be an integer from 0 to {stock_max}"
        if per_buyer_limit is not UNCHANGED and (
            type(per_buyer_limit) is not int or not 1 <= per_buyer_limit <= stock_max
        ):
            return f"per_buyer_limit must be an integer from 1 to {stock_max}"
        if hold_seconds is not UNCHANGED and (
            not is_epoch_seconds(hold_seconds) or not 0 < hold_seconds <= HOLD_SECONDS_MAX
        ):
            return "hold_seconds must be a number of seconds above 0 and at most a year"
        if opens_at is not UNCHANGED and opens_at is not None and not is_epoch_seconds(opens_at):
            return "opens_at must be epoch seconds or null"
        if closes_at is not UNCHANGED and closes_at is not None and not is_epoch_seconds(closes_at):
            return "closes_at must be epoch seconds or null"
        # Given both, the window is checked here; with one of them left out, by the book.
        if type(opens_at) in (int, float) and type(closes_at) in (int, float) and closes_at <= opens_at:
            return "closes_at must be after opens_at"
        if registration_required is not UNCHANGED and type(registration_required) is not bool:
            return "registration_required must be true or false"
        return None

    def register(self, sku: Any, buyers: Any, *, bounded: bool = True) -> Register | RegisterReply:
        """Register `buyers` (a list) for `sku`; unbounded only for the API, which sends it in parts."""
        error = self._name(sku, "sku")
        if error:
            return RegisterReply(INVALID, error=error)
        if bounded and (type(buyers) not in (list, tuple) or len(buyers) > self._register_buyers_max):
            return RegisterReply(INVALID, error=f"buyers must be a list of at most {self._register_buyers_max} buyers")
        if not bounded and (isinstance(buyers, (str, bytes)) or not isinstance(buyers, Iterable)):
            return RegisterReply(INVALID, error="buyers must be a list of buyer ids")
        buyers = list(buyers)
        for buyer in buyers:
            error = self._name(buyer, "buyer")
            if error:
                return RegisterReply(INVALID, error=error)
        return Register(sku, buyers)

    def check_all(self, commands: Iterable[object]) -> list[Command | AnyReply]:
        """`check` of each command, with the common reserve's check inlined (a batch may hold
        thousands): the same predicate as `plain_reserve`, which the tests hold it to."""
        names_max = self._string_bytes_max
        qty_max = self._qty_max
        check = self.check
        checked: list[Command | AnyReply] = []
        append = checked.append
        for command in commands:
            if type(command) is Reserve:
                sku = command.sku
                buyer = command.buyer
                qty = command.qty
                key = command.key
                if (
                    type(sku) is str
                    and sku.isascii()
                    and 0 < len(sku) <= names_max
                    and type(buyer) is str
                    and buyer.isascii()
                    and 0 < len(buyer) <= names_max
                    and type(qty) is int
                    and 0 < qty <= qty_max
                    and (key is None or (type(key) is str and key.isascii() and 0 < len(key) <= names_max))
                ):
                    append(command)
                    continue
            append(check(command))
        return checked

    def check(self, command: object) -> Command | AnyReply:
        """A command built by hand (any values in its fields) as a valid command, or its invalid reply."""
        kind = type(command)
        if kind is Reserve:
            sku, buyer, qty, key = command.sku, command.buyer, command.qty, command.key  # type: ignore[union-attr]
            return command if self.plain_reserve(sku, buyer, qty, key) else self.reserve(sku, buyer, qty, key)  # type: ignore[return-value]
        if kind is Confirm:
            return self.confirm(command.reservation, command.buyer, command.order)  # type: ignore[union-attr]
        if kind is Cancel:
            return self.cancel(command.reservation, command.buyer)  # type: ignore[union-attr]
        if kind is GetHold:
            return self.hold(command.reservation, command.buyer)  # type: ignore[union-attr]
        if kind is Stock:
            return self.stock(command.sku)  # type: ignore[union-attr]
        if kind is GetSku:
            return self.get_sku(command.sku)  # type: ignore[union-attr]
        if kind is Register:
            return self.register(command.sku, command.buyers)  # type: ignore[union-attr]
        if kind is PutSku:
            settings = {name: getattr(command, name) for name in PUT_SKU_SETTINGS}
            return self.put_sku(command.sku, **settings)  # type: ignore[union-attr]
        return Reply(INVALID, error=f"{kind.__name__} is not a command")
