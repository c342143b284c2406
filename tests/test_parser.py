"""The one parser: every way into it (a batch of maps, one map, API arguments, a command
built by hand, a batch of those) gives the same command or the same refusal.

The batch paths inline the common reserve's check for speed; these tests hold them to
the plain path, for values that are valid, barely valid and invalid in every way.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.limits import Limits
from protocol.messages import INVALID, REPLY_TYPES, Reply, Reserve
from protocol.parser import CommandParser

LIMITS = Limits(string_bytes_max=8, qty_max=5)
PARSER = CommandParser(LIMITS)

names = st.one_of(
    # The edges, often: empty, one byte, at the bound, one over, in ASCII and beyond it.
    st.sampled_from(["", "a", "abcdefgh", "abcdefghi", "é", "éééé", "ééééé", "aéééé"]),
    st.text(alphabet="abc-1", max_size=10),
    st.text(max_size=10),
    st.text(alphabet="é", min_size=4, max_size=5),  # 8 or 10 UTF-8 bytes for 4 or 5 characters
    st.just("\ud800"),  # a lone surrogate
    st.none(),
    st.integers(),
    st.binary(max_size=3),
)
quantities = st.one_of(
    st.integers(min_value=-1, max_value=6), st.booleans(), st.floats(max_value=6), st.just(2**64), st.text(max_size=2)
)
keys = st.one_of(st.none(), names)


def verdict(item: Any) -> tuple[str, Any]:
    if isinstance(item, REPLY_TYPES):
        return ("refused", (item.status, item.error))
    return ("command", item)


@settings(max_examples=500, deadline=None)
@given(sku=names, buyer=names, qty=quantities, key=keys)
def test_every_way_in_gives_the_same_reserve_or_the_same_refusal(sku: Any, buyer: Any, qty: Any, key: Any) -> None:
    plain = verdict(PARSER.reserve(sku, buyer, qty, key))
    assert verdict(PARSER.check(Reserve(sku, buyer, qty, key))) == plain
    assert [verdict(item) for item in PARSER.check_all([Reserve(sku, buyer, qty, key)])] == [plain]
    fields = {"id": 1, "op": "reserve", "sku": sku, "buyer": buyer, "qty": qty}
    if key is not None:
        fields["key"] = key
    assert verdict(PARSER.request(fields)[2]) == plain
    parsed = PARSER.requests([fields, fields])
    assert parsed is not None
    ids, ops, commands, stats = parsed
    assert (ids, ops, stats) == ([1, 1], ["reserve", "reserve"], 0)
    assert [verdict(item) for item in commands] == [plain, plain]


EDGE_NAMES = ["", "a", "abcdefgh", "abcdefghi", "é", "éééé", "ééééé", "aéééé", "\ud800", None, 5, b"ab"]
EDGE_QUANTITIES = [-1, 0, 1, 5, 6, True, 1.0, 2**64, "1"]


def test_every_way_in_agrees_on_every_combination_of_edge_values() -> None:
    """Each field at and around its bounds, against every other: the inlined checks may
    not let through what the plain path refuses, nor refuse what it lets through."""
    for sku in EDGE_NAMES:
        for buyer in EDGE_NAMES:
            for qty in EDGE_QUANTITIES:
                for key in [None, *EDGE_NAMES]:
                    test_every_way_in_gives_the_same_reserve_or_the_same_refusal.hypothesis.inner_test(  # type: ignore[attr-defined]
                        sku, buyer, qty, key
                    )


def test_a_plain_reserve_is_kept_as_it_is_and_a_refusal_names_the_first_bad_field() -> None:
    command = Reserve("SKU", "buyer", 2, "key")
    assert PARSER.check_all([command])[0] is command
    assert PARSER.reserve("SKU", "buyer", 2, "key") == command
    assert PARSER.reserve("", "b", 9) == Reply(INVALID, error="sku must not be empty")
    assert PARSER.reserve("SKU", "b" * 9, 1) == Reply(INVALID, error="buyer is longer than 8 bytes")
    assert PARSER.reserve("SKU", "b", 6) == Reply(INVALID, error="qty must be an integer from 1 to 5")
    assert PARSER.reserve("SKU", "b", True) == Reply(INVALID, error="qty must be an integer from 1 to 5")
    assert PARSER.reserve("SKU", "b", 1, "\ud800") == Reply(
        INVALID, error="key is not valid Unicode text (it has a lone surrogate)"
    )
    assert PARSER.reserve("éééé", "b", 1) == Reserve("éééé", "b", 1)  # 8 bytes: within the bound


def test_a_batch_holding_something_that_is_not_a_map_is_refused_whole() -> None:
    assert PARSER.requests([{"id": 1, "op": "ping"}, [1]]) is None


def test_a_batch_judges_each_reserve_on_its_own_after_a_valid_one_for_the_same_or_another_sku() -> None:
    """The batch path remembers the last SKU it found valid: an equal one is valid, anything
    else is checked in full, so a bad SKU after a good one gets the plain path's refusal."""
    for sku in [*EDGE_NAMES, "SKU"]:
        first = {"id": 1, "op": "reserve", "sku": "SKU", "buyer": "b", "qty": 1}
        second = {"id": 2, "op": "reserve", "sku": sku, "buyer": "b", "qty": 1}
        parsed = PARSER.requests([second, first, second, first])
        assert parsed is not None
        assert [verdict(item) for item in parsed[2]] == [
            verdict(PARSER.reserve(sku, "b", 1)),
            ("command", Reserve("SKU", "b", 1)),
            verdict(PARSER.reserve(sku, "b", 1)),
            ("command", Reserve("SKU", "b", 1)),
        ]


def test_a_batch_reserve_with_a_field_in_the_place_of_another_gets_the_plain_paths_answer() -> None:
    """Five or six entries that are not exactly the reserve's fields leave the fast path."""
    maps = [
        {"id": 1, "op": "reserve", "sku": "SKU", "buyer": "b", "key": "k"},  # key in qty's place
        {"id": 2, "op": "reserve", "sku": "SKU", "buyer": "b", "qty": 1, "order": "o"},  # not key
        {"id": 3, "op": "reserve", "sku": "SKU", "buyer": "b", "qty": 1, "key": "k"},
        {"id": 4, "op": "reserve", "sku": "SKU", "qty": 1, "key": "k", "x": 1},  # no buyer
    ]
    parsed = PARSER.requests(maps)
    assert parsed is not None
    assert [verdict(item) for item in parsed[2]] == [verdict(PARSER.request(fields)[2]) for fields in maps]
    assert [verdict(item) for item in parsed[2]] == [
        ("refused", (INVALID, "missing field: qty")),
        ("refused", (INVALID, "unknown field: order")),
        ("command", Reserve("SKU", "b", 1, "k")),
        ("refused", (INVALID, "unknown field: x")),
    ]
