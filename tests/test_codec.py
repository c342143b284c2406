"""The codec alone, with no trio and no sockets: protocol v1 as protocol/SPEC.md states it.

Every op decodes to its command (through the one parser, which also answers bad values);
every malformed request and frame gets its `invalid` answer; the bounds hold; hostile
bytes and structures never make `decode` raise; replies survive the trip to the client
unchanged; and a client and a server codec wired together in memory talk to each other
through a tiny fake engine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import (
    ADMIN_OPS,
    FRONTEND_OPS,
    ClientCodec,
    Frame,
    LocalProtocolError,
    RemoteProtocolError,
    ServerCodec,
    reply_from_map,
    request_map,
)
from protocol.limits import Limits
from protocol.messages import (
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
    Stock,
    StockReply,
)
from protocol.parser import PING_REPLY, CommandParser

LIMITS = Limits()
SKU = "MI-BAND-1"
# No error message quotes more than this of what the peer sent.
ERROR_CHARS_MAX = 160
ID_MIN = -(2**63)
ID_MAX = 2**63 - 1

# The v1 request fields, as SPEC.md lists them: op -> (required, optional), besides id and op.
SPEC_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
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
STATUSES = (
    "ok",
    "sold_out",
    "limit_exceeded",
    "not_open",
    "closed",
    "unknown_sku",
    "not_registered",
    "invalid",
    "busy",
    "expired",
    "not_found",
    "conflict",
    "forbidden",
    "unavailable",
)


def server() -> ServerCodec:
    return ServerCodec(LIMITS)


@dataclass(frozen=True)
class Request:
    """One decoded request as these tests name it: `command` None for ping and stats,
    `error` set when the parser answered it invalid."""

    id: int | None
    op: str | None
    command: Command | None
    error: str | None = None


def requests_of(frame: Frame) -> tuple[Request, ...]:
    assert len(frame.ids) == len(frame.ops) == len(frame.commands)
    requests = []
    for request_id, op, item in zip(frame.ids, frame.ops, frame.commands, strict=True):
        if isinstance(item, REPLY_TYPES):
            assert item is PING_REPLY or item.status == "invalid", item
            error = None if item is PING_REPLY else item.error
            requests.append(Request(request_id, op, None, error))
        elif type(item) is Stats:
            requests.append(Request(request_id, op, None, None))
        else:
            requests.append(Request(request_id, op, item, None))  # type: ignore[arg-type]
    return tuple(requests)


def encode_requests(client: ClientCodec, maps: Sequence[dict[str, Any]]) -> bytes:
    """One map for one request, a batch for more."""
    return client.encode_request(maps[0]) if len(maps) == 1 else client.encode_batch(maps)


def decode(message: Any, limits: Limits = LIMITS) -> Frame:
    return ServerCodec(limits).decode(msgpack.packb(message))


def decode_one(message: dict[Any, Any]) -> Request:
    frame = decode(message)
    assert frame.batch is False
    (request,) = requests_of(frame)
    return request


def assert_malformed(frame: Frame, error_part: str) -> None:
    """The frame is answered by one `invalid` reply with id null."""
    assert frame.batch is False
    (request,) = requests_of(frame)
    assert request.id is None
    assert request.op is None
    assert request.command is None
    assert request.error is not None
    assert error_part in request.error, request.error
    assert len(request.error) <= ERROR_CHARS_MAX


def expected_command(op: str, fields: dict[str, Any]) -> Command | None:
    """The command SPEC.md says a valid request map stands for (None for ping and stats)."""
    if op == "reserve":
        return Reserve(fields["sku"], fields["buyer"], fields["qty"], fields.get("key"))
    if op == "confirm":
        return Confirm(fields["reservation"], fields["buyer"], fields.get("order"))
    if op == "cancel":
        return Cancel(fields["reservation"], fields["buyer"])
    if op == "hold":
        return GetHold(fields["reservation"], fields["buyer"])
    if op == "stock":
        return Stock(fields["sku"])
    if op == "get_sku":
        return GetSku(fields["sku"])
    if op == "put_sku":
        # A field left out is UNCHANGED: the SKU keeps its value; null is a value.
        return PutSku(
            fields["sku"],
            fields.get("stock", UNCHANGED),
            fields.get("per_buyer_limit", UNCHANGED),
            fields.get("hold_seconds", UNCHANGED),
            fields.get("opens_at", UNCHANGED),
            fields.get("closes_at", UNCHANGED),
            fields.get("registration_required", UNCHANGED),
        )
    if op == "register":
        return Register(fields["sku"], fields["buyers"])
    return None


# ------------------------------------------------------------------- every op decodes


@pytest.mark.parametrize(
    ("message", "command"),
    [
        (
            {"id": 1, "op": "reserve", "sku": SKU, "buyer": "u42", "qty": 2},
            Reserve(SKU, "u42", 2, None),
        ),
        (
            {"id": 2, "op": "reserve", "sku": SKU, "buyer": "u42", "qty": 1, "key": "k-1"},
            Reserve(SKU, "u42", 1, "k-1"),
        ),
        (
            {"id": 3, "op": "reserve", "sku": SKU, "buyer": "u42", "qty": 1, "key": None},
            Reserve(SKU, "u42", 1, None),
        ),
        ({"id": 4, "op": "confirm", "reservation": "3-17", "buyer": "u42"}, Confirm("3-17", "u42")),
        (
            {"id": 4, "op": "confirm", "reservation": "3-17", "buyer": "u42", "order": "po-9"},
            Confirm("3-17", "u42", "po-9"),
        ),
        ({"id": 4, "op": "hold", "reservation": "3-17", "buyer": "u42"}, GetHold("3-17", "u42")),
        ({"id": 6, "op": "get_sku", "sku": SKU}, GetSku(SKU)),
        ({"id": 5, "op": "cancel", "reservation": "3-17", "buyer": "u42"}, Cancel("3-17", "u42")),
        ({"id": 6, "op": "stock", "sku": SKU}, Stock(SKU)),
        ({"id": 7, "op": "put_sku", "sku": SKU, "stock": 10}, PutSku(SKU, 10)),
        ({"id": 7, "op": "put_sku", "sku": SKU, "per_buyer_limit": 2}, PutSku(SKU, per_buyer_limit=2)),
        ({"id": 7, "op": "put_sku", "sku": SKU, "opens_at": None}, PutSku(SKU, opens_at=None)),
        (
            {
                "id": 8,
                "op": "put_sku",
                "sku": SKU,
                "stock": 10,
                "per_buyer_limit": 3,
                "hold_seconds": 60.5,
                "opens_at": 1_700_000_000,
                "closes_at": 1_700_003_600.0,
                "registration_required": True,
            },
            PutSku(SKU, 10, 3, 60.5, 1_700_000_000, 1_700_003_600.0, True),
        ),
        (
            {"id": 9, "op": "put_sku", "sku": SKU, "stock": 0, "hold_seconds": 5},
            PutSku(SKU, 0, hold_seconds=5),
        ),
        ({"id": 10, "op": "register", "sku": SKU, "buyers": ["a", "b"]}, Register(SKU, ["a", "b"])),
    ],
)
def test_every_op_with_a_command_decodes_to_it(message: dict[str, Any], command: Command) -> None:
    request = decode_one(message)
    assert request == Request(message["id"], message["op"], command, None)
    assert type(request.command) is type(command)


@pytest.mark.parametrize("op", ["ping", "stats"])
def test_ping_and_stats_decode_without_a_command(op: str) -> None:
    assert decode_one({"id": 11, "op": op}) == Request(11, op, None, None)


def test_the_ops_are_split_into_frontend_and_admin() -> None:
    assert sorted(FRONTEND_OPS) == ["cancel", "confirm", "hold", "ping", "reserve", "stock"]
    assert sorted(ADMIN_OPS) == ["get_sku", "put_sku", "register", "stats"]
    assert not FRONTEND_OPS & ADMIN_OPS


def test_field_values_are_judged_by_the_parser_and_answered_invalid_naming_the_field() -> None:
    message = {"id": 1, "op": "reserve", "sku": 5, "buyer": ["x"], "qty": "two", "key": {"a": 1}}
    assert decode_one(message) == Request(1, "reserve", None, "sku must be a string")
    put = decode_one({"id": 2, "op": "put_sku", "sku": SKU, "stock": -1, "registration_required": "yes"})
    assert put == Request(2, "put_sku", None, "stock must be an integer from 0 to 1000000000")
    register = decode_one({"id": 3, "op": "register", "sku": SKU, "buyers": "ab"})
    assert register == Request(3, "register", None, "buyers must be a list of at most 10000 buyers")
    reserve = decode_one({"id": 4, "op": "reserve", "sku": SKU, "buyer": "u", "qty": 0})
    assert reserve == Request(4, "reserve", None, "qty must be an integer from 1 to 1000")


def test_field_order_does_not_matter() -> None:
    message = {"qty": 1, "buyer": "u", "sku": SKU, "op": "reserve", "id": 9}
    assert decode_one(message) == Request(9, "reserve", Reserve(SKU, "u", 1, None), None)


@pytest.mark.parametrize("request_id", [0, -1, ID_MIN, ID_MAX])
def test_ids_span_signed_64_bits(request_id: int) -> None:
    assert decode_one({"id": request_id, "op": "ping"}).id == request_id


# ------------------------------------------------------------------- malformed requests


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "ping"}, "missing field: id"),
        ({"id": None, "op": "ping"}, "id must be an integer"),
        ({"id": True, "op": "ping"}, "id must be an integer"),
        ({"id": 1.0, "op": "ping"}, "id must be an integer"),
        ({"id": "1", "op": "ping"}, "id must be an integer"),
        ({"id": ID_MAX + 1, "op": "ping"}, "id must be an integer"),
        ({"id": 2**64 - 1, "op": "ping"}, "id must be an integer"),
        ({"id": [1], "op": "ping"}, "id must be an integer"),
    ],
)
def test_a_request_without_an_integer_id_is_invalid_with_a_null_id(message: dict[str, Any], error: str) -> None:
    request = decode_one(message)
    assert request.id is None
    assert request.command is None
    assert request.error is not None
    assert error in request.error


def test_a_request_without_an_id_still_names_its_known_op_for_the_metrics() -> None:
    request = decode_one({"op": "reserve", "sku": SKU, "buyer": "u", "qty": 1})
    assert (request.id, request.op, request.command) == (None, "reserve", None)
    assert request.error == "missing field: id"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"id": 1}, "missing field: op"),
        ({"id": 1, "op": None}, "op must be a string"),
        ({"id": 1, "op": 7}, "op must be a string"),
        ({"id": 1, "op": b"ping"}, "op must be a string"),
        ({"id": 1, "op": "pong"}, "unknown op: pong"),
        ({"id": 1, "op": "Reserve"}, "unknown op: Reserve"),
        ({"id": 1, "op": ""}, "unknown op: "),
    ],
)
def test_a_request_without_a_known_op_is_invalid(message: dict[str, Any], error: str) -> None:
    request = decode_one(message)
    assert request == Request(1, None, None, error)


@pytest.mark.parametrize("op", sorted(SPEC_FIELDS))
def test_an_unknown_field_is_invalid_for_every_op(op: str) -> None:
    message = {"id": 1, "op": op, **valid_fields(op), "colour": "red"}
    assert decode_one(message) == Request(1, op, None, "unknown field: colour")


@pytest.mark.parametrize(
    ("op", "field"), [(op, field) for op, (required, _) in sorted(SPEC_FIELDS.items()) for field in required]
)
def test_every_missing_required_field_is_invalid(op: str, field: str) -> None:
    fields = valid_fields(op)
    del fields[field]
    assert decode_one({"id": 1, "op": op, **fields}) == Request(1, op, None, f"missing field: {field}")


def test_a_missing_field_with_an_unknown_one_in_its_place_reports_the_unknown_one() -> None:
    message = {"id": 1, "op": "reserve", "sku": SKU, "buyer": "u", "quantity": 1}
    assert decode_one(message).error == "unknown field: quantity"


@pytest.mark.parametrize("key", [5, 1.5, None, True, b"sku"])
def test_a_field_name_that_is_not_a_string_is_invalid(key: Any) -> None:
    request = decode_one({"id": 1, "op": "stock", "sku": SKU, key: 1})
    assert (request.id, request.op, request.command) == (1, "stock", None)
    assert request.error is not None
    assert request.error.startswith("field names must be strings")


@pytest.mark.parametrize("length", [65, 200, 100_000])
def test_an_error_never_echoes_a_long_value(length: int) -> None:
    huge = "x" * length
    for message in (
        {"id": 1, "op": huge},
        {"id": 1, "op": "ping", huge: 1},
        {"id": 1, "op": "ping", huge.encode(): 1},
        {"id": 1, "op": "ping", 2**63: 1},
    ):
        request = decode_one(message)
        assert request.error is not None
        assert len(request.error) <= ERROR_CHARS_MAX, request.error


def valid_fields(op: str) -> dict[str, Any]:
    """Every field of `op` (required and optional), with a plausible value."""
    values = {
        "sku": SKU,
        "buyer": "u42",
        "qty": 1,
        "key": "k-1",
        "reservation": "0-1",
        "stock": 10,
        "per_buyer_limit": 1,
        "hold_seconds": 900,
        "opens_at": None,
        "closes_at": None,
        "registration_required": False,
        "buyers": ["u42"],
        "order": "po-1",
    }
    required, optional = SPEC_FIELDS[op]
    return {name: values[name] for name in (*required, *optional)}


# ------------------------------------------------------------------- malformed frames


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),  # the one byte msgpack never uses
        (b"\x81", "not valid msgpack"),  # a map header with nothing after it
        (msgpack.packb({"id": 1, "op": "ping"}) + b"\x00", "not valid msgpack"),  # trailing bytes
        (b"\x81\xa2id\xa3\xff\xfe\xfd", "not valid msgpack"),  # a string that is not UTF-8
        (b"\x91" * 5000, "not valid msgpack"),  # nested past msgpack's stack
        (b"\x81\x91\x01\x01", "not valid msgpack"),  # a map key that is an array
        (b"\x81\x80\x01", "not valid msgpack"),  # a map key that is a map
        (b"\xd4\xff\x00", "not valid msgpack"),  # a timestamp extension of the wrong length
        (msgpack.packb(7), "must be a map or an array of maps"),
        (msgpack.packb("ping"), "must be a map or an array of maps"),
        (msgpack.packb(None), "must be a map or an array of maps"),
        (msgpack.packb(b"\x81\xa2id\x01"), "must be a map or an array of maps"),
        (msgpack.packb(msgpack.ExtType(5, b"abc")), "must be a map or an array of maps"),
        (msgpack.packb([]), "at least one request"),
        (msgpack.packb([{"id": 1, "op": "ping"}, 2]), "every element of a batch must be a map"),
        (msgpack.packb([[{"id": 1, "op": "ping"}]]), "every element of a batch must be a map"),
    ],
)
def test_a_malformed_payload_is_one_invalid_request_with_a_null_id(payload: bytes, error: str) -> None:
    assert_malformed(server().decode(payload), error)


def test_a_batch_over_the_bound_is_malformed_and_at_the_bound_decodes() -> None:
    limits = Limits(batch_requests_max=20)
    at_bound = [{"id": number, "op": "ping"} for number in range(20)]
    frame = decode(at_bound, limits)
    assert frame.batch is True
    assert [request.id for request in requests_of(frame)] == list(range(20))
    assert_malformed(decode([*at_bound, {"id": 20, "op": "ping"}], limits), "a batch of 21 requests")


@pytest.mark.parametrize("header", [b"\xdc\x03\xe9", b"\xdd\x00\x00\x03\xe9", b"\xdd\xff\xff\xff\xff"])
def test_a_batch_header_over_the_bound_is_refused_before_its_body(header: bytes) -> None:
    # The body is missing: only the header could have been read.
    assert_malformed(server().decode(header), "over the limit of 1000")


def test_a_batch_of_fifteen_or_fewer_is_bounded_too() -> None:
    limits = Limits(batch_requests_max=2)
    assert_malformed(decode([{"id": number, "op": "ping"} for number in range(3)], limits), "a batch of 3")


def test_bad_maps_in_a_batch_get_their_own_errors_and_the_others_decode() -> None:
    frame = decode(
        [
            {"id": 1, "op": "reserve", "sku": SKU, "buyer": "a", "qty": 1},
            {"id": "two", "op": "reserve", "sku": SKU, "buyer": "b", "qty": 1},
            {"id": 3, "op": "teleport"},
            {"id": 4, "op": "stock"},
            {"id": 5, "op": "stock", "sku": SKU, "extra": 1},
            {"id": 6, "op": "ping"},
        ]
    )
    assert frame.batch is True
    assert requests_of(frame) == (
        Request(1, "reserve", Reserve(SKU, "a", 1, None), None),
        Request(None, "reserve", None, "id must be an integer from -2**63 to 2**63-1"),
        Request(3, None, None, "unknown op: teleport"),
        Request(4, "stock", None, "missing field: sku"),
        Request(5, "stock", None, "unknown field: extra"),
        Request(6, "ping", None, None),
    )


def test_a_batch_of_one_is_still_a_batch() -> None:
    frame = decode([{"id": 1, "op": "ping"}])
    assert frame == Frame([1], ["ping"], [PING_REPLY], batch=True)


def test_an_oversize_frame_raises_1009_and_a_frame_at_the_limit_decodes() -> None:
    limits = Limits(frame_bytes_max=64)
    codec = ServerCodec(limits)
    message = {"id": 1, "op": "stock", "sku": "s" * 40}  # a str8: its header stays 2 bytes
    padding = 40 + 64 - len(msgpack.packb(message))
    message["sku"] = "s" * padding
    at_limit = msgpack.packb(message)
    assert len(at_limit) == 64
    assert codec.decode(at_limit).commands[0] == Stock("s" * padding)
    with pytest.raises(RemoteProtocolError) as raised:
        codec.decode(at_limit + b"\x00")
    assert raised.value.close_code == 1009
    with pytest.raises(RemoteProtocolError) as raised:
        codec.decode(b"\xc1" * 65)  # garbage too: size is checked first
    assert raised.value.close_code == 1009


def test_the_default_frame_limit_is_one_mebibyte() -> None:
    codec = server()
    payload = msgpack.packb({"id": 1, "op": "stock", "sku": "s" * (1_048_576 - 32)})
    assert len(payload) <= 1_048_576
    # Decoded (then refused for its value: a name is at most string_bytes_max), not closed.
    assert requests_of(codec.decode(payload))[0].error == "sku is longer than 256 bytes"
    with pytest.raises(RemoteProtocolError):
        codec.decode(msgpack.packb({"id": 1, "op": "stock", "sku": "s" * 1_048_576}))


# ------------------------------------------------------------------- hostile input


def check_frame(frame: Frame) -> None:
    """What decode promises for any input: a frame the gateway can answer request by request."""
    assert isinstance(frame, Frame)
    assert 1 <= len(requests_of(frame)) <= LIMITS.batch_requests_max
    assert frame.batch or len(requests_of(frame)) == 1
    for request in requests_of(frame):
        assert request.id is None or (type(request.id) is int and ID_MIN <= request.id <= ID_MAX)
        assert request.op is None or request.op in FRONTEND_OPS | ADMIN_OPS
        if request.error is None:
            assert request.id is not None
            assert request.op is not None
            assert (request.command is None) == (request.op in ("ping", "stats"))
        else:
            assert type(request.error) is str
            assert 0 < len(request.error) <= ERROR_CHARS_MAX
            assert request.command is None
    # Every request can be answered and the answer encoded.
    codec = server()
    replies: list[AnyReply] = [
        item if isinstance(item, REPLY_TYPES) else Reply("ok")  # type: ignore[misc]
        for item in frame.commands
    ]
    received = ClientCodec().decode_replies(codec.encode(frame, replies))
    assert [answer["id"] for answer in received] == frame.ids
    assert [(answer["status"], answer.get("error")) for answer in received] == [
        (reply.status, reply.error) for reply in replies
    ]


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=300))
def test_arbitrary_bytes_never_make_decode_raise(payload: bytes) -> None:
    check_frame(server().decode(payload))


# Every kind of value msgpack can carry (ints within its 64 bits), nested.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=ID_MIN, max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
hashable_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=ID_MIN, max_value=2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=10),
)
structures = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(hashable_scalars, children, max_size=6),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=structures)
def test_arbitrary_msgpack_structures_never_make_decode_raise(message: Any) -> None:
    check_frame(server().decode(msgpack.packb(message)))


# Maps that look like requests: the decoder's verdict must be exactly what SPEC.md says.
# NaN is never equal to itself, so these values leave it out to compare commands.
field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=ID_MIN, max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
noise_names = st.one_of(st.sampled_from(["Sku", "", "quantity", "id ", "sku", "key", "buyers"]), hashable_scalars)


@st.composite
def request_like(draw: st.DrawFn) -> dict[Any, Any]:
    """A map near a valid request: an op's fields, some left out, some wrong, some added."""
    op = draw(st.sampled_from(sorted(SPEC_FIELDS)))
    required, optional = SPEC_FIELDS[op]
    message: dict[Any, Any] = {}
    if draw(st.integers(0, 9)):
        message["id"] = draw(st.integers(min_value=ID_MIN, max_value=ID_MAX))
    else:
        message["id"] = draw(st.one_of(st.integers(min_value=ID_MAX + 1, max_value=2**64 - 1), field_values))
    if draw(st.integers(0, 9)):
        message["op"] = op
    elif draw(st.booleans()):
        message["op"] = draw(field_values)
    for name in required:
        if draw(st.integers(0, 14)):
            message[name] = draw(st.one_of(field_values, st.lists(field_values, max_size=3)))
    for name in optional:
        if draw(st.booleans()):
            message[name] = draw(field_values)
    if not draw(st.integers(0, 4)):
        message[draw(noise_names)] = draw(field_values)
    if not draw(st.integers(0, 9)):
        del message["id"]
    return message


