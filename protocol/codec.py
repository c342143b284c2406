"""The wire codec of protocol v1 (see protocol/SPEC.md): bytes in, requests out; replies in, bytes out.

Sans-IO: no sockets, no trio, no clock. The gateway feeds `ServerCodec.decode` the payload
of each binary websocket message and gets a `Frame` of `Request`s back; it answers each
request with `reply_map` and turns the frame's replies into one payload with `encode`.
The client does the mirror image with `ClientCodec`.

Two kinds of error, as in h11 and wsproto: `RemoteProtocolError` when the peer broke the
protocol badly enough that the connection must close (it carries the close code), and
`LocalProtocolError` when the caller misused the codec. Everything else a hostile peer
can send — bytes that are not msgpack, wrong shapes, unknown ops and fields — decodes
into requests whose `error` says what is wrong, so every one still gets its reply.

Field values are passed through as given: the book validates them and answers
`invalid`. The codec checks only the frame's shape, the ids, the ops and the field names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any, Final

import msgpack

from protocol.limits import Limits
from protocol.messages import (
    BUSY,
    CLOSED,
    CONFLICT,
    EXPIRED,
    FORBIDDEN,
    INVALID,
    LIMIT_EXCEEDED,
    NOT_FOUND,
    NOT_OPEN,
    NOT_REGISTERED,
    OK,
    SOLD_OUT,
    UNAVAILABLE,
    UNCHANGED,
    UNKNOWN_SKU,
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
)

PROTOCOL_VERSION: Final = "v1"

# Websocket close codes (RFC 6455, section 7.4.1).
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INVALID_PAYLOAD: Final = 1007

FRONTEND_OPS: Final = frozenset({"reserve", "confirm", "cancel", "hold", "stock", "ping"})
ADMIN_OPS: Final = frozenset({"put_sku", "get_sku", "register", "stats"})
OPS: Final = FRONTEND_OPS | ADMIN_OPS

REPLY_STATUSES: Final = frozenset(
    {
        OK,
        SOLD_OUT,
        LIMIT_EXCEEDED,
        NOT_OPEN,
        CLOSED,
        UNKNOWN_SKU,
        NOT_REGISTERED,
        INVALID,
        BUSY,
        EXPIRED,
        NOT_FOUND,
        CONFLICT,
        FORBIDDEN,
        UNAVAILABLE,
    }
)

# Ids are signed 64-bit integers, so that a client in any language can hold them.
ID_MIN: Final = -(2**63)
ID_MAX: Final = 2**63 - 1
# Anything of the peer's that an error message quotes is cut to this many characters.
ECHO_CHARS_MAX: Final = 64


class RemoteProtocolError(Exception):
    """The peer broke the protocol; the connection closes with `close_code`."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


class LocalProtocolError(Exception):
    """The caller misused the codec (a bug on this side, never the peer's doing)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a frame. `error` set means: answer `invalid` with that error.

    `id` is None when the map had no valid integer id; `op` is None unless it is a known
    op; `command` is None for ping, stats and every request with an error.
    """

    id: int | None
    op: str | None
    command: Command | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """The requests of one websocket message; `batch` frames are answered with an array."""

    requests: tuple[Request, ...]
    batch: bool


# --------------------------------------------------------------------------- building
# A frozen dataclass's __init__ sets each field through object.__setattr__, which costs
# far more than the slot descriptor's own setter, and the gateway builds two objects per
# request at up to 500,000 requests per second: building them through the descriptors
# takes a quarter off the instructions of decoding a reserve. `_slot_setters` checks at
# import that they set every field, in order.

_new = object.__new__


def _slot_setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    declared = tuple(field.name for field in dataclass_fields(cls))
    if declared != names:
        raise ImportError(f"the codec builds {cls.__name__} from {names}, but its fields are {declared}")
    return tuple(getattr(cls, name).__set__ for name in names)


_SET_REQUEST_ID, _SET_REQUEST_OP, _SET_REQUEST_COMMAND, _SET_REQUEST_ERROR = _slot_setters(
    Request, "id", "op", "command", "error"
)
_SET_RESERVE_SKU, _SET_RESERVE_BUYER, _SET_RESERVE_QTY, _SET_RESERVE_KEY = _slot_setters(
    Reserve, "sku", "buyer", "qty", "key"
)
_SET_CANCEL_RESERVATION, _SET_CANCEL_BUYER = _slot_setters(Cancel, "reservation", "buyer")


