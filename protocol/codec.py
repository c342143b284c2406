"""The wire codec of protocol v1 (see protocol/SPEC.md): bytes in, commands out; replies in, bytes out.

Sans-IO: no sockets, no trio, no clock. The gateway feeds `ServerCodec.decode` the payload
of each binary websocket message and gets a `Frame` back: the requests' ids, ops and
commands as parallel lists (each map goes through `protocol.parser`, so a command that
comes out is valid; a request that is not gets its reply there already). It turns the
replies the engine returns into one payload with `encode`, without a map per reply.
The client does the mirror image with `ClientCodec`.

Two kinds of error, as in h11 and wsproto: `RemoteProtocolError` when the peer broke the
protocol badly enough that the connection must close (it carries the close code), and
`LocalProtocolError` when the caller misused the codec. Everything else a hostile peer
can send — bytes that are not msgpack, wrong shapes, unknown ops and fields, bad values —
decodes into requests answered `invalid` with what is wrong, so every one gets its reply.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import is_
from typing import Any, Final

import msgpack

from protocol.limits import ID_MAX, ID_MIN, Limits
from protocol.messages import (
    INVALID,
    OK,
    REPLY_TYPES,
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
    StatsReply,
    Status,
    Stock,
    StockReply,
)
from protocol.parser import ADMIN_OPS, FRONTEND_OPS, OPS, PUT_SKU_SETTINGS, CommandParser, clip
from protocol.reserve_frames import ReserveFrameDecoder

__all__ = [
    "ADMIN_OPS",
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_MESSAGE_TOO_BIG",
    "FRONTEND_OPS",
    "OPS",
    "PROTOCOL_VERSION",
    "REPLY_STATUSES",
    "ClientCodec",
    "Frame",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ServerCodec",
    "reply_from_map",
    "request_map",
]

PROTOCOL_VERSION: Final = "v1"

# Websocket close codes (RFC 6455, section 7.4.1).
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INVALID_PAYLOAD: Final = 1007

REPLY_STATUSES: Final = frozenset(Status)


class RemoteProtocolError(Exception):
    """The peer broke the protocol; the connection closes with `close_code`."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


class LocalProtocolError(Exception):
    """The caller misused the codec (a bug on this side, never the peer's doing)."""


Item = Command | Stats | AnyReply


@dataclass(slots=True)
class Frame:
    """The requests of one websocket message, as parallel lists; `batch` frames are answered with an array.

    `ids[i]` is None when request i had no valid id; `ops[i]` None unless its op is
    known; `commands[i]` is its command, or the reply already decided for it (invalid,
    forbidden, ping). `stats` counts the stats requests, which only the gateway answers.
    """

    ids: list[int | None]
    ops: list[str | None]
    commands: list[Item]
    batch: bool
    stats: int = 0

    def __len__(self) -> int:
        return len(self.ids)


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
    "shard",
)
_HOLD_REPLY_FIELDS: Final = ("sku", "qty", "state", "expires_at", "order")
_STOCK_REPLY_FIELDS: Final = ("stock", "available", "held", "sold")


def _malformed(error: str) -> Frame:
    return Frame([None], [None], [Reply(INVALID, error=error)], batch=False)