def spec_verdict(message: dict[Any, Any]) -> tuple[int | None, str | None, bool]:
    """(id, op, valid) of a request map, straight from the rules of SPEC.md."""
    request_id = message.get("id")
    valid_id = type(request_id) is int and ID_MIN <= request_id <= ID_MAX
    op = message.get("op")
    known_op = type(op) is str and op in SPEC_FIELDS
    valid = valid_id and known_op
    if known_op:
        required, optional = SPEC_FIELDS[op]
        valid = valid and set(message) <= {"id", "op", *required, *optional} and set(required) <= set(message)
    return (request_id if valid_id else None), (op if known_op else None), valid


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(request_like(), min_size=1, max_size=3), batch=st.booleans())
def test_request_like_maps_decode_exactly_as_the_spec_says(messages: list[dict[Any, Any]], batch: bool) -> None:
    frame = server().decode(msgpack.packb(messages if batch else messages[0]))
    check_frame(frame)
    expected = messages if batch else messages[:1]
    assert frame.batch is batch
    assert len(requests_of(frame)) == len(expected)
    for request, message in zip(requests_of(frame), expected, strict=True):
        request_id, op, valid = spec_verdict(message)
        assert (request.id, request.op) == (request_id, op), message
        if not valid:
            assert request.error is not None, (message, request)
            continue
        # The map's values go through the parser the API uses: the same command, or the same error.
        command = expected_command(op, message)  # type: ignore[arg-type]
        parsed = None if command is None else CommandParser(LIMITS).check(command)
        if parsed is None or isinstance(parsed, REPLY_TYPES):
            assert request.command is None, (message, request)
            assert request.error == (None if parsed is None else parsed.error), (message, request)
        else:
            assert request == Request(request_id, op, parsed, None), message