def _request(request_id: int | None, op: str | None, command: Command | None, error: str | None) -> Request:
    request = _new(Request)
    _SET_REQUEST_ID(request, request_id)
    _SET_REQUEST_OP(request, op)
    _SET_REQUEST_COMMAND(request, command)
    _SET_REQUEST_ERROR(request, error)
    return request


# A builder turns the map of a request whose id and op are valid into its Request, or
# returns None when the map's field names are wrong (then `_request_error` says how).
# The map is known to hold "id" and "op", so a count of its entries and a lookup of
# each required field prove that it holds exactly the allowed names.
Builder = Callable[[int, str, dict[Any, Any]], Request | None]


def _build_reserve(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
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
    command = _new(Reserve)
    _SET_RESERVE_SKU(command, sku)
    _SET_RESERVE_BUYER(command, buyer)
    _SET_RESERVE_QTY(command, qty)
    _SET_RESERVE_KEY(command, key)
    # `_request`, inlined: this is the hottest line of the protocol.
    request = _new(Request)
    _SET_REQUEST_ID(request, request_id)
    _SET_REQUEST_OP(request, op)
    _SET_REQUEST_COMMAND(request, command)
    _SET_REQUEST_ERROR(request, None)
    return request


def _build_confirm(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
    count = len(fields)
    if count == 4:
        order = None
    elif count == 5 and "order" in fields:
        order = fields["order"]
    else:
        return None
    if "reservation" not in fields or "buyer" not in fields:
        return None
    return _request(request_id, op, Confirm(fields["reservation"], fields["buyer"], order), None)


def _build_cancel(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
    if len(fields) != 4 or "reservation" not in fields or "buyer" not in fields:
        return None
    command = _new(Cancel)
    _SET_CANCEL_RESERVATION(command, fields["reservation"])
    _SET_CANCEL_BUYER(command, fields["buyer"])
    return _request(request_id, op, command, None)


def _build_stock(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
    if len(fields) != 3 or "sku" not in fields:
        return None
    return _request(request_id, op, Stock(fields["sku"]), None)


def _build_without_fields(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
    if len(fields) != 2:
        return None
    return _request(request_id, op, None, None)


def _build_put_sku(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
    if "sku" not in fields or not fields.keys() <= _PUT_SKU_FIELDS:
        return None
    # A field left out keeps the SKU's current value; null is a value (it clears a time).
    command = PutSku(
        fields["sku"],
        fields.get("stock", UNCHANGED),
        fields.get("per_buyer_limit", UNCHANGED),
        fields.get("hold_seconds", UNCHANGED),
        fields.get("opens_at", UNCHANGED),
        fields.get("closes_at", UNCHANGED),
        fields.get("registration_required", UNCHANGED),
    )
    return _request(request_id, op, command, None)


def _build_get_sku(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
    if len(fields) != 3 or "sku" not in fields:
        return None
    return _request(request_id, op, GetSku(fields["sku"]), None)


def _build_hold(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
    if len(fields) != 4 or "reservation" not in fields or "buyer" not in fields:
        return None
    return _request(request_id, op, GetHold(fields["reservation"], fields["buyer"]), None)


def _build_register(request_id: int, op: str, fields: dict[Any, Any]) -> Request | None:
    if len(fields) != 4 or "sku" not in fields or "buyers" not in fields:
        return None
    return _request(request_id, op, Register(fields["sku"], fields["buyers"]), None)


@dataclass(frozen=True, slots=True)
class _Operation:
    required: tuple[str, ...]  # in the order a missing one is reported
    optional: tuple[str, ...]
    build: Builder


# The fields of each op, besides the "id" and "op" that every request holds.
_OPERATIONS: Final[dict[str, _Operation]] = {
    "reserve": _Operation(("sku", "buyer", "qty"), ("key",), _build_reserve),
    "confirm": _Operation(("reservation", "buyer"), ("order",), _build_confirm),
    "cancel": _Operation(("reservation", "buyer"), (), _build_cancel),
    "hold": _Operation(("reservation", "buyer"), (), _build_hold),
    "stock": _Operation(("sku",), (), _build_stock),
    "ping": _Operation((), (), _build_without_fields),
    "put_sku": _Operation(
        ("sku",),
        ("stock", "per_buyer_limit", "hold_seconds", "opens_at", "closes_at", "registration_required"),
        _build_put_sku,
    ),
    "get_sku": _Operation(("sku",), (), _build_get_sku),
    "register": _Operation(("sku", "buyers"), (), _build_register),
    "stats": _Operation((), (), _build_without_fields),
}
assert frozenset(_OPERATIONS) == OPS
_PUT_SKU_FIELDS: Final = frozenset({"id", "op", *_OPERATIONS["put_sku"].required, *_OPERATIONS["put_sku"].optional})
_SKU_REPLY_FIELDS: Final = (
    "sku",
    "stock",
    "available",
    "held",
    "sold",
    "per_buyer_limit",
    "hold_seconds",
    "opens_at",
    "closes_at",
    "registration_required",
    "registered",
    "open",
)
_HOLD_REPLY_FIELDS: Final = ("sku", "qty", "state", "expires_at", "order")
_REPLY_TYPES: Final = frozenset({Reply, StockReply, RegisterReply, SkuReply, HoldReply})
_BUILDERS: Final[dict[str, Builder]] = {op: operation.build for op, operation in _OPERATIONS.items()}


def _clip(value: object) -> str:
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
    return text


def _decode_request(fields: dict[Any, Any]) -> Request:
    """One request map, well formed or not, as a Request; never raises."""
    request_id = fields.get("id")
    op = fields.get("op")
    build = _BUILDERS.get(op) if type(op) is str else None
    if build is None:
        op = None
    if type(request_id) is int and ID_MIN <= request_id <= ID_MAX:
        if build is not None:
            request = build(request_id, op, fields)
            if request is not None:
                return request
    else:
        request_id = None
    return _request(request_id, op, None, _request_error(fields))


def _request_error(fields: dict[Any, Any]) -> str:
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
    operation = _OPERATIONS.get(op)
    if operation is None:
        return f"unknown op: {_clip(op)}"
    for name in fields:
        if type(name) is not str:
            return f"field names must be strings, not {_clip(name)}"
        if name != "id" and name != "op" and name not in operation.required and name not in operation.optional:
            return f"unknown field: {_clip(name)}"
    for name in operation.required:
        if name not in fields:
            return f"missing field: {name}"
    raise AssertionError(f"no error found in a request its builder refused: {[_clip(name) for name in fields]}")


def _malformed(error: str) -> Frame:
    return Frame((_request(None, None, None, error),), batch=False)


def _pack(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise LocalProtocolError(f"cannot encode as msgpack: {error}") from error


# -------------------------------------------------------------------------- the server


class ServerCodec:
    """The server's half: payloads to frames of requests, replies to payloads."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._frame_bytes_max = limits.frame_bytes_max
        self._batch_requests_max = limits.batch_requests_max

    def decode(self, payload: bytes) -> Frame:
        """The frame in `payload`. Raises RemoteProtocolError (1009) only for an oversize frame."""
        size = len(payload)
        if size > self._frame_bytes_max:
            raise RemoteProtocolError(
                f"frame of {size} bytes is over the limit of {self._frame_bytes_max} bytes", CLOSE_MESSAGE_TOO_BIG
            )
        batch_error = self._batch_header_error(payload)
        if batch_error is not None:
            return _malformed(batch_error)
        # unpackb bounds every length header by len(payload), itself within the frame
        # bound, so a lying header allocates nothing; nesting stops at msgpack's stack.
        try:
            message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as error:
            # msgpack documents no single base class: hostile bytes raise ExtraData,
            # FormatError, StackError, ValueError, TypeError (a map key that is an
            # array), UnicodeDecodeError... All mean the payload is not a readable value.
            # A non-string map key is let through, to be one request's error.
            detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            return _malformed(f"payload is not valid msgpack: {_clip(detail)}")
        kind = type(message)
        if kind is dict:
            return Frame((_decode_request(message),), batch=False)
        if kind is not list:
            return _malformed("payload must be a map or an array of maps")
        count = len(message)
        if count == 0:
            return _malformed("a batch must hold at least one request")
        if count > self._batch_requests_max:
            return _malformed(f"a batch of {count} requests is over the limit of {self._batch_requests_max}")
        requests = []
        append = requests.append
        for fields in message:
            if type(fields) is not dict:
                return _malformed("every element of a batch must be a map")
            append(_decode_request(fields))
        return Frame(tuple(requests), batch=True)

    def _batch_header_error(self, payload: bytes) -> str | None:
        """Refuse a batch over the bound from its header alone, before decoding any of it."""
        if len(payload) >= 3 and payload[0] == 0xDC:  # array 16
            count = int.from_bytes(payload[1:3], "big")
        elif len(payload) >= 5 and payload[0] == 0xDD:  # array 32
            count = int.from_bytes(payload[1:5], "big")
        else:
            return None
        if count > self._batch_requests_max:
            return f"a batch of {count} requests is over the limit of {self._batch_requests_max}"
        return None

    def reply_map(self, request: Request, reply: AnyReply | None = None, **extra: Any) -> dict[str, Any]:
        """The reply map for `request`: its id, a status, and the reply's fields.

        With `reply`, its status and every field it set; without, `invalid` and the
        request's error when it has one. `extra` adds fields or overrides them (the
        gateway's `status="forbidden"`, `status="busy"`, `stats={...}`).
        """
        if reply is not None:
            kind = type(reply)
            if kind not in _REPLY_TYPES:
                raise LocalProtocolError(f"not a reply type of protocol v1: {kind.__name__}")
            answer: dict[str, Any] = {"id": request.id, "status": reply.status}
            if kind is Reply:
                if reply.reservation is not None:
                    answer["reservation"] = reply.reservation
                if reply.expires_at is not None:
                    answer["expires_at"] = float(reply.expires_at)
                if reply.remaining is not None:
                    answer["remaining"] = reply.remaining
            elif kind is StockReply:
                if reply.stock is not None:
                    answer["stock"] = reply.stock
                if reply.available is not None:
                    answer["available"] = reply.available
                if reply.held is not None:
                    answer["held"] = reply.held
                if reply.sold is not None:
                    answer["sold"] = reply.sold
            elif kind is RegisterReply:
                if reply.registered is not None:
                    answer["registered"] = reply.registered
                    answer["already"] = reply.already
            elif reply.status == OK:  # get_sku and hold: every field, null ones too
                for name in _SKU_REPLY_FIELDS if kind is SkuReply else _HOLD_REPLY_FIELDS:
                    answer[name] = getattr(reply, name)
                if kind is HoldReply:
                    answer["expires_at"] = float(reply.expires_at)  # type: ignore[union-attr, arg-type]
            if reply.error is not None:
                answer["error"] = reply.error
        elif request.error is not None:
            answer = {"id": request.id, "status": INVALID, "error": request.error}
        else:
            answer = {"id": request.id}
        if extra:
            if "id" in extra:
                raise LocalProtocolError("a reply's id is the request's id")
            answer.update(extra)
        status = answer.get("status")
        if type(status) is not str or status not in REPLY_STATUSES:
            raise LocalProtocolError(f"a reply needs one of the protocol's statuses, not {status!r}")
        return answer

    def encode(self, frame: Frame, replies: Sequence[dict[str, Any]]) -> bytes:
        """The payload that answers `frame`: one map, or for a batch an array in request order."""
        if len(replies) != len(frame.requests):
            raise LocalProtocolError(f"{len(replies)} replies for a frame of {len(frame.requests)} requests")
        if frame.batch:
            return _pack(replies if type(replies) in (list, tuple) else list(replies))
        return _pack(replies[0])


# -------------------------------------------------------------------------- the client


class ClientCodec:
    """The client's half: request maps to payloads, payloads to reply maps."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()

    def encode_request(self, request: Mapping[str, Any]) -> bytes:
        """The payload of a frame holding one request map (see `request_map`)."""
        _check_request(request)
        return self._checked(_pack(request))

    def encode_batch(self, requests: Sequence[Mapping[str, Any]]) -> bytes:
        """The payload of a batch frame: an array of request maps, answered in order."""
        count = len(requests)
        if not 1 <= count <= self.limits.batch_requests_max:
            raise LocalProtocolError(f"a batch holds 1 to {self.limits.batch_requests_max} requests, not {count}")
        for request in requests:
            _check_request(request)
        return self._checked(_pack(requests if type(requests) in (list, tuple) else list(requests)))

    def encode_requests(self, requests: Sequence[Mapping[str, Any]]) -> bytes:
        """One map for one request, a batch for more."""
        if len(requests) == 1:
            return self.encode_request(requests[0])
        return self.encode_batch(requests)

    def _checked(self, payload: bytes) -> bytes:
        if len(payload) > self.limits.frame_bytes_max:
            raise LocalProtocolError(
                f"a frame of {len(payload)} bytes is over the limit of {self.limits.frame_bytes_max} bytes"
            )
        return payload

    def decode_replies(self, payload: bytes) -> list[dict[str, Any]]:
        """The reply maps in a frame from the server, in order. RemoteProtocolError on garbage."""
        try:
            message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as error:  # every way msgpack refuses bytes; see ServerCodec.decode
            raise RemoteProtocolError(
                f"reply frame is not valid msgpack: {_clip(str(error))}", CLOSE_INVALID_PAYLOAD
            ) from error
        if type(message) is dict:
            replies = [message]
        elif type(message) is list and message:
            replies = message
        else:
            raise RemoteProtocolError("a reply frame must be a map or a non-empty array of maps", CLOSE_INVALID_PAYLOAD)
        for reply in replies:
            if type(reply) is not dict or type(reply.get("status")) is not str:
                raise RemoteProtocolError(f"not a reply map: {_clip(reply)}", CLOSE_INVALID_PAYLOAD)
            if "id" not in reply or (reply["id"] is not None and type(reply["id"]) is not int):
                raise RemoteProtocolError(
                    f"a reply's id must be an integer or null: {_clip(reply)}", CLOSE_INVALID_PAYLOAD
                )
        return replies


def _check_request(request: Mapping[str, Any]) -> None:
    """The checks that let the server match the reply to the request; values are the book's to judge."""
    if type(request) is not dict and not isinstance(request, Mapping):
        raise LocalProtocolError(f"a request is a map, not {type(request).__name__}")
    request_id = request.get("id")
    if type(request_id) is not int or not ID_MIN <= request_id <= ID_MAX:
        raise LocalProtocolError(f"a request needs an integer id within signed 64 bits, not {_clip(request_id)}")
    op = request.get("op")
    if type(op) is not str or op not in OPS:
        raise LocalProtocolError(f"unknown op {_clip(op)}")


def request_map(request_id: int, command: Command) -> dict[str, Any]:
    """The wire map of `command` (its op and fields) under `request_id`."""
    kind = type(command)
    if kind is Reserve:
        fields = {"id": request_id, "op": "reserve", "sku": command.sku, "buyer": command.buyer, "qty": command.qty}
        if command.key is not None:
            fields["key"] = command.key
        return fields
    if kind is Confirm:
        fields = {"id": request_id, "op": "confirm", "reservation": command.reservation, "buyer": command.buyer}
        if command.order is not None:
            fields["order"] = command.order
        return fields
    if kind is Cancel or kind is GetHold:
        op = "cancel" if kind is Cancel else "hold"
        return {"id": request_id, "op": op, "reservation": command.reservation, "buyer": command.buyer}
    if kind is Stock or kind is GetSku:
        return {"id": request_id, "op": "stock" if kind is Stock else "get_sku", "sku": command.sku}
    if kind is PutSku:
        fields = {"id": request_id, "op": "put_sku", "sku": command.sku}
        # A field left UNCHANGED is left out of the map: the server keeps its value.
        for name in _OPERATIONS["put_sku"].optional:
            value = getattr(command, name)
            if value is not UNCHANGED:
                fields[name] = value
        return fields
    if kind is Register:
        return {"id": request_id, "op": "register", "sku": command.sku, "buyers": command.buyers}
    raise LocalProtocolError(f"not a command: {kind.__name__}")


def reply_from_map(op: str, reply: Mapping[str, Any]) -> AnyReply:
    """The in-process reply (what `Engine` returns) that a reply map to an `op` request stands for."""
    status = reply["status"]
    if op == "stock":
        return StockReply(
            status, reply.get("stock"), reply.get("available"), reply.get("held"), reply.get("sold"), reply.get("error")
        )
    if op == "register":
        return RegisterReply(status, reply.get("registered"), reply.get("already"), reply.get("error"))
    if op == "get_sku":
        return SkuReply(status, **{name: reply.get(name) for name in _SKU_REPLY_FIELDS}, error=reply.get("error"))
    if op == "hold":
        return HoldReply(status, **{name: reply.get(name) for name in _HOLD_REPLY_FIELDS}, error=reply.get("error"))
    if op not in OPS:
        raise LocalProtocolError(f"unknown op {op!r:.80}")
    return Reply(status, reply.get("reservation"), reply.get("expires_at"), reply.get("remaining"), reply.get("error"))