def _pack(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise LocalProtocolError(f"cannot encode as msgpack: {error}") from error


# -------------------------------------------------------------------------- the server

# A reply map's first bytes: a fixmap header of 2 (id, status), then the key "id".
_PACK = msgpack.Packer(use_bin_type=True).pack
_ID_KEY: Final = _PACK("id")
_MAP_OF_TWO: Final = b"\x82" + _ID_KEY
# The rest of a reply that is its status alone ("status": "sold_out"), per status.
_STATUS_TAILS: Final = {status: _PACK("status") + _PACK(status.value) for status in Status}
# An `ok` reserve's map: a fixmap header of 5, "id", and the names of its last three fields.
_MAP_OF_FIVE: Final = b"\x85" + _ID_KEY
_HOLD_HEADS: Final = {status: tail + _PACK("reservation") for status, tail in _STATUS_TAILS.items()}
# expires_at is a float64 (0xcb, then 8 bytes big-endian), as msgpack writes every float here.
_EXPIRES_AT_KEY: Final = _PACK("expires_at") + b"\xcb"
_DOUBLE: Final = struct.Struct(">d")
_REMAINING_KEY: Final = _PACK("remaining")


def _status_tail(reply: AnyReply) -> bytes:
    """The bytes after the id of a reply that is its status alone; empty for any other reply."""
    if (
        type(reply) is Reply
        and reply.reservation is None
        and reply.error is None
        and reply.remaining is None
        and reply.expires_at is None
    ):
        return _STATUS_TAILS.get(reply.status, b"")
    return b""


_REPLY_TYPES: Final = frozenset(REPLY_TYPES)
# Is no reply.
_NO_REPLY: Final = object()


def _reply_map(request_id: int | None, reply: AnyReply) -> dict[str, Any]:
    """The reply map of a reply that is more than its status."""
    kind = type(reply)
    if kind not in _REPLY_TYPES:
        raise LocalProtocolError(f"not a reply type of protocol v1: {kind.__name__}")
    answer: dict[str, Any] = {"id": request_id, "status": reply.status}
    if kind is Reply:
        if reply.reservation is not None:
            answer["reservation"] = reply.reservation
        if reply.expires_at is not None:
            answer["expires_at"] = float(reply.expires_at)
        if reply.remaining is not None:
            answer["remaining"] = reply.remaining
    elif kind is StockReply:
        for name in _STOCK_REPLY_FIELDS:
            value = getattr(reply, name)
            if value is not None:
                answer[name] = value
    elif kind is RegisterReply:
        if reply.registered is not None:
            answer["registered"] = reply.registered
            answer["already"] = reply.already
    elif kind is StatsReply:
        if reply.stats is not None:
            answer["stats"] = reply.stats
    elif reply.status == OK:  # get_sku and hold: every field, null ones too
        for name in _SKU_REPLY_FIELDS if kind is SkuReply else _HOLD_REPLY_FIELDS:
            answer[name] = getattr(reply, name)
        if kind is HoldReply:
            answer["expires_at"] = float(reply.expires_at)  # type: ignore[union-attr, arg-type]
            answer["state"] = str(reply.state)  # type: ignore[union-attr]
    if reply.error is not None:
        answer["error"] = reply.error
    if reply.status not in _STATUS_TAILS:
        raise LocalProtocolError(f"a reply needs one of the protocol's statuses, not {reply.status!r}")
    return answer


class ServerCodec:
    """The server's half: payloads to frames, replies to payloads.

    `admin`: the connection's token may use the admin ops; without it they are answered
    `forbidden` (a request that is malformed is still answered `invalid` first).
    """

    def __init__(self, limits: Limits, *, admin: bool = True) -> None:
        self.limits = limits
        self.admin = admin
        self.parser = CommandParser(limits)
        self._reserve_frames = ReserveFrameDecoder(limits.string_bytes_max, limits.qty_max, limits.batch_requests_max)
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
        # A crowd's frame (reserves alone, all valid) in one C pass; any other the general
        # way, which gives every request its reply. Both make the same frame of a payload.
        reserves = self._reserve_frames.decode(payload)
        if reserves is not None:
            ids, commands, batch = reserves
            return Frame(ids, ["reserve"] * len(ids), commands, batch=batch)  # type: ignore[arg-type]
        return self._decode_maps(payload)

    def _decode_maps(self, payload: bytes) -> Frame:
        """Any payload within the bounds, as maps that the parser makes commands or replies of."""
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
            return _malformed(f"payload is not valid msgpack: {clip(detail)}")
        kind = type(message)
        parse = self.parser.request
        admin = self.admin
        if kind is dict:
            request_id, op, command = parse(message, admin)
            return Frame([request_id], [op], [command], batch=False, stats=type(command) is Stats)
        if kind is not list:
            return _malformed("payload must be a map or an array of maps")
        count = len(message)
        if count == 0:
            return _malformed("a batch must hold at least one request")
        if count > self._batch_requests_max:
            return _malformed(f"a batch of {count} requests is over the limit of {self._batch_requests_max}")
        parsed = self.parser.requests(message, admin)
        if parsed is None:
            return _malformed("every element of a batch must be a map")
        ids, ops, commands, stats = parsed
        return Frame(ids, ops, commands, batch=True, stats=stats)

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

    def encode(self, frame: Frame, replies: Sequence[AnyReply]) -> bytes:
        """The payload that answers `frame`: one map, or for a batch an array in request order.

        A reply that is its status alone (most of a flash sale's: sold_out) is written
        from bytes made once per status, and an `ok` reserve's from bytes made once per
        field name; the rest through a map each. The bytes are those of packing the map.
        """
        ids = frame.ids
        count = len(ids)
        if len(replies) != count:
            raise LocalProtocolError(f"{len(replies)} replies for a frame of {count} requests")
        pack = _PACK
        pack_double = _DOUBLE.pack
        tails = _STATUS_TAILS
        hold_heads = _HOLD_HEADS
        parts: list[bytes] = []
        append = parts.append
        if frame.batch:
            append(b"\xdc" + count.to_bytes(2, "big") if count < 65536 else b"\xdd" + count.to_bytes(4, "big"))
        # The last reply written as its status alone, and its bytes: the book answers
        # every refusal of a kind with the same reply object.
        alike: object = _NO_REPLY
        alike_tail = b""
        try:
            first = replies[0] if count else None
            if count > 1 and all(map(is_, replies, repeat(first))):
                alike_tail = _status_tail(first)  # type: ignore[arg-type]
                if alike_tail:
                    # One answer for the whole frame: the maps differ by their ids alone.
                    append(_MAP_OF_TWO)
                    append((alike_tail + _MAP_OF_TWO).join(map(pack, ids)))
                    append(alike_tail)
                    return b"".join(parts)
            for request_id, reply in zip(ids, replies):  # noqa: B905 (lengths checked above)
                if reply is alike:
                    append(_MAP_OF_TWO)
                    append(pack(request_id))
                    append(alike_tail)
                    continue
                if type(reply) is Reply and reply.error is None:
                    reservation = reply.reservation
                    if reservation is None:
                        if reply.remaining is None and reply.expires_at is None:
                            tail = tails.get(reply.status)
                            if tail is not None:
                                alike = reply
                                alike_tail = tail
                                append(_MAP_OF_TWO)
                                append(pack(request_id))
                                append(tail)
                                continue
                    elif reply.expires_at is not None and reply.remaining is not None:
                        head = hold_heads.get(reply.status)
                        if head is not None:
                            # A hold made: id, status, reservation, expires_at, remaining.
                            append(_MAP_OF_FIVE)
                            append(pack(request_id))
                            append(head)
                            append(pack(reservation))
                            append(_EXPIRES_AT_KEY)
                            append(pack_double(float(reply.expires_at)))
                            append(_REMAINING_KEY)
                            append(pack(reply.remaining))
                            continue
                append(pack(_reply_map(request_id, reply)))
        except (TypeError, ValueError, OverflowError) as error:
            raise LocalProtocolError(f"cannot encode as msgpack: {error}") from error
        return b"".join(parts)


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
                f"reply frame is not valid msgpack: {clip(str(error))}", CLOSE_INVALID_PAYLOAD
            ) from error
        if type(message) is dict:
            replies = [message]
        elif type(message) is list and message:
            replies = message
        else:
            raise RemoteProtocolError("a reply frame must be a map or a non-empty array of maps", CLOSE_INVALID_PAYLOAD)
        for reply in replies:
            if type(reply) is not dict or type(reply.get("status")) is not str:
                raise RemoteProtocolError(f"not a reply map: {clip(reply)}", CLOSE_INVALID_PAYLOAD)
            if "id" not in reply or (reply["id"] is not None and type(reply["id"]) is not int):
                raise RemoteProtocolError(
                    f"a reply's id must be an integer or null: {clip(reply)}", CLOSE_INVALID_PAYLOAD
                )
        return replies