VALID_FRAMES = [
    msgpack.packb([request_map(number, Reserve(SKU, f"buyer-{number}", 1, f"key-{number}")) for number in range(20)]),
    msgpack.packb(request_map(7, PutSku(SKU, 100, 2, 60, 1_700_000_000.0, None, True))),
    msgpack.packb([{"id": 1, "op": "ping"}, request_map(2, Register(SKU, ["a", "b", "c"])), {"id": 3, "op": "stats"}]),
]


@pytest.mark.parametrize("seed", range(8))
def test_corrupted_valid_frames_never_make_decode_raise(seed: int) -> None:
    # Replays from its seed: the same flips, insertions and cuts of the same frames.
    generator = random.Random(seed)
    codec = server()
    for _ in range(300):
        payload = bytearray(generator.choice(VALID_FRAMES))
        for _ in range(generator.randint(1, 4)):
            position = generator.randrange(len(payload))
            action = generator.randrange(3)
            if action == 0:
                payload[position] = generator.randrange(256)
            elif action == 1:
                payload.insert(position, generator.randrange(256))
            else:
                del payload[position:]
                if not payload:
                    break
        try:
            check_frame(codec.decode(bytes(payload)))
        except Exception as error:
            raise AssertionError(f"seed={seed} payload={bytes(payload).hex()}") from error


