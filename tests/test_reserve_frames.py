"""The crowd's fast path (protocol/reserve_frames.py) against the general decode.

The fast path may only ever make the frame the general path makes: for any payload,
`ServerCodec.decode` (fast path first) and `ServerCodec._decode_maps` (the general path
alone) agree exactly, ids, ops, commands and replies. Near misses of a valid reserve
(every field wrong in every way, names at and past their byte limit in ASCII and
beyond it, fields missing, extra or repeated) are where they could part, so the
payloads here are mostly those. And the fast path does take the crowd's frames: a test
that passed because it never ran would prove nothing.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import ServerCodec
from protocol.limits import ID_MAX, ID_MIN, Limits
from protocol.messages import Reserve
from protocol.reserve_frames import ReserveFrameDecoder

# Small bounds, so that names and batches reach them.
LIMITS = Limits(string_bytes_max=8, qty_max=5, batch_requests_max=6)
CODEC = ServerCodec(LIMITS)
FAST = ReserveFrameDecoder(LIMITS.string_bytes_max, LIMITS.qty_max, LIMITS.batch_requests_max)

valid_names = st.text(alphabet="abcXYZ-09", min_size=1, max_size=8)
names = st.one_of(
    valid_names,
    # At and past the byte limit: ASCII, and beyond it (within it in characters or not).
    st.sampled_from(["", "a" * 8, "a" * 9, "é", "éééé", "ééééé", "€€€", "日本", "a\x00b", "\U0001f600\U0001f600"]),
    st.text(max_size=10),
    st.integers(-2, 2),
    st.none(),
    st.binary(max_size=4),
    st.booleans(),
    st.floats(allow_nan=False),
)
quantities = st.one_of(st.integers(-1, 6), st.sampled_from([2**63, True, False, 1.0, "1", None]))
ids = st.one_of(st.integers(ID_MIN, ID_MAX), st.sampled_from([ID_MAX + 1, 2**64 - 1, True, 1.0, "1", None]))
ops = st.sampled_from(["reserve", "confirm", "Reserve", "ping", "", None])
FIELDS = ("id", "op", "sku", "buyer", "qty", "key")
WRONG_VALUES = {"id": ids, "op": ops, "sku": names, "buyer": names, "qty": quantities, "key": names}


@st.composite
def reserve_like(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid reserve map, or one a mistake or two away from one."""
    message: dict[Any, Any] = {
        "id": draw(st.integers(ID_MIN, ID_MAX)),
        "op": "reserve",
        "sku": draw(valid_names),
        "buyer": draw(valid_names),
        "qty": draw(st.integers(1, 5)),
    }
    if draw(st.booleans()):
        message["key"] = draw(st.one_of(valid_names, st.none()))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        name = draw(st.sampled_from(FIELDS))
        mistake = draw(st.sampled_from(["value", "value", "value", "missing", "extra"]))
        if mistake == "value":
            message[name] = draw(WRONG_VALUES[name])
        elif mistake == "missing":
            message.pop(name, None)
        else:
            message[draw(st.sampled_from(["extra", "Sku", "reservation", 7, b"sku", 1.5]))] = 1
    return message


def payload_of(messages: list[dict[Any, Any]], batch: bool) -> bytes:
    return msgpack.packb(messages if batch else messages[0])


def assert_same_frame(payload: bytes) -> None:
    assert CODEC.decode(payload) == CODEC._decode_maps(payload), payload


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(reserve_like(), min_size=1, max_size=4), batch=st.booleans())
def test_the_fast_path_makes_the_frame_the_general_path_makes(messages: list[dict[Any, Any]], batch: bool) -> None:
    assert_same_frame(payload_of(messages, batch))


def valid_reserve(number: int, key: bool = True) -> dict[str, Any]:
    message = {"id": number, "op": "reserve", "sku": "MI-BAND", "buyer": f"b-{number}", "qty": 1 + number % 5}
    if key:
        message["key"] = f"k-{number}"
    return message