def _check_request(request: Mapping[str, Any]) -> None:
    """The checks that let the server match the reply to the request; values are the book's to judge."""
    if type(request) is not dict and not isinstance(request, Mapping):
        raise LocalProtocolError(f"a request is a map, not {type(request).__name__}")
    request_id = request.get("id")
    if type(request_id) is not int or not ID_MIN <= request_id <= ID_MAX:
        raise LocalProtocolError(f"a request needs an integer id within signed 64 bits, not {clip(request_id)}")
    op = request.get("op")
    if type(op) is not str or op not in OPS:
        raise LocalProtocolError(f"unknown op {clip(op)}")


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
        for name in PUT_SKU_SETTINGS:
            value = getattr(command, name)
            if value is not UNCHANGED:
                fields[name] = value
        return fields
    if kind is Register:
        return {"id": request_id, "op": "register", "sku": command.sku, "buyers": command.buyers}
    raise LocalProtocolError(f"not a command: {kind.__name__}")


_STATUS_OF: Final = {status.value: status for status in Status}


def reply_from_map(op: str, reply: Mapping[str, Any]) -> AnyReply:
    """The in-process reply (what `Engine` returns) that a reply map to an `op` request stands for."""
    status = _STATUS_OF.get(reply["status"], reply["status"])  # a status this client does not know stays text
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