# ------------------------------------------------------------------- reply maps


def answer(reply: Any, request_id: int | None = 5, codec: ServerCodec | None = None) -> dict[str, Any]:
    """The reply map the server writes for `reply` to request `request_id`."""
    frame = Frame([request_id], ["reserve"], [reply], batch=False)
    return msgpack.unpackb((codec or server()).encode(frame, [reply]))


def test_a_reserve_that_is_ok_carries_reservation_expiry_and_remaining() -> None:
    reply = Reply("ok", reservation="3-17", expires_at=1_700_000_900.25, remaining=41)
    assert answer(reply) == {
        "id": 5,
        "status": "ok",
        "reservation": "3-17",
        "expires_at": 1_700_000_900.25,
        "remaining": 41,
    }


def test_expires_at_is_always_a_float() -> None:
    written = answer(Reply("ok", reservation="0-1", expires_at=1_700_000_900, remaining=0))
    assert type(written["expires_at"]) is float
    assert written["expires_at"] == 1_700_000_900.0


@pytest.mark.parametrize("status", ["sold_out", "limit_exceeded", "not_open", "closed", "unknown_sku", "not_found"])
def test_a_reply_without_fields_is_id_and_status(status: str) -> None:
    assert answer(Reply(status)) == {"id": 5, "status": status}  # type: ignore[arg-type]