def test_the_fast_path_takes_a_crowds_batch_and_a_single_reserve() -> None:
    batch = msgpack.packb([valid_reserve(number, key=number % 2 == 0) for number in range(6)])
    decoded = FAST.decode(batch)
    assert decoded is not None
    ids, commands, is_batch = decoded
    assert is_batch
    assert ids == list(range(6))
    assert commands[0] == Reserve("MI-BAND", "b-0", 1, "k-0")
    assert commands[1] == Reserve("MI-BAND", "b-1", 2, None)
    single = FAST.decode(msgpack.packb(valid_reserve(9)))
    assert single == ([9], [Reserve("MI-BAND", "b-9", 5, "k-9")], False)
    assert CODEC.decode(batch) == CODEC._decode_maps(batch)


def with_field(name: Any, value: Any) -> dict[Any, Any]:
    message = valid_reserve(1)
    message[name] = value
    return message


def without_field(name: str) -> dict[str, Any]:
    message = valid_reserve(1)
    del message[name]
    return message


NEAR_MISSES = {
    "another op": with_field("op", "cancel"),
    "no op": without_field("op"),
    "no id": without_field("id"),
    "no qty": without_field("qty"),
    "an unknown field": with_field("note", "x"),
    "a non-string field name": with_field(3, "x"),
    "an id past 64 bits": with_field("id", ID_MAX + 1),
    "a boolean qty": with_field("qty", True),
    "a float qty": with_field("qty", 1.0),
    "a qty past the limit": with_field("qty", 6),
    "a zero qty": with_field("qty", 0),
    "an empty buyer": with_field("buyer", ""),
    "a buyer past the limit": with_field("buyer", "a" * 9),
    # Eight characters, but more than eight bytes in UTF-8.
    "a non-ASCII buyer within the limit in characters": with_field("buyer", "éééééééé"),
    "a non-ASCII sku within the limit in bytes": with_field("sku", "éé"),
    "a bytes sku": with_field("sku", b"MI-BAND"),
    "an empty key": with_field("key", ""),
}


@pytest.mark.parametrize("message", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_the_fast_path_gives_up_on_each_near_miss_and_the_general_path_answers_it(message: dict[Any, Any]) -> None:
    for payload in (msgpack.packb(message), msgpack.packb([valid_reserve(0), message])):
        assert FAST.decode(payload) is None
        assert_same_frame(payload)


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb([]),
        msgpack.packb([valid_reserve(number) for number in range(7)]),  # past batch_requests_max
        msgpack.packb([valid_reserve(0)]) + b"\x00",  # trailing bytes
        msgpack.packb([valid_reserve(0), 5]),
        msgpack.packb([[valid_reserve(0)]]),
    ],
    ids=["an empty batch", "a batch past the bound", "trailing bytes", "a non-map element", "a nested batch"],
)
def test_the_fast_path_gives_up_on_malformed_frames(payload: bytes) -> None:
    assert FAST.decode(payload) is None
    assert_same_frame(payload)


def test_a_repeated_field_counts_once_its_last_value_on_both_paths() -> None:
    # msgpack can repeat a map key; a dict keeps the last value, and so must the fast path.
    fields = ["id", 1, "op", "reserve", "sku", "MI", "buyer", "b", "qty", 1, "qty", 2]
    payload = b"\x91\x86" + b"".join(msgpack.packb(part) for part in fields)
    assert FAST.decode(payload) == ([1], [Reserve("MI", "b", 2, None)], True)
    assert_same_frame(payload)


@pytest.mark.parametrize("seed", range(4))
def test_corrupted_crowd_frames_decode_the_same_on_both_paths(seed: int) -> None:
    generator = random.Random(seed)
    original = msgpack.packb([valid_reserve(number) for number in range(6)])
    for _ in range(400):
        payload = bytearray(original)
        for _ in range(generator.randint(1, 3)):
            position = generator.randrange(len(payload))
            payload[position] = generator.randrange(256)
        assert_same_frame(bytes(payload))