@pytest.mark.parametrize("request_id", [None, 0, 127, 128, -1, -33, 2**32, ID_MIN, ID_MAX])
def test_a_status_only_reply_written_from_its_cached_bytes_is_the_map_msgpack_would_write(
    request_id: int | None,
) -> None:
    for status in STATUSES:
        expected = msgpack.packb({"id": request_id, "status": status})
        frame = Frame([request_id], ["reserve"], [None], batch=False)  # type: ignore[list-item]
        assert server().encode(frame, [Reply(status)]) == expected  # type: ignore[arg-type]


def _map_of(request_id: int | None, reply: Reply) -> dict[str, Any]:
    """The reply map as SPEC.md writes it, field by field: what the written bytes must pack."""
    fields: dict[str, Any] = {"id": request_id, "status": reply.status}
    if reply.reservation is not None:
        fields["reservation"] = reply.reservation
    if reply.expires_at is not None:
        fields["expires_at"] = float(reply.expires_at)
    if reply.remaining is not None:
        fields["remaining"] = reply.remaining
    if reply.error is not None:
        fields["error"] = reply.error
    return fields


SOLD_OUT_REPLY = Reply("sold_out")
plain_replies = st.one_of(
    st.just(SOLD_OUT_REPLY),  # the book answers every refusal of a kind with one object
    st.sampled_from(STATUSES).map(Reply),  # type: ignore[arg-type]
    st.builds(
        Reply,
        st.just("ok"),
        reservation=st.text(min_size=1, max_size=12),
        expires_at=st.one_of(st.integers(min_value=0, max_value=2**40), st.floats(min_value=0, max_value=2e9)),
        remaining=st.integers(min_value=0, max_value=2**40),
    ),
    st.builds(
        Reply, st.sampled_from(STATUSES), reservation=st.none() | st.just("0-1"), error=st.none() | st.text(max_size=5)
    ),  # type: ignore[arg-type]
)


@settings(max_examples=300, deadline=None)
@given(
    replies=st.lists(plain_replies, min_size=1, max_size=8),
    ids=st.lists(st.none() | st.integers(min_value=ID_MIN, max_value=ID_MAX), min_size=8, max_size=8),
)
def test_every_frame_of_replies_is_written_as_msgpack_writes_its_maps(
    replies: list[Reply], ids: list[int | None]
) -> None:
    """Status-only replies, frames answered alike and holds made are written from cached bytes: the
    bytes must be exactly those of packing the maps, for any mix of them."""
    ids = ids[: len(replies)]
    maps = [_map_of(request_id, reply) for request_id, reply in zip(ids, replies, strict=True)]
    batch = Frame(ids, ["reserve"] * len(ids), list(replies), batch=True)
    # A batch's array header is always array 16 (0xdc), whatever its length.
    header = b"\xdc" + len(maps).to_bytes(2, "big")
    assert server().encode(batch, replies) == header + b"".join(msgpack.packb(fields) for fields in maps)
    single = Frame(ids[:1], ["reserve"], replies[:1], batch=False)
    assert server().encode(single, replies[:1]) == msgpack.packb(maps[0])


def test_a_frame_answered_alike_is_written_as_its_maps() -> None:
    ids = list(range(120, 140))
    batch = Frame(ids, ["reserve"] * len(ids), [SOLD_OUT_REPLY] * len(ids), batch=True)
    expected = b"\xdc\x00\x14" + b"".join(msgpack.packb({"id": request_id, "status": "sold_out"}) for request_id in ids)
    assert server().encode(batch, [SOLD_OUT_REPLY] * len(ids)) == expected


def test_a_stock_reply_carries_the_four_counts() -> None:
    reply = StockReply("ok", stock=10, available=0, held=3, sold=7)
    assert answer(reply) == {
        "id": 5,
        "status": "ok",
        "stock": 10,
        "available": 0,
        "held": 3,
        "sold": 7,
    }


def test_an_invalid_reply_from_the_engine_carries_its_error() -> None:
    written = answer(Reply("invalid", error="qty must be an integer from 1 to 1000"))
    assert written == {"id": 5, "status": "invalid", "error": "qty must be an integer from 1 to 1000"}


def test_a_request_with_an_error_is_answered_invalid_with_it() -> None:
    codec = server()
    frame = codec.decode(msgpack.packb([{"op": "ping"}, {"id": 3, "op": "stock"}]))
    assert msgpack.unpackb(codec.encode(frame, frame.commands)) == [  # type: ignore[arg-type]
        {"id": None, "status": "invalid", "error": "missing field: id"},
        {"id": 3, "status": "invalid", "error": "missing field: sku"},
    ]


def test_ping_stats_forbidden_and_busy_replies_are_replies_like_the_others() -> None:
    codec = server()
    ping = codec.decode(msgpack.packb({"id": 5, "op": "ping"}))
    assert msgpack.unpackb(codec.encode(ping, ping.commands)) == {"id": 5, "status": "ok"}  # type: ignore[arg-type]
    assert answer(StatsReply("ok", stats={"frames": 3})) == {"id": 5, "status": "ok", "stats": {"frames": 3}}
    frontend = ServerCodec(LIMITS, admin=False)
    put = frontend.decode(msgpack.packb({"id": 5, "op": "put_sku", "sku": SKU, "stock": -1}))
    assert put.commands == [Reply("forbidden", error="put_sku needs an admin token")]
    assert answer(put.commands[0], codec=frontend) == {
        "id": 5,
        "status": "forbidden",
        "error": "put_sku needs an admin token",
    }
    # A malformed admin request from a frontend is answered invalid, as for an admin.
    (malformed,) = requests_of(frontend.decode(msgpack.packb({"id": 6, "op": "put_sku"})))
    assert malformed == Request(6, "put_sku", None, "missing field: sku")
    assert answer(Reply("busy", error="later"), None) == {"id": None, "status": "busy", "error": "later"}


def test_encode_refuses_misuse() -> None:
    codec = server()
    with pytest.raises(LocalProtocolError):
        answer(Reply("maybe"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        answer(Reply(["ok"]))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        answer("ok")
    with pytest.raises(LocalProtocolError):
        answer(Stats())
    frame = Frame([1], ["ping"], [PING_REPLY], batch=False)
    with pytest.raises(LocalProtocolError):
        codec.encode(frame, [])


def test_encode_answers_a_map_with_a_map_and_a_batch_with_an_array_in_order() -> None:
    codec = server()
    single = Frame([1], ["ping"], [PING_REPLY], batch=False)
    assert msgpack.unpackb(codec.encode(single, [Reply("ok")])) == {"id": 1, "status": "ok"}
    batch = Frame([1, 2], ["ping", "ping"], [PING_REPLY, PING_REPLY], batch=True)
    replies = [Reply("ok"), Reply("busy")]
    expected = [{"id": 1, "status": "ok"}, {"id": 2, "status": "busy"}]
    assert msgpack.unpackb(codec.encode(batch, replies)) == expected  # type: ignore[arg-type]
    assert msgpack.unpackb(codec.encode(batch, tuple(replies))) == expected  # type: ignore[arg-type]


def test_encode_writes_the_array_header_of_large_batches() -> None:
    for count in (15, 16, 65_535, 65_536):
        frame = Frame(list(range(count)), ["ping"] * count, [PING_REPLY] * count, batch=True)
        written = msgpack.unpackb(server().encode(frame, [PING_REPLY] * count))
        assert [reply["id"] for reply in written] == list(range(count))


def test_encode_refuses_a_wrong_number_of_replies_or_values_msgpack_cannot_carry() -> None:
    codec = server()
    batch = Frame([1, 2], ["ping", "ping"], [PING_REPLY, PING_REPLY], batch=True)
    with pytest.raises(LocalProtocolError):
        codec.encode(batch, [Reply("ok")])
    with pytest.raises(LocalProtocolError):
        codec.encode(batch, [Reply("ok")] * 3)
    with pytest.raises(LocalProtocolError):
        codec.encode(Frame([1], ["stats"], [Stats()], batch=False), [StatsReply("ok", stats={"x": object()})])


# ------------------------------------------------------------------- the client's half


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Reserve(SKU, "u", 2, None), {"id": 1, "op": "reserve", "sku": SKU, "buyer": "u", "qty": 2}),
        (Reserve(SKU, "u", 1, "k"), {"id": 1, "op": "reserve", "sku": SKU, "buyer": "u", "qty": 1, "key": "k"}),
        (Confirm("0-1", "u"), {"id": 1, "op": "confirm", "reservation": "0-1", "buyer": "u"}),
        (Cancel("0-1", "u"), {"id": 1, "op": "cancel", "reservation": "0-1", "buyer": "u"}),
        (Stock(SKU), {"id": 1, "op": "stock", "sku": SKU}),
        (Register(SKU, ("a", "b")), {"id": 1, "op": "register", "sku": SKU, "buyers": ("a", "b")}),
        (PutSku(SKU, 5), {"id": 1, "op": "put_sku", "sku": SKU, "stock": 5}),
        (
            PutSku(SKU, per_buyer_limit=3, closes_at=None),
            {"id": 1, "op": "put_sku", "sku": SKU, "per_buyer_limit": 3, "closes_at": None},
        ),
        (Confirm("0-1", "u", "po-1"), {"id": 1, "op": "confirm", "reservation": "0-1", "buyer": "u", "order": "po-1"}),
        (GetHold("0-1", "u"), {"id": 1, "op": "hold", "reservation": "0-1", "buyer": "u"}),
        (GetSku(SKU), {"id": 1, "op": "get_sku", "sku": SKU}),
    ],
)
def test_request_map_is_the_wire_map_of_a_command(command: Command, message: dict[str, Any]) -> None:
    assert request_map(1, command) == message


def test_request_map_refuses_what_is_not_a_command() -> None:
    with pytest.raises(LocalProtocolError):
        request_map(1, Reply("ok"))  # type: ignore[arg-type]


any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=ID_MIN, max_value=ID_MAX),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.lists(st.text(max_size=10), max_size=5),
)
commands = st.one_of(
    st.builds(Reserve, any_value, any_value, any_value, any_value),
    st.builds(Confirm, any_value, any_value),
    st.builds(Cancel, any_value, any_value),
    st.builds(Stock, any_value),
    st.builds(PutSku, any_value, any_value, any_value, any_value, any_value, any_value, any_value),
    st.builds(Register, any_value, any_value),
)


@settings(max_examples=300, deadline=None)
@given(
    commands=st.lists(commands, min_size=1, max_size=5),
    first_id=st.integers(min_value=ID_MIN, max_value=ID_MAX - 10),
)
def test_every_command_survives_the_trip_from_client_to_server(commands: list[Command], first_id: int) -> None:
    maps = [request_map(first_id + position, command) for position, command in enumerate(commands)]
    frame = server().decode(encode_requests(ClientCodec(), maps))
    assert frame.batch is (len(commands) > 1)
    assert frame.ids == [first_id + position for position in range(len(commands))]
    # Over the wire or in process, the one parser makes the same command or the same refusal.
    parser = CommandParser(LIMITS)
    assert frame.commands == [parser.check(command) for command in commands]


def test_the_client_refuses_requests_the_server_would_not_take() -> None:
    client = ClientCodec(Limits(batch_requests_max=2, frame_bytes_max=100))
    with pytest.raises(LocalProtocolError):
        client.encode_batch([])
    with pytest.raises(LocalProtocolError):
        client.encode_batch([{"id": number, "op": "ping"} for number in range(3)])
    with pytest.raises(LocalProtocolError):
        client.encode_request({"id": 1, "op": "stock", "sku": "s" * 100})
    with pytest.raises(LocalProtocolError):
        client.encode_request({"id": True, "op": "ping"})
    with pytest.raises(LocalProtocolError):
        client.encode_request({"id": 2**63, "op": "ping"})
    with pytest.raises(LocalProtocolError):
        client.encode_request({"id": 1, "op": "pong"})
    with pytest.raises(LocalProtocolError):
        client.encode_batch([{"id": 1, "op": "ping"}, {"op": "ping"}])
    with pytest.raises(LocalProtocolError):
        client.encode_request({"id": 1, "op": ["ping"]})
    with pytest.raises(LocalProtocolError):
        client.encode_batch([{"id": 1, "op": "ping"}, [("id", 2), ("op", "ping")]])  # type: ignore[list-item]
    with pytest.raises(LocalProtocolError):
        client.encode_request({"id": 1, "op": "stock", "sku": {1, 2}})  # msgpack has no sets
    assert msgpack.unpackb(client.encode_request({"id": 1, "op": "ping"})) == {"id": 1, "op": "ping"}
    assert msgpack.unpackb(client.encode_batch([{"id": 1, "op": "ping"}] * 2)) == [{"id": 1, "op": "ping"}] * 2


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb(3),
        msgpack.packb([]),
        msgpack.packb([{"id": 1, "status": "ok"}, 4]),
        msgpack.packb({"id": 1}),
        msgpack.packb({"status": "ok"}),
        msgpack.packb({"id": 1, "status": 200}),
        msgpack.packb({"id": "1", "status": "ok"}),
        msgpack.packb([[[]]]),
        b"\x91" * 900 + b"\x90",  # deep, but within msgpack's stack: no RecursionError either
    ],
)
def test_the_client_raises_remote_protocol_error_on_garbage_from_the_server(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        ClientCodec().decode_replies(payload)


@settings(max_examples=200, deadline=None)
@given(payload=st.one_of(st.binary(max_size=200), structures.map(msgpack.packb)))
def test_the_client_raises_nothing_but_remote_protocol_error_on_anything(payload: bytes) -> None:
    try:
        replies = ClientCodec().decode_replies(payload)
    except RemoteProtocolError:
        return
    assert replies
    assert all(type(reply) is dict and type(reply["status"]) is str for reply in replies)


def test_the_client_reads_one_map_or_an_array_of_maps() -> None:
    client = ClientCodec()
    assert client.decode_replies(msgpack.packb({"id": None, "status": "invalid", "error": "x"})) == [
        {"id": None, "status": "invalid", "error": "x"}
    ]
    replies = [{"id": 1, "status": "ok"}, {"id": 2, "status": "sold_out"}]
    assert client.decode_replies(msgpack.packb(replies)) == replies


def test_reply_from_map_rebuilds_the_in_process_replies() -> None:
    assert reply_from_map("stock", {"id": 1, "status": "ok", "stock": 3, "available": 1, "held": 1, "sold": 1}) == (
        StockReply("ok", 3, 1, 1, 1)
    )
    assert reply_from_map(
        "reserve", {"id": 1, "status": "ok", "reservation": "0-1", "expires_at": 2.5, "remaining": 0}
    ) == (Reply("ok", "0-1", 2.5, 0))
    assert reply_from_map("put_sku", {"id": 1, "status": "forbidden", "error": "no"}) == Reply("forbidden", error="no")
    with pytest.raises(LocalProtocolError):
        reply_from_map("teleport", {"id": 1, "status": "ok"})


names = st.text(min_size=1, max_size=20)
counts = st.integers(min_value=0, max_value=2**40)
errors = st.none() | st.text(max_size=100)
statuses = st.sampled_from(STATUSES)
replies_for_ops = st.one_of(
    st.tuples(
        st.sampled_from(["reserve", "confirm", "cancel", "put_sku"]),
        st.builds(
            Reply,
            statuses,
            st.none() | names,
            st.none() | st.floats(min_value=0, max_value=1e12, allow_nan=False),
            st.none() | counts,
            errors,
        ),
    ),
    st.tuples(
        st.just("stock"),
        st.builds(
            StockReply, statuses, st.none() | counts, st.none() | counts, st.none() | counts, st.none() | counts, errors
        ),
    ),
    st.tuples(
        st.just("register"),
        st.one_of(
            st.builds(RegisterReply, statuses, st.none(), st.none(), errors),
            st.builds(RegisterReply, st.just("ok"), counts, counts, st.none()),
        ),
    ),
    st.tuples(
        st.just("hold"),
        st.one_of(
            st.builds(HoldReply, statuses.filter(lambda status: status != "ok"), error=errors),
            st.builds(
                HoldReply,
                st.just("ok"),
                names,
                counts,
                st.sampled_from(["held", "confirmed", "cancelled", "expired"]),
                st.floats(min_value=0, max_value=1e12, allow_nan=False),
                st.none() | names,
            ),
        ),
    ),
    st.tuples(
        st.just("get_sku"),
        st.one_of(
            st.builds(SkuReply, statuses.filter(lambda status: status != "ok"), error=errors),
            st.builds(
                SkuReply,
                st.just("ok"),
                names,
                counts,
                counts,
                counts,
                counts,
                counts,
                st.floats(min_value=0.25, max_value=1e6, allow_nan=False),
                st.none() | st.floats(min_value=0, max_value=1e12, allow_nan=False),
                st.none() | st.floats(min_value=0, max_value=1e12, allow_nan=False),
                st.booleans(),
                counts,
                st.booleans(),
            ),
        ),
    ),
)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(replies_for_ops, min_size=1, max_size=6), first_id=st.integers(min_value=0, max_value=2**40))
def test_replies_survive_the_trip_from_server_to_client(
    pairs: list[tuple[str, Reply | StockReply]], first_id: int
) -> None:
    client = ClientCodec()
    codec = server()
    maps = [
        request_map(first_id + position, Stock(SKU) if op == "stock" else Reserve(SKU, "u", 1))
        if op in ("stock", "reserve")
        else {"id": first_id + position, "op": op, **valid_fields(op)}
        for position, (op, _) in enumerate(pairs)
    ]
    frame = codec.decode(encode_requests(client, maps))
    received = client.decode_replies(codec.encode(frame, [reply for _, reply in pairs]))
    assert [answer["id"] for answer in received] == [first_id + position for position in range(len(pairs))]
    rebuilt = [reply_from_map(op, answer) for (op, _), answer in zip(pairs, received, strict=True)]
    assert rebuilt == [reply for _, reply in pairs]
    assert [type(reply) for reply in rebuilt] == [type(reply) for _, reply in pairs]


# ------------------------------------------------------------------- two peers in memory


class FakeEngine:
    """Stock counts per SKU, one unit per reserve: just enough engine to talk to."""

    def __init__(self, stock: dict[str, int]) -> None:
        self.stock = dict(stock)
        self.holds: dict[str, str] = {}

    def execute(self, command: Command) -> Reply | StockReply:
        if type(command) is Reserve:
            if command.sku not in self.stock:
                return Reply("unknown_sku")
            if self.stock[command.sku] == 0:
                return Reply("sold_out")
            self.stock[command.sku] -= 1
            reservation = f"0-{len(self.holds) + 1}"
            self.holds[reservation] = command.buyer
            return Reply("ok", reservation=reservation, expires_at=1_700_000_900.0, remaining=self.stock[command.sku])
        if type(command) is Confirm:
            return Reply("ok") if self.holds.get(command.reservation) == command.buyer else Reply("not_found")
        if type(command) is Stock:
            left = self.stock[command.sku]
            return StockReply("ok", stock=3, available=left, held=3 - left, sold=0)
        return Reply("invalid", error=f"the fake engine does not {type(command).__name__}")


def serve_payload(engine: FakeEngine, payload: bytes, admin: bool) -> bytes:
    """What the gateway does with one frame, without the sockets."""
    codec = ServerCodec(LIMITS, admin=admin)
    frame = codec.decode(payload)
    replies = [
        item
        if isinstance(item, REPLY_TYPES)
        else StatsReply("ok", stats={})
        if type(item) is Stats
        else engine.execute(item)
        for item in frame.commands
    ]
    return codec.encode(frame, replies)  # type: ignore[arg-type]


class Peer:
    """The client's side: ids, pending requests by id, and replies matched back to them."""

    def __init__(self) -> None:
        self.codec = ClientCodec(LIMITS)
        self.next_id = 1
        self.pending: dict[int, str] = {}
        self.answers: dict[int, Reply | StockReply] = {}

    def frame(self, commands: Sequence[Command | str]) -> bytes:
        maps = []
        for command in commands:
            request_id = self.next_id
            self.next_id += 1
            if isinstance(command, str):  # ping or stats
                maps.append({"id": request_id, "op": command})
            else:
                maps.append(request_map(request_id, command))
            self.pending[request_id] = maps[-1]["op"]
        return encode_requests(self.codec, maps)

    def receive(self, payload: bytes) -> None:
        for answer in self.codec.decode_replies(payload):
            op = self.pending.pop(answer["id"])
            self.answers[answer["id"]] = reply_from_map(op, answer)


def test_two_peers_in_memory_reserve_until_sold_out_and_match_replies_by_id() -> None:
    engine = FakeEngine({SKU: 3})
    peer = Peer()
    crowd: list[Command | str] = [Reserve(SKU, f"buyer-{number}", 1, f"key-{number}") for number in range(5)]
    first = peer.frame([*crowd, "ping", Stock(SKU), PutSku(SKU, 10)])
    second = peer.frame([Reserve("NO-SUCH-SKU", "buyer-9", 1)])
    # The server answers the second frame first: the client matches by id, not by order.
    peer.receive(serve_payload(engine, second, admin=False))
    peer.receive(serve_payload(engine, first, admin=False))
    assert peer.pending == {}
    statuses = [peer.answers[request_id].status for request_id in range(1, 6)]
    assert statuses == ["ok", "ok", "ok", "sold_out", "sold_out"]
    assert [peer.answers[request_id].remaining for request_id in range(1, 4)] == [2, 1, 0]  # type: ignore[union-attr]
    assert peer.answers[6] == Reply("ok")
    assert peer.answers[7] == StockReply("ok", stock=3, available=0, held=3, sold=0)
    assert peer.answers[8] == Reply("forbidden", error="put_sku needs an admin token")
    assert peer.answers[9] == Reply("unknown_sku")

    confirm = peer.frame([Confirm(peer.answers[1].reservation, "buyer-0")])  # type: ignore[arg-type, union-attr]
    peer.receive(serve_payload(engine, confirm, admin=False))
    assert peer.answers[10] == Reply("ok")


def test_two_peers_in_memory_a_malformed_frame_gets_a_null_id_and_the_next_frame_is_served() -> None:
    engine = FakeEngine({SKU: 1})
    client = ClientCodec()
    answers = client.decode_replies(serve_payload(engine, b"\xc1not msgpack", admin=True))
    assert len(answers) == 1
    assert answers[0]["id"] is None
    assert answers[0]["status"] == "invalid"
    assert "not valid msgpack" in answers[0]["error"]
    assert engine.stock == {SKU: 1}
    peer = Peer()
    peer.receive(serve_payload(engine, peer.frame([Reserve(SKU, "u", 1)]), admin=True))
    assert peer.answers[1].status == "ok"


@pytest.mark.parametrize("op", ["reserve", "confirm", "stock", "register", "get_sku", "hold"])
def test_a_status_the_client_does_not_know_comes_through_as_a_failure_not_an_exception(op: str) -> None:
    """SPEC.md: an unknown status is a failure to retry; a later v1 server may add some."""
    (answer,) = ClientCodec().decode_replies(msgpack.packb({"id": 1, "status": "rebalancing", "error": "later"}))
    reply = reply_from_map(op, answer)
    assert (reply.status, reply.ok, reply.error) == ("rebalancing", False, "later")
