"""The book alone: every status, the reserve order of precedence, the invariants,
sale windows, registration, expiry, validation, replay and snapshots.

No trio here: the book is a pure function of (state, command, now).
"""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.book import (
    RECORD_CANCEL,
    RECORD_CONFIRM,
    RECORD_EXPIRE,
    RECORD_HOLD,
    RECORD_PUT_SKU,
    RECORD_REGISTER,
    Book,
    InvariantViolation,
    format_reservation,
    parse_reservation,
)
from protocol.limits import Limits
from protocol.messages import (
    CLOSED,
    HOLD_STATUSES,
    INVALID,
    LIMIT_EXCEEDED,
    NOT_OPEN,
    NOT_REGISTERED,
    RESERVE_PRECEDENCE,
    RESERVE_STATUSES,
    SHARD_COMMANDS,
    UNKNOWN_SKU,
    Cancel,
    Command,
    Confirm,
    GetHold,
    GetSku,
    HoldReply,
    HoldState,
    PutSku,
    Register,
    RegisterReply,
    Reply,
    Reserve,
    SkuReply,
    Status,
    Stock,
    StockReply,
)
from protocol.parser import CommandParser

NOW = 1_700_000_000.0
SKU = "MI-BAND-1"


def apply(book: Book, command: Any, now: float) -> tuple[Any, list[Any]]:
    """Decide one command as the engine does: through the parser (which answers a bad
    field `invalid`), then the book. Returns the reply and the records it wrote."""
    parsed = CommandParser(book.limits).check(command)
    if not isinstance(parsed, SHARD_COMMANDS):
        return parsed, []
    records: list[Any] = []
    (reply,) = book.execute([parsed], now, records)
    return reply, records


def execute(book: Book, commands: list[Any], now: float, records: list[Any]) -> list[Any]:
    """Decide a batch as a shard is handed one: each command parsed, the valid ones decided in order."""
    parser = CommandParser(book.limits)
    parsed = [parser.check(command) for command in commands]
    decided = iter(book.execute([item for item in parsed if isinstance(item, SHARD_COMMANDS)], now, records))
    return [next(decided) if isinstance(item, SHARD_COMMANDS) else item for item in parsed]


def put(book: Book, sku: str = SKU, stock: int = 10, now: float = NOW, **settings_: Any) -> None:
    reply, records = apply(book, PutSku(sku, stock, **settings_), now)
    assert reply.status == "ok", reply
    assert records[-1][0] == RECORD_PUT_SKU


def reserve(book: Book, buyer: str, qty: int = 1, key: str | None = None, sku: str = SKU, now: float = NOW) -> Reply:
    reply, _ = apply(book, Reserve(sku, buyer, qty, key), now)
    assert isinstance(reply, Reply)
    return reply


def hold_of(book: Book, buyer: str, qty: int = 1, key: str | None = None, sku: str = SKU, now: float = NOW) -> str:
    reply = reserve(book, buyer, qty, key, sku, now)
    assert reply.status == "ok", reply
    assert reply.reservation is not None
    return reply.reservation


def stock_of(book: Book, sku: str = SKU, now: float = NOW) -> StockReply:
    reply, records = apply(book, Stock(sku), now)
    assert isinstance(reply, StockReply)
    assert reply.status == "ok", reply
    assert records == []
    return reply


def decide_unchanged(book: Book, command: Command, now: float = NOW) -> Reply | StockReply:
    """Apply `command`, asserting it wrote no record and left the state as it was."""
    before = book.to_snapshot()
    reply, records = apply(book, command, now)
    assert records == [], (command, records)
    assert book.to_snapshot() == before, command
    book.check_invariants()
    return reply


# ------------------------------------------------------------------ reserve statuses


def test_reserve_ok_sets_reservation_expiry_and_remaining() -> None:
    book = Book(shard=3)
    put(book, stock=10, per_buyer_limit=4, hold_seconds=600)
    reply, records = apply(book, Reserve(SKU, "u42", 3, "u42-1"), NOW)
    assert reply.status == "ok"
    assert reply.expires_at == NOW + 600
    assert reply.remaining == 7
    assert reply.error is None
    assert reply.reservation is not None
    assert parse_reservation(reply.reservation) is not None
    assert parse_reservation(reply.reservation)[0] == 3  # the id names its shard
    assert [record[0] for record in records] == [RECORD_HOLD]
    stock = stock_of(book)
    assert (stock.stock, stock.available, stock.held, stock.sold) == (10, 7, 3, 0)


@pytest.mark.parametrize("shard", [0, 3, 9, 255])
def test_a_new_holds_reservation_is_the_one_format_reservation_writes_and_a_key_gives_back(shard: int) -> None:
    book = Book(shard=shard)
    put(book, stock=20, per_buyer_limit=20)
    for number in range(1, 13):
        made, _ = apply(book, Reserve(SKU, "u1", 1, f"k{number}"), NOW)
        assert made.reservation == format_reservation(shard, number)
        assert parse_reservation(made.reservation) == (shard, number)
        again, _ = apply(book, Reserve(SKU, "u1", 1, f"k{number}"), NOW)
        assert again.reservation == made.reservation


def test_each_hold_gets_its_own_reservation() -> None:
    book = Book()
    put(book, stock=10)
    reservations = {hold_of(book, f"buyer-{index}") for index in range(10)}
    assert len(reservations) == 10


def test_reserve_sold_out_when_fewer_units_remain_than_asked() -> None:
    book = Book()
    put(book, stock=3, per_buyer_limit=3)
    assert reserve(book, "a", 2).remaining == 1
    assert decide_unchanged(book, Reserve(SKU, "b", 2)).status == "sold_out"
    assert reserve(book, "b", 1).remaining == 0
    assert decide_unchanged(book, Reserve(SKU, "c", 1)).status == "sold_out"


def test_reserve_limit_exceeded_counts_held_and_sold_units() -> None:
    book = Book()
    put(book, stock=100, per_buyer_limit=3)
    first = hold_of(book, "a", 2)
    assert decide_unchanged(book, Reserve(SKU, "a", 2)).status == "limit_exceeded"
    assert apply(book, Confirm(first, "a"), NOW)[0].status == "ok"
    assert decide_unchanged(book, Reserve(SKU, "a", 2)).status == "limit_exceeded"
    assert reserve(book, "a", 1).status == "ok"
    assert decide_unchanged(book, Reserve(SKU, "a", 1)).status == "limit_exceeded"
    # Another buyer has a limit of its own.
    assert reserve(book, "b", 3).status == "ok"


def test_cancelled_units_count_no_more_against_the_limit() -> None:
    book = Book()
    put(book, stock=100, per_buyer_limit=2)
    first = hold_of(book, "a", 2)
    assert reserve(book, "a", 1).status == "limit_exceeded"
    assert apply(book, Cancel(first, "a"), NOW)[0].status == "ok"
    assert reserve(book, "a", 2).status == "ok"


def test_reserve_unknown_sku() -> None:
    book = Book()
    put(book, sku="other")
    assert decide_unchanged(book, Reserve(SKU, "a", 1)).status == "unknown_sku"


def test_reserve_not_open_and_closed() -> None:
    book = Book()
    put(book, stock=5, opens_at=NOW + 10, closes_at=NOW + 20)
    assert decide_unchanged(book, Reserve(SKU, "a", 1), NOW).status == "not_open"
    assert decide_unchanged(book, Reserve(SKU, "a", 1), NOW + 20).status == "closed"
    assert reserve(book, "a", now=NOW + 15).status == "ok"


def test_reserve_not_registered() -> None:
    book = Book()
    put(book, stock=5, registration_required=True)
    assert apply(book, Register(SKU, ["a"]), NOW)[0].status == "ok"
    assert decide_unchanged(book, Reserve(SKU, "b", 1)).status == "not_registered"
    assert reserve(book, "a").status == "ok"


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (Reserve(SKU, "a", 0), "qty"),
        (Reserve(SKU, "a", -1), "qty"),
        (Reserve(SKU, "a", 1001), "qty"),
        (Reserve(SKU, "a", True), "qty"),
        (Reserve(SKU, "a", 1.0), "qty"),
        (Reserve(SKU, "a", "1"), "qty"),
        (Reserve(SKU, "a", None), "qty"),
        (Reserve(None, "a", 1), "sku"),
        (Reserve("", "a", 1), "sku"),
        (Reserve("x" * 257, "a", 1), "sku"),
        (Reserve(b"MI-BAND-1", "a", 1), "sku"),
        (Reserve(SKU, "", 1), "buyer"),
        (Reserve(SKU, None, 1), "buyer"),
        (Reserve(SKU, 42, 1), "buyer"),
        (Reserve(SKU, "b" * 300, 1), "buyer"),
        (Reserve(SKU, "é" * 129, 1), "buyer"),  # 129 characters, 258 UTF-8 bytes
        (Reserve(SKU, "€" * 86, 1), "buyer"),  # 86 characters, 258 UTF-8 bytes
        (Reserve(SKU, "😀" * 65, 1), "buyer"),  # 65 characters, 260 UTF-8 bytes
        (Reserve(SKU, "a", 1, ""), "key"),
        (Reserve(SKU, "a", 1, 7), "key"),
        (Reserve(SKU, "a", 1, "k" * 257), "key"),
        (Reserve(SKU, "a", 1, "😀" * 65), "key"),
        # A lone surrogate has no UTF-8 form: it could be neither counted nor journaled.
        (Reserve("\udc80", "a", 1), "sku"),
        (Reserve(SKU, "b\ud800", 1), "buyer"),
        (Reserve(SKU, "a", 1, "\udfff"), "key"),
    ],
)
def test_reserve_bad_arguments_are_invalid_and_change_nothing(command: Reserve, field: str) -> None:
    book = Book()
    put(book, stock=10_000, per_buyer_limit=1000)
    reply = decide_unchanged(book, command)
    assert reply.status == "invalid"
    assert reply.error is not None
    assert field in reply.error
    assert reply.reservation is None


@pytest.mark.parametrize(
    "name",
    ["x" * 256, "é" * 128, "😀" * 64, "€" * 85 + "x"],  # exactly 256 UTF-8 bytes each
)
def test_names_of_exactly_the_byte_limit_are_valid(name: str) -> None:
    book = Book()
    put(book, sku=name, stock=5)
    assert reserve(book, name, 1, key=name, sku=name).status == "ok"
    assert apply(book, Register(name, [name]), NOW)[0].status == "ok"


def test_qty_max_itself_is_valid() -> None:
    book = Book(limits=Limits(qty_max=5))
    put(book, stock=10, per_buyer_limit=10)
    assert reserve(book, "a", 5).status == "ok"
    assert decide_unchanged(book, Reserve(SKU, "b", 6)).status == "invalid"


def test_every_reply_of_reserve_uses_a_known_status() -> None:
    book = Book()
    put(book, stock=1, opens_at=NOW, closes_at=NOW + 10, registration_required=True)
    seen = set()
    for now in (NOW - 1, NOW, NOW + 10):
        for command in (Reserve(SKU, "a", 1), Reserve("nope", "a", 1), Reserve(SKU, "a", 0)):
            seen.add(apply(book, command, now)[0].status)
    assert seen <= RESERVE_STATUSES
    assert seen == {"not_open", "not_registered", "closed", "unknown_sku", "invalid"}


# ------------------------------------------------------------------ order of precedence


def crowded_book() -> Book:
    """SKU stock 1, limit 1, and buyer "b" holds that unit: sold out, "b" at its limit."""
    book = Book()
    put(book, stock=1, per_buyer_limit=1, hold_seconds=3600)
    assert reserve(book, "b", 1, key="b-first").status == "ok"
    return book


@pytest.mark.parametrize("position", range(len(RESERVE_PRECEDENCE)))
def test_a_reserve_failing_several_checks_gets_the_first_of_them_in_precedence_order(position: int) -> None:
    """Fail the check at `position` and every one after it that can fail with it; pass the rest."""
    failing = set(RESERVE_PRECEDENCE[position:])
    book = crowded_book()  # sold out, and "b" at its limit
    if NOT_OPEN in failing:
        window = {"opens_at": NOW + 100, "closes_at": None}
    elif CLOSED in failing:
        window = {"opens_at": NOW - 100, "closes_at": NOW}
    else:
        window = {"opens_at": None, "closes_at": None}
    put(book, stock=1, hold_seconds=3600, registration_required=NOT_REGISTERED in failing, **window)
    sku = "nope" if UNKNOWN_SKU in failing else SKU
    buyer = "b" if LIMIT_EXCEEDED in failing else "c"
    qty = 0 if INVALID in failing else 1
    assert decide_unchanged(book, Reserve(sku, buyer, qty)).status == RESERVE_PRECEDENCE[position]


def test_statuses_and_hold_states_are_the_wire_strings() -> None:
    assert [status.value for status in Status] == [
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
    ]
    assert all(status == status.value and repr(status) == repr(status.value) for status in Status)
    assert [state.value for state in HoldState] == ["held", "confirmed", "cancelled", "expired"]
    assert RESERVE_PRECEDENCE[0] == "invalid"
    assert RESERVE_PRECEDENCE[-1] == "sold_out"


def test_precedence_invalid_beats_every_other_check() -> None:
    book = crowded_book()
    put(book, stock=1, opens_at=NOW + 100, closes_at=NOW + 200, registration_required=True)
    # Unknown SKU too, and a bad qty: invalid wins.
    assert decide_unchanged(book, Reserve("nope", "b", 0)).status == "invalid"
    # A used key, not open, not registered, at the limit, sold out, and a bad qty.
    assert decide_unchanged(book, Reserve(SKU, "b", 0, "b-first")).status == "invalid"
    assert decide_unchanged(book, Reserve(SKU, "b", 1, "")).status == "invalid"
    assert decide_unchanged(book, Reserve(SKU, "", 1, "b-first")).status == "invalid"


def test_precedence_unknown_sku_beats_the_rest() -> None:
    book = crowded_book()
    # The key was used on another SKU: keys belong to a SKU, so this SKU is unknown.
    assert decide_unchanged(book, Reserve("nope", "b", 1, "b-first")).status == "unknown_sku"


@pytest.mark.parametrize(
    ("window", "now"),
    [
        ({"opens_at": NOW + 100}, NOW),  # not open
        ({"opens_at": NOW - 100, "closes_at": NOW - 50}, NOW),  # closed
        ({"closes_at": NOW + 10}, NOW + 10),  # closed at the boundary
    ],
)
def test_precedence_a_used_key_returns_its_hold_before_windows_registration_limit_and_stock(
    window: dict[str, float], now: float
) -> None:
    book = crowded_book()
    first = reserve(book, "b", 1, key="b-first")
    put(book, stock=1, registration_required=True, hold_seconds=3600, **window)
    again = decide_unchanged(book, Reserve(SKU, "b", 1, "b-first"), now)
    assert again.status == "ok"
    assert (again.reservation, again.expires_at) == (first.reservation, first.expires_at)
    assert again.remaining == 0
    # Without the key, the same request fails the first of the later checks.
    fresh = decide_unchanged(book, Reserve(SKU, "b", 1, "b-second"), now)
    assert fresh.status in ("not_open", "closed")


def test_precedence_not_open_beats_registration_limit_and_stock() -> None:
    book = crowded_book()
    put(book, stock=1, opens_at=NOW + 100, registration_required=True, hold_seconds=3600)
    assert decide_unchanged(book, Reserve(SKU, "b", 1)).status == "not_open"


def test_precedence_closed_beats_registration_limit_and_stock() -> None:
    book = crowded_book()
    put(book, stock=1, opens_at=NOW - 100, closes_at=NOW, registration_required=True, hold_seconds=3600)
    assert decide_unchanged(book, Reserve(SKU, "b", 1)).status == "closed"


def test_precedence_not_registered_beats_limit_and_stock() -> None:
    book = crowded_book()
    put(book, stock=1, registration_required=True, hold_seconds=3600)
    assert decide_unchanged(book, Reserve(SKU, "b", 1)).status == "not_registered"


def test_precedence_limit_exceeded_beats_sold_out() -> None:
    book = crowded_book()
    assert decide_unchanged(book, Reserve(SKU, "b", 1)).status == "limit_exceeded"


def test_precedence_sold_out_is_the_last_check() -> None:
    book = crowded_book()
    put(book, stock=1, registration_required=True, hold_seconds=3600)
    assert apply(book, Register(SKU, ["c"]), NOW)[0].status == "ok"
    assert decide_unchanged(book, Reserve(SKU, "c", 1)).status == "sold_out"


# ------------------------------------------------------------------ idempotency keys


def test_a_used_key_returns_the_same_hold_and_reserves_nothing_more() -> None:
    book = Book()
    put(book, stock=10, per_buyer_limit=5, hold_seconds=900)
    first = reserve(book, "a", 2, key="k")
    again = decide_unchanged(book, Reserve(SKU, "a", 2, "k"), NOW + 5)
    assert again.status == "ok"
    assert again.reservation == first.reservation
    assert again.expires_at == first.expires_at == NOW + 900
    assert again.remaining == 8
    assert stock_of(book).held == 2


def test_a_used_key_with_another_buyer_or_qty_is_invalid() -> None:
    book = Book()
    put(book, stock=10, per_buyer_limit=5)
    hold_of(book, "a", 2, key="k")
    for command in (Reserve(SKU, "b", 2, "k"), Reserve(SKU, "a", 1, "k"), Reserve(SKU, "a", 3, "k")):
        reply = decide_unchanged(book, command)
        assert reply.status == "invalid"
        assert reply.error


def test_a_used_key_returns_its_hold_whatever_became_of_it() -> None:
    book = Book()
    put(book, stock=10, per_buyer_limit=5, hold_seconds=60)
    confirmed = hold_of(book, "a", 1, key="confirmed")
    cancelled = hold_of(book, "a", 1, key="cancelled")
    expired = hold_of(book, "a", 1, key="expired")
    assert apply(book, Confirm(confirmed, "a"), NOW + 1)[0].status == "ok"
    assert apply(book, Cancel(cancelled, "a"), NOW + 1)[0].status == "ok"
    later = NOW + 61
    book.expire_due(later, [])
    for key, reservation in (("confirmed", confirmed), ("cancelled", cancelled), ("expired", expired)):
        again = decide_unchanged(book, Reserve(SKU, "a", 1, key), later)
        assert again.status == "ok"
        assert again.reservation == reservation
        assert again.expires_at == NOW + 60
    # confirm tells the caller what became of each.
    assert apply(book, Confirm(confirmed, "a"), later)[0].status == "ok"
    assert apply(book, Confirm(cancelled, "a"), later)[0].status == "conflict"
    assert apply(book, Confirm(expired, "a"), later)[0].status == "expired"
    assert stock_of(book, now=later).sold == 1


def test_an_answer_that_made_no_hold_leaves_no_key_behind() -> None:
    book = Book()
    put(book, stock=0, per_buyer_limit=5)
    assert decide_unchanged(book, Reserve(SKU, "a", 2, "k")).status == "sold_out"
    put(book, stock=10, per_buyer_limit=5)
    # The key is free: another qty is not "another use" of it.
    assert reserve(book, "a", 3, key="k").status == "ok"


def test_keys_belong_to_their_sku() -> None:
    book = Book()
    put(book, sku="one", stock=5)
    put(book, sku="two", stock=5)
    first = hold_of(book, "a", key="k", sku="one")
    second = hold_of(book, "a", key="k", sku="two")
    assert first != second


def test_no_key_makes_a_new_hold_each_time() -> None:
    book = Book()
    put(book, stock=5, per_buyer_limit=5)
    assert hold_of(book, "a") != hold_of(book, "a")
    assert stock_of(book).held == 2


# ------------------------------------------------------------------ a hold ends exactly once


@pytest.fixture
def held() -> tuple[Book, str]:
    book = Book()
    put(book, stock=5, per_buyer_limit=5, hold_seconds=60)
    return book, hold_of(book, "a", 2)


def test_confirm_sells_the_units_and_a_second_confirm_is_ok(held: tuple[Book, str]) -> None:
    book, reservation = held
    reply, records = apply(book, Confirm(reservation, "a"), NOW + 1)
    assert reply.status == "ok"
    assert [record[0] for record in records] == [RECORD_CONFIRM]
    assert decide_unchanged(book, Confirm(reservation, "a"), NOW + 2).status == "ok"
    stock = stock_of(book)
    assert (stock.held, stock.sold, stock.available) == (0, 2, 3)


def test_cancel_returns_the_units_and_a_second_cancel_is_ok(held: tuple[Book, str]) -> None:
    book, reservation = held
    reply, records = apply(book, Cancel(reservation, "a"), NOW + 1)
    assert reply.status == "ok"
    assert [record[0] for record in records] == [RECORD_CANCEL]
    assert decide_unchanged(book, Cancel(reservation, "a"), NOW + 2).status == "ok"
    stock = stock_of(book)
    assert (stock.held, stock.sold, stock.available) == (0, 0, 5)


def test_cancel_after_confirm_is_conflict(held: tuple[Book, str]) -> None:
    book, reservation = held
    assert apply(book, Confirm(reservation, "a"), NOW)[0].status == "ok"
    assert decide_unchanged(book, Cancel(reservation, "a")).status == "conflict"
    assert stock_of(book).sold == 2


def test_confirm_after_cancel_is_conflict(held: tuple[Book, str]) -> None:
    book, reservation = held
    assert apply(book, Cancel(reservation, "a"), NOW)[0].status == "ok"
    assert decide_unchanged(book, Confirm(reservation, "a")).status == "conflict"
    assert stock_of(book).sold == 0


def test_a_wrong_buyer_hears_not_found_exactly_as_for_an_unknown_id(held: tuple[Book, str]) -> None:
    book, reservation = held
    unknown = decide_unchanged(book, Confirm("0-999", "a"))
    for command in (Confirm(reservation, "b"), Cancel(reservation, "b")):
        assert decide_unchanged(book, command) == unknown
    assert unknown == Reply("not_found")
    assert decide_unchanged(book, Cancel("0-999", "a")) == unknown
    assert stock_of(book).held == 2


@pytest.mark.parametrize("reservation", ["1-1", "abc", "0-", "-1", "0-x", "0-1-1", "٣-1", "0-" + "9" * 30])
def test_reservation_ids_that_are_not_this_shards_are_not_found(held: tuple[Book, str], reservation: str) -> None:
    book, _ = held
    assert decide_unchanged(book, Confirm(reservation, "a")).status == "not_found"


@pytest.mark.parametrize(
    "command",
    [
        Confirm("", "a"),
        Confirm(None, "a"),
        Confirm("0-1", ""),
        Confirm("0-1", 5),
        Cancel("0-1", None),
        Cancel("0-1\udc80", "a"),
        Confirm("0-1", "\udc80"),
    ],
)
def test_confirm_and_cancel_with_bad_arguments_are_invalid(held: tuple[Book, str], command: Command) -> None:
    book, _ = held
    reply = decide_unchanged(book, command)
    assert reply.status == "invalid"
    assert reply.error


def test_confirm_after_expiry_is_expired_and_writes_the_expiry_once(held: tuple[Book, str]) -> None:
    book, reservation = held
    reply, records = apply(book, Confirm(reservation, "a"), NOW + 60)
    assert reply.status == "expired"
    assert [record[0] for record in records] == [RECORD_EXPIRE]
    assert decide_unchanged(book, Confirm(reservation, "a"), NOW + 61).status == "expired"
    assert decide_unchanged(book, Cancel(reservation, "a"), NOW + 61).status == "expired"
    stock = stock_of(book, now=NOW + 61)
    assert (stock.held, stock.sold, stock.available) == (0, 0, 5)


def test_cancel_after_expiry_is_expired(held: tuple[Book, str]) -> None:
    book, reservation = held
    assert book.expire_due(NOW + 60, []) == 1
    assert decide_unchanged(book, Cancel(reservation, "a"), NOW + 60).status == "expired"


def test_confirm_just_before_expiry_is_ok(held: tuple[Book, str]) -> None:
    book, reservation = held
    assert apply(book, Confirm(reservation, "a"), math.nextafter(NOW + 60, 0))[0].status == "ok"
    assert book.expire_due(NOW + 1000, []) == 0
    assert stock_of(book, now=NOW + 1000).sold == 2


def test_every_reply_of_confirm_and_cancel_uses_a_known_status(held: tuple[Book, str]) -> None:
    book, reservation = held
    statuses = {
        apply(book, command, now)[0].status
        for command, now in [
            (Confirm("0-77", "a"), NOW),
            (Confirm(reservation, "a"), NOW),
            (Cancel(reservation, "a"), NOW),
            (Confirm("", "a"), NOW),
        ]
    }
    book2 = Book()
    put(book2, stock=1)
    statuses.add(apply(book2, Confirm(hold_of(book2, "a"), "a"), NOW + 10_000)[0].status)
    assert statuses <= HOLD_STATUSES
    assert statuses == {"ok", "not_found", "conflict", "invalid", "expired"}


# ------------------------------------------------------------------ sale windows


def test_opens_at_is_the_first_moment_of_the_sale() -> None:
    book = Book()
    opens_at = NOW + 100
    put(book, stock=5, per_buyer_limit=5, opens_at=opens_at)
    assert decide_unchanged(book, Reserve(SKU, "a", 1), math.nextafter(opens_at, 0)).status == "not_open"
    assert reserve(book, "a", now=opens_at).status == "ok"


def test_closes_at_is_the_first_moment_after_the_sale() -> None:
    book = Book()
    closes_at = NOW + 100
    put(book, stock=5, per_buyer_limit=5, closes_at=closes_at)
    assert reserve(book, "a", now=math.nextafter(closes_at, 0)).status == "ok"
    assert decide_unchanged(book, Reserve(SKU, "a", 1), closes_at).status == "closed"
    assert decide_unchanged(book, Reserve(SKU, "a", 1), closes_at + 1).status == "closed"


def test_a_window_can_be_moved_by_put_sku() -> None:
    book = Book()
    put(book, stock=5, per_buyer_limit=5, opens_at=NOW + 100)
    assert reserve(book, "a").status == "not_open"
    put(book, stock=5, per_buyer_limit=5, opens_at=NOW)
    assert reserve(book, "a").status == "ok"
    put(book, stock=5, per_buyer_limit=5, opens_at=NOW - 10, closes_at=NOW)
    assert reserve(book, "a").status == "closed"


# ------------------------------------------------------------------ registration


def test_registration_lets_only_registered_buyers_reserve() -> None:
    book = Book()
    put(book, stock=5, registration_required=True)
    reply, records = apply(book, Register(SKU, ["a", "b", "a"]), NOW)
    assert reply.status == "ok"
    assert records == [(RECORD_REGISTER, SKU, ["a", "b"])]
    assert reserve(book, "a").status == "ok"
    assert reserve(book, "b").status == "ok"
    assert reserve(book, "c").status == "not_registered"


def test_registering_again_writes_nothing() -> None:
    book = Book()
    put(book, stock=5, registration_required=True)
    assert apply(book, Register(SKU, ("a", "b")), NOW)[0].status == "ok"
    assert decide_unchanged(book, Register(SKU, ["b", "a"])).status == "ok"
    assert decide_unchanged(book, Register(SKU, [])).status == "ok"
    reply, records = apply(book, Register(SKU, ["b", "c"]), NOW)
    assert reply.status == "ok"
    assert records == [(RECORD_REGISTER, SKU, ["c"])]


def test_registration_matters_only_when_required() -> None:
    book = Book()
    put(book, stock=5)
    assert reserve(book, "stranger").status == "ok"
    apply(book, Register(SKU, ["a"]), NOW)
    put(book, stock=5, registration_required=True)
    assert reserve(book, "a").status == "ok"
    assert reserve(book, "another-stranger").status == "not_registered"


def test_register_an_unknown_sku() -> None:
    book = Book()
    assert decide_unchanged(book, Register(SKU, ["a"])).status == "unknown_sku"


@pytest.mark.parametrize(
    "buyers",
    [
        "a",  # a string is not a list of buyers
        None,
        {"a"},
        ["a", ""],
        ["a", 5],
        ["a", "x" * 257],
        ["a", "\udc80"],
        [f"b{index}" for index in range(11)],  # over register_buyers_max
    ],
)
def test_register_bad_buyers_is_invalid_and_registers_no_one(buyers: Any) -> None:
    book = Book(limits=Limits(register_buyers_max=10))
    put(book, stock=5, registration_required=True)
    reply = decide_unchanged(book, Register(SKU, buyers))
    assert reply.status == "invalid"
    assert reply.error
    assert reserve(book, "a").status == "not_registered"


def test_register_at_the_buyer_bound_is_ok() -> None:
    book = Book(limits=Limits(register_buyers_max=10))
    put(book, stock=20, registration_required=True)
    assert apply(book, Register(SKU, [f"b{index}" for index in range(10)]), NOW)[0].status == "ok"
    assert reserve(book, "b9").status == "ok"


@pytest.mark.parametrize("sku", ["", None, "x" * 257])
def test_register_with_a_bad_sku_is_invalid(sku: Any) -> None:
    book = Book()
    assert decide_unchanged(book, Register(sku, ["a"])).status == "invalid"


# ------------------------------------------------------------------ expiry


def test_expire_due_ends_the_holds_whose_time_ran_out() -> None:
    book = Book()
    put(book, stock=10, per_buyer_limit=5, hold_seconds=60)
    early = hold_of(book, "a", 2)
    late = hold_of(book, "b", 3, now=NOW + 30)
    assert book.next_expiry() == NOW + 60
    assert book.expire_due(math.nextafter(NOW + 60, 0), []) == 0
    records: list[tuple[Any, ...]] = []
    assert book.expire_due(NOW + 60, records) == 1  # exactly at expires_at
    assert records == [(RECORD_EXPIRE, parse_reservation(early)[1], NOW + 60)]
    assert book.next_expiry() == NOW + 90
    stock = stock_of(book, now=NOW + 60)
    assert (stock.held, stock.available) == (3, 7)
    # The expired units no longer count against the buyer's limit.
    assert reserve(book, "a", 5, now=NOW + 60).status == "ok"
    assert apply(book, Confirm(late, "b"), NOW + 61)[0].status == "ok"
    book.check_invariants()


def test_execute_at_a_later_now_expires_due_holds_first() -> None:
    book = Book()
    put(book, stock=1, hold_seconds=60)
    reservation = hold_of(book, "a")
    records: list[tuple[Any, ...]] = []
    (reply,) = execute(book, [Reserve(SKU, "b", 1)], NOW + 60, records)
    assert reply.status == "ok"  # the unit came back before the reserve was decided
    assert [record[0] for record in records] == [RECORD_EXPIRE, RECORD_HOLD]
    assert apply(book, Confirm(reservation, "a"), NOW + 61)[0].status == "expired"


def test_stock_at_a_later_now_shows_expired_units_available() -> None:
    book = Book()
    put(book, stock=3, per_buyer_limit=3, hold_seconds=60)
    hold_of(book, "a", 3)
    records: list[tuple[Any, ...]] = []
    (reply,) = execute(book, [Stock(SKU)], NOW + 100, records)
    assert isinstance(reply, StockReply)
    assert (reply.held, reply.available) == (0, 3)
    assert [record[0] for record in records] == [RECORD_EXPIRE]


def test_ended_holds_never_expire() -> None:
    book = Book()
    put(book, stock=3, per_buyer_limit=3, hold_seconds=60)
    confirmed = hold_of(book, "a")
    cancelled = hold_of(book, "a")
    apply(book, Confirm(confirmed, "a"), NOW)
    apply(book, Cancel(cancelled, "a"), NOW)
    assert book.next_expiry() is None
    assert book.expire_due(NOW + 10_000, []) == 0
    assert stock_of(book).sold == 1


# ------------------------------------------------------------------ put_sku


def test_put_sku_creates_and_reports_stock() -> None:
    book = Book()
    put(book, stock=7)
    stock = stock_of(book)
    assert (stock.stock, stock.available, stock.held, stock.sold) == (7, 7, 0, 0)
    assert decide_unchanged(book, Stock("nope")).status == "unknown_sku"


def test_put_sku_restocks_to_the_total_given() -> None:
    book = Book()
    put(book, stock=2, per_buyer_limit=2)
    reservation = hold_of(book, "a")
    hold_of(book, "b")
    apply(book, Confirm(reservation, "a"), NOW)
    assert reserve(book, "c").status == "sold_out"
    put(book, stock=5, per_buyer_limit=2)
    stock = stock_of(book)
    assert (stock.stock, stock.available, stock.held, stock.sold) == (5, 3, 1, 1)
    assert reserve(book, "c", 2).status == "ok"


def test_put_sku_may_lower_stock_to_held_plus_sold_but_not_below() -> None:
    book = Book()
    put(book, stock=10, per_buyer_limit=5)
    reservation = hold_of(book, "a", 3)
    hold_of(book, "b", 2)
    apply(book, Confirm(reservation, "a"), NOW)
    reply = decide_unchanged(book, PutSku(SKU, 4, per_buyer_limit=5))
    assert reply.status == "invalid"
    assert reply.error
    put(book, stock=5, per_buyer_limit=5)
    assert stock_of(book).available == 0


def test_put_sku_cannot_set_a_limit_below_a_buyers_units() -> None:
    book = Book()
    put(book, stock=10, per_buyer_limit=5)
    hold_of(book, "a", 3)
    reply = decide_unchanged(book, PutSku(SKU, 10, per_buyer_limit=2))
    assert reply.status == "invalid"
    assert reply.error
    put(book, stock=10, per_buyer_limit=3)
    assert reserve(book, "a", 1).status == "limit_exceeded"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"stock": -1}, "stock"),
        ({"stock": True}, "stock"),
        ({"stock": 1.0}, "stock"),
        ({"stock": "10"}, "stock"),
        ({"stock": None}, "stock"),
        ({"stock": 1_000_000_001}, "stock"),
        ({"per_buyer_limit": 0}, "per_buyer_limit"),
        ({"per_buyer_limit": -1}, "per_buyer_limit"),
        ({"per_buyer_limit": True}, "per_buyer_limit"),
        ({"per_buyer_limit": 2.5}, "per_buyer_limit"),
        ({"hold_seconds": 0}, "hold_seconds"),
        ({"hold_seconds": -5}, "hold_seconds"),
        ({"hold_seconds": math.nan}, "hold_seconds"),
        ({"hold_seconds": math.inf}, "hold_seconds"),
        ({"hold_seconds": True}, "hold_seconds"),
        ({"hold_seconds": "900"}, "hold_seconds"),
        ({"hold_seconds": 400 * 86400}, "hold_seconds"),
        ({"opens_at": math.nan}, "opens_at"),
        ({"opens_at": -1}, "opens_at"),
        ({"opens_at": "soon"}, "opens_at"),
        ({"opens_at": True}, "opens_at"),
        ({"closes_at": math.nan}, "closes_at"),
        ({"closes_at": math.inf}, "closes_at"),
        ({"opens_at": NOW + 10, "closes_at": NOW + 10}, "closes_at"),
        ({"opens_at": NOW + 10, "closes_at": NOW + 5}, "closes_at"),
        ({"registration_required": 1}, "registration_required"),
        ({"registration_required": None}, "registration_required"),
        ({"registration_required": "yes"}, "registration_required"),
        ({"sku": ""}, "sku"),
        ({"sku": None}, "sku"),
        ({"sku": 12}, "sku"),
        ({"sku": "s" * 257}, "sku"),
        ({"sku": "é" * 129}, "sku"),
        ({"sku": "😀" * 65}, "sku"),
        ({"sku": "\ud800"}, "sku"),
    ],
)
def test_put_sku_bad_arguments_are_invalid_and_change_nothing(overrides: dict[str, Any], field: str) -> None:
    book = Book()
    put(book, stock=10, per_buyer_limit=2)
    hold_of(book, "a")
    arguments: dict[str, Any] = {"sku": SKU, "stock": 20, "per_buyer_limit": 3}
    arguments.update(overrides)
    reply = decide_unchanged(book, PutSku(**arguments))
    assert reply.status == "invalid"
    assert reply.error is not None
    assert field in reply.error


def test_put_sku_accepts_float_times_and_zero_stock() -> None:
    book = Book()
    put(book, stock=0, hold_seconds=0.5, opens_at=NOW - 0.25, closes_at=NOW + 0.75)
    assert reserve(book, "a").status == "sold_out"
    put(book, stock=1, hold_seconds=0.5, opens_at=NOW - 0.25, closes_at=NOW + 0.75)
    assert reserve(book, "a").expires_at == NOW + 0.5


@pytest.mark.parametrize("sku", ["", None, "x" * 257])
def test_stock_with_a_bad_sku_is_invalid(sku: Any) -> None:
    book = Book()
    reply = decide_unchanged(book, Stock(sku))
    assert reply.status == "invalid"
    assert reply.error


def test_an_unknown_command_is_invalid() -> None:
    book = Book()
    reply = decide_unchanged(book, "reserve please")  # type: ignore[arg-type]
    assert reply.status == "invalid"


# ------------------------------------------------------------------ tampering


def tampered_books() -> list[tuple[str, Book]]:
    """Books each broken in one way that check_invariants must notice."""

    def fresh() -> Book:
        book = Book()
        put(book, stock=4, per_buyer_limit=2)
        confirmed = hold_of(book, "a", key="k1")
        hold_of(book, "b", 2, key="k2")
        apply(book, Confirm(confirmed, "a"), NOW)
        return book

    cases = []
    book = fresh()
    book.skus[SKU].held += 1
    cases.append(("held count off", book))
    book = fresh()
    book.skus[SKU].sold -= 1
    cases.append(("sold count off", book))
    book = fresh()
    book.skus[SKU].stock = 2
    cases.append(("held + sold above stock", book))
    book = fresh()
    book.skus[SKU].per_buyer_limit = 1
    cases.append(("buyer over the limit", book))
    book = fresh()
    book.skus[SKU].buyer_units["a"] = 2
    cases.append(("buyer units off", book))
    book = fresh()
    del book.skus[SKU].buyer_units["b"]
    cases.append(("buyer units forgotten", book))
    book = fresh()
    book.skus[SKU].keys["k2"] = 1
    cases.append(("key points to another hold", book))
    book = fresh()
    book.holds[2].state = HoldState.CANCELLED if book.holds[2].state is HoldState.HELD else HoldState.HELD
    cases.append(("hold state changed", book))
    book = fresh()
    book.holds[7] = book.holds.pop(2)
    cases.append(("hold filed under another number", book))
    return cases


@pytest.mark.parametrize(("case", "book"), tampered_books(), ids=[case for case, _ in tampered_books()])
def test_check_invariants_raises_on_a_tampered_book(case: str, book: Book) -> None:
    with pytest.raises(InvariantViolation):
        book.check_invariants()


def test_check_invariants_passes_on_the_untampered_book() -> None:
    book = Book()
    put(book, stock=4, per_buyer_limit=2)
    hold_of(book, "a", key="k1")
    book.check_invariants()


def test_replay_refuses_records_that_break_an_invariant() -> None:
    book = Book()
    put(book, stock=1, per_buyer_limit=5)
    reply, records = apply(book, Reserve(SKU, "a", 1, "k"), NOW)
    assert reply.status == "ok"
    hold_record = records[0]
    fresh = Book()
    fresh.replay([(RECORD_PUT_SKU, SKU, 1, 5, 900, None, None, False)])
    oversold = (RECORD_HOLD, 1, SKU, "a", 2, NOW, NOW + 900, None)
    with pytest.raises(InvariantViolation):
        Book().replay([(RECORD_PUT_SKU, SKU, 1, 5, 900, None, None, False), oversold])
    fresh.replay([hold_record])
    with pytest.raises(InvariantViolation):
        fresh.replay([(RECORD_CONFIRM, 1, NOW), (RECORD_CANCEL, 1, NOW)])  # a hold ends twice
    second_hold = (RECORD_HOLD, 2, SKU, "b", 1, NOW, NOW + 900, "k")
    book2 = Book()
    book2.replay([(RECORD_PUT_SKU, SKU, 5, 5, 900, None, None, False), hold_record])
    with pytest.raises(InvariantViolation):
        book2.replay([second_hold])  # one key, two holds
    with pytest.raises(InvariantViolation):
        Book().replay([(99, "?")])


def test_from_snapshot_refuses_a_snapshot_that_oversells() -> None:
    book = Book()
    put(book, stock=3, per_buyer_limit=3)
    hold_of(book, "a", 3)
    snapshot = book.to_snapshot()
    snapshot["skus"][0][1] = 2  # stock below the units held
    with pytest.raises(InvariantViolation):
        Book.from_snapshot(snapshot)


# ------------------------------------------------------------------ replay and snapshots

BUYERS = ["a", "b", "c", "d", "e"]
SKUS = ["one", "two", "three"]


def random_command(generator: random.Random, book: Book) -> Command:
    """Any command, mostly well formed, sometimes not, over a small world so that they collide."""
    roll = generator.random()
    sku = generator.choice([*SKUS, "unknown"] if generator.random() < 0.05 else SKUS)
    buyer = generator.choice(BUYERS)
    if roll < 0.45:
        qty = generator.choice([1, 1, 1, 2, 3, 0 if generator.random() < 0.1 else 1])
        key = generator.choice([None, None, f"key-{generator.randrange(8)}"])
        return Reserve(sku, buyer, qty, key)
    if roll < 0.70:
        hold_number = generator.randint(1, max(1, book.last_hold_number + 1))
        owner = book.holds[hold_number].buyer if hold_number in book.holds and generator.random() < 0.8 else buyer
        ending = Confirm if generator.random() < 0.5 else Cancel
        return ending(f"0-{hold_number}", owner)
    if roll < 0.82:
        state = book.skus.get(sku)
        floor = state.held + state.sold if state is not None and generator.random() < 0.9 else 0
        opens_at = generator.choice([None, None, NOW + generator.randrange(0, 400)])
        closes_at = generator.choice([None, None, (opens_at or NOW) + generator.randrange(1, 2000)])
        return PutSku(
            sku,
            floor + generator.randrange(0, 6),
            generator.choice([1, 2, 3, 5]),
            generator.choice([30, 60, 300, 0.5]),
            opens_at,
            closes_at,
            generator.random() < 0.3,
        )
    if roll < 0.92:
        return Register(sku, generator.sample(BUYERS, generator.randrange(0, 4)))
    return Stock(sku)


def run_random_book(seed: int, steps: int) -> tuple[Book, list[tuple[Any, ...]]]:
    """Drive a book with random batches of commands at rising times; returns it and its records."""
    generator = random.Random(seed)
    book = Book()
    records: list[tuple[Any, ...]] = []
    now = NOW
    for _ in range(steps):
        now += generator.choice([0, 0, 0.25, 1, 10, 45, 120])
        commands = [random_command(generator, book) for _ in range(generator.choice([1, 1, 1, 2, 5]))]
        replies = execute(book, commands, now, records)
        assert len(replies) == len(commands), f"seed={seed}"
        for command, reply in zip(commands, replies, strict=True):
            allowed = HOLD_STATUSES if isinstance(command, (Confirm, Cancel)) else RESERVE_STATUSES
            assert reply.status in allowed | {"unknown_sku"}, f"seed={seed}: {command} -> {reply}"
            assert reply.status != "busy", f"seed={seed}"
        book.check_invariants()
    return book, records


def through_msgpack(value: Any, use_list: bool) -> Any:
    """As the journal and snapshot files carry it: tuples come back as lists or tuples."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, use_list=use_list)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**63 - 1))
def test_replaying_the_records_rebuilds_the_same_book(seed: int) -> None:
    # Replays from its seed: run_random_book(seed, 120).
    book, records = run_random_book(seed, 120)
    replayed = Book()
    replayed.replay(through_msgpack(records, use_list=False))
    replayed.check_invariants()
    assert replayed.to_snapshot() == book.to_snapshot(), f"seed={seed}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**63 - 1))
def test_a_snapshot_round_trip_gives_a_book_that_decides_the_same(seed: int) -> None:
    # Replays from its seed: run_random_book(seed, 80).
    book, _ = run_random_book(seed, 80)
    snapshot = book.to_snapshot()
    restored = Book.from_snapshot(through_msgpack(snapshot, use_list=True))
    assert restored.to_snapshot() == snapshot, f"seed={seed}"
    assert restored.next_expiry() == book.next_expiry(), f"seed={seed}"
    # Both go on deciding alike: the derived state (keys, buyer units, expiry) came back too.
    generator = random.Random(seed ^ 0x5EED)
    now = NOW + 80 * 200
    for _ in range(60):
        now += generator.choice([0, 1, 30, 90])
        command = random_command(generator, book)
        original_records: list[tuple[Any, ...]] = []
        restored_records: list[tuple[Any, ...]] = []
        original = execute(book, [command], now, original_records)
        again = execute(restored, [command], now, restored_records)
        assert again == original, f"seed={seed}: {command}"
        assert restored_records == original_records, f"seed={seed}: {command}"
    assert restored.to_snapshot() == book.to_snapshot(), f"seed={seed}"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**63 - 1), cut=st.integers(min_value=0, max_value=100))
def test_a_snapshot_then_the_records_after_it_rebuild_the_same_book(seed: int, cut: int) -> None:
    # Replays from its seed and cut: run_random_book(seed, 100), split at cut percent.
    book, records = run_random_book(seed, 100)
    # Rebuild the book as far as `cut` percent of its records, snapshot it, replay the rest.
    split = len(records) * cut // 100
    partial = Book()
    partial.replay(records[:split])
    restored = Book.from_snapshot(through_msgpack(partial.to_snapshot(), use_list=True))
    restored.replay(records[split:])
    restored.check_invariants()
    assert restored.to_snapshot() == book.to_snapshot(), f"seed={seed} cut={cut}"


def test_a_snapshot_of_an_empty_book_round_trips() -> None:
    book = Book(shard=5)
    restored = Book.from_snapshot(book.to_snapshot())
    assert restored.shard == 5
    assert restored.to_snapshot() == book.to_snapshot()


# ------------------------------------------------------------------ put_sku changes only what it names


def sku_settings(book: Book, sku: str = SKU, now: float = NOW) -> SkuReply:
    reply = decide_unchanged(book, GetSku(sku), now)
    assert isinstance(reply, SkuReply)
    assert reply.status == "ok", reply
    return reply


def test_a_restock_keeps_registration_and_the_sale_window() -> None:
    """The bug: a restock naming only the stock reset every other setting to its default,
    and a registration-only sale that had not opened yet let a stranger hold a unit."""
    book = Book()
    put(book, stock=10, registration_required=True, opens_at=NOW + 20, per_buyer_limit=2, hold_seconds=120)
    reply, _ = apply(book, PutSku(SKU, stock=2100), NOW)
    assert reply.status == "ok"
    settings_ = sku_settings(book)
    assert (settings_.stock, settings_.registration_required, settings_.opens_at) == (2100, True, NOW + 20)
    assert (settings_.per_buyer_limit, settings_.hold_seconds) == (2, 120)
    assert reserve(book, "stranger", now=NOW + 30).status == "not_registered"
    assert reserve(book, "stranger", now=NOW + 1).status == "not_open"


def test_put_sku_needs_a_stock_only_to_create() -> None:
    book = Book()
    reply = decide_unchanged(book, PutSku(SKU, per_buyer_limit=2))
    assert (reply.status, "stock" in (reply.error or "")) == ("invalid", True)
    put(book, stock=5)
    assert apply(book, PutSku(SKU, hold_seconds=30), NOW)[0].status == "ok"
    assert (sku_settings(book).stock, sku_settings(book).hold_seconds) == (5, 30)


def test_a_new_sku_takes_the_defaults_for_what_is_left_out() -> None:
    book = Book()
    put(book, stock=5)
    settings_ = sku_settings(book)
    assert (settings_.per_buyer_limit, settings_.hold_seconds) == (1, 900)
    assert (settings_.opens_at, settings_.closes_at, settings_.registration_required) == (None, None, False)


def test_an_explicit_null_clears_opens_at_and_closes_at() -> None:
    book = Book()
    put(book, stock=5, opens_at=NOW + 100, closes_at=NOW + 200)
    assert apply(book, PutSku(SKU, opens_at=None), NOW)[0].status == "ok"
    assert (sku_settings(book).opens_at, sku_settings(book).closes_at) == (None, NOW + 200)
    assert apply(book, PutSku(SKU, closes_at=None), NOW)[0].status == "ok"
    assert sku_settings(book).closes_at is None


def test_a_restock_without_a_limit_is_not_refused_for_the_old_default() -> None:
    """The bug: a restock leaving per_buyer_limit out was checked against the default of 1."""
    book = Book()
    put(book, stock=10, per_buyer_limit=3)
    hold_of(book, "u1", qty=3)
    reply, _ = apply(book, PutSku(SKU, stock=20), NOW)
    assert reply.status == "ok", reply
    assert sku_settings(book).per_buyer_limit == 3


def test_a_settings_change_is_checked_against_the_merged_settings() -> None:
    book = Book()
    put(book, stock=5, opens_at=NOW + 100)
    reply = decide_unchanged(book, PutSku(SKU, closes_at=NOW + 50))
    assert reply.status == "invalid"


def test_partial_put_sku_replays_to_the_same_settings() -> None:
    book = Book()
    records: list[Any] = []
    for command in (
        PutSku(SKU, 5, registration_required=True, opens_at=NOW + 1),
        PutSku(SKU, stock=7),
        PutSku(SKU, per_buyer_limit=2, closes_at=NOW + 99),
        PutSku(SKU, opens_at=None),
    ):
        execute(book, [command], NOW, records)
    again = Book()
    again.replay(records)
    assert again.to_snapshot() == book.to_snapshot()
    assert sku_settings(again) == sku_settings(book)


# ------------------------------------------------------------------ get_sku, register counts


def test_get_sku_answers_every_setting_the_counts_and_whether_it_is_open() -> None:
    book = Book()
    put(book, stock=10, per_buyer_limit=2, hold_seconds=600, opens_at=NOW + 10, closes_at=NOW + 100)
    apply(book, Register(SKU, ["a", "b"]), NOW)
    hold_of(book, "x", now=NOW + 10)
    expected = SkuReply(
        "ok",
        sku=SKU,
        stock=10,
        available=9,
        held=1,
        sold=0,
        per_buyer_limit=2,
        hold_seconds=600,
        opens_at=NOW + 10,
        closes_at=NOW + 100,
        registration_required=False,
        registered=2,
        open=True,
        shard=0,
    )
    assert sku_settings(book, now=NOW + 10) == expected
    assert sku_settings(Book.from_snapshot({**book.to_snapshot(), "shard": 5}), now=NOW + 10).shard == 5
    assert sku_settings(book, now=NOW + 9.5).open is False
    assert sku_settings(book, now=NOW + 100).open is False
    assert decide_unchanged(book, GetSku("NOPE")) == SkuReply("unknown_sku")
    assert decide_unchanged(book, GetSku("")).status == "invalid"


def test_register_counts_new_buyers_and_those_registered_already() -> None:
    book = Book()
    put(book, stock=10, registration_required=True)
    first, _ = apply(book, Register(SKU, ["a", "b", "b"]), NOW)
    assert first == RegisterReply("ok", registered=2, already=0)
    second, _ = apply(book, Register(SKU, ["b", "c"]), NOW)
    assert second == RegisterReply("ok", registered=1, already=1)
    assert decide_unchanged(book, Register(SKU, ["a", "c"])) == RegisterReply("ok", registered=0, already=2)
    assert decide_unchanged(book, Register("NOPE", ["a"])) == RegisterReply("unknown_sku")


# ------------------------------------------------------------------ orders and the hold op


def test_confirm_with_an_order_keeps_it_and_a_retry_must_name_the_same_order() -> None:
    book = Book()
    put(book, stock=5)
    reservation = hold_of(book, "u1")
    reply, records = apply(book, Confirm(reservation, "u1", "po-77"), NOW + 1)
    assert reply.status == "ok"
    assert records == [(RECORD_CONFIRM, 1, NOW + 1, "po-77")]
    assert decide_unchanged(book, Confirm(reservation, "u1", "po-77")).status == "ok"
    assert decide_unchanged(book, Confirm(reservation, "u1")).status == "ok"
    assert decide_unchanged(book, Confirm(reservation, "u1", "po-78")).status == "conflict"
    assert decide_unchanged(book, Confirm(reservation, "u1", "")).status == "invalid"
    assert decide_unchanged(book, Confirm(reservation, "u1", "x" * 300)).status == "invalid"
    looked_up = decide_unchanged(book, GetHold(reservation, "u1"))
    assert looked_up == HoldReply("ok", sku=SKU, qty=1, state="confirmed", expires_at=NOW + 900, order="po-77")


def test_orders_survive_replay_and_snapshots_and_old_records_still_load() -> None:
    book = Book()
    records: list[Any] = []
    execute(book, [PutSku(SKU, 5)], NOW, records)
    execute(book, [Reserve(SKU, "u1", 1, None), Reserve(SKU, "u2", 1, None)], NOW, records)
    execute(book, [Confirm("0-1", "u1", "po-1")], NOW, records)
    # A confirm journaled before orders existed: three fields.
    records.append((RECORD_CONFIRM, 2, NOW))
    replayed = Book()
    replayed.replay(records)
    assert replayed.holds[1].order == "po-1"
    assert replayed.holds[2].order is None
    snapshot = replayed.to_snapshot()
    assert Book.from_snapshot(msgpack.unpackb(msgpack.packb(snapshot))).holds[1].order == "po-1"
    # A snapshot written before orders existed: nine fields per hold.
    old = dict(snapshot, holds=[hold[:9] for hold in snapshot["holds"]])
    restored = Book.from_snapshot(old)
    assert [hold.order for hold in restored.holds.values()] == [None, None]
    assert restored.skus[SKU].sold == 2


@pytest.mark.parametrize(
    ("ending", "state"),
    [(None, "held"), (Confirm, "confirmed"), (Cancel, "cancelled"), ("expire", "expired")],
)
def test_the_hold_op_tells_each_state_and_changes_nothing(ending: Any, state: str) -> None:
    book = Book()
    put(book, stock=5, hold_seconds=60, per_buyer_limit=2)
    reservation = hold_of(book, "u1", qty=2)
    now = NOW
    if ending is not None and ending != "expire":
        apply(book, ending(reservation, "u1"), NOW)
    if ending == "expire":
        now = NOW + 61
        book.expire_due(now, [])
    reply = decide_unchanged(book, GetHold(reservation, "u1"), now)
    assert reply == HoldReply("ok", sku=SKU, qty=2, state=state, expires_at=NOW + 60, order=None)  # type: ignore[arg-type]
    # A wrong buyer is told what an unknown id is told.
    assert decide_unchanged(book, GetHold(reservation, "u2"), now) == HoldReply("not_found")
    assert decide_unchanged(book, GetHold("0-999", "u1"), now) == HoldReply("not_found")
    assert decide_unchanged(book, GetHold("", "u1"), now).status == "invalid"


@settings(max_examples=200, deadline=None)
@given(
    stock=st.integers(min_value=0, max_value=4),
    per_buyer_limit=st.integers(min_value=1, max_value=3),
    opens_at=st.sampled_from([None, 50.0, 150.0]),
    closes_at=st.sampled_from([None, 120.0, 200.0]),
    registration_required=st.booleans(),
    reserves=st.lists(
        st.tuples(
            st.sampled_from(["A", "B", "nope"]),
            st.sampled_from(["u1", "u2", "u3"]),
            st.integers(min_value=1, max_value=3),
            st.sampled_from([None, "k1", "k2", "k3"]),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_a_batch_decides_each_reserve_as_the_reserve_check_alone_does(
    stock: int,
    per_buyer_limit: int,
    opens_at: float | None,
    closes_at: float | None,
    registration_required: bool,
    reserves: list[tuple[str, str, int, str | None]],
) -> None:
    """`execute` refuses most reserves without calling `_reserve`: its answers, records and
    state must be those of `_reserve` deciding each in turn, whatever the SKU's settings."""
    now = 100.0
    books = [Book(3), Book(3)]
    for book in books:
        records: list[Any] = []
        book.execute(
            [
                PutSku("A", stock, per_buyer_limit, 60, opens_at, closes_at, registration_required),
                PutSku("B", 2, 1, 60),
                Register("A", ["u1"]),
            ],
            now - 1,
            records,
        )
    commands = [Reserve(sku, buyer, qty, key) for sku, buyer, qty, key in reserves]
    fast_records: list[Any] = []
    fast = books[0].execute(commands, now, fast_records)
    plain_records: list[Any] = []
    plain = [books[1]._reserve(command, now, plain_records) for command in commands]
    assert fast == plain
    assert fast_records == plain_records
    assert books[0].to_snapshot() == books[1].to_snapshot()
    books[0].check_invariants()


def test_holds_are_not_tracked_by_the_cyclic_collector_and_a_book_needs_it_for_nothing() -> None:
    # Holds are untracked (Hold is a gc=False struct), which is only safe while nothing
    # in a book forms a reference cycle: then dropping a book frees all of it by
    # reference counting alone, and the collector finds nothing left behind. (Commands
    # are built here directly: the parser itself holds a cycle, its bound methods.)
    import gc
    import weakref

    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        book = Book()
        later = NOW + 10_000
        book.execute([PutSku(SKU, 10, 5, 60, None, None, False), PutSku("OTHER", 10, 1, 60, None, None, True)], NOW, [])
        book.execute([Register("OTHER", ["ann"])], NOW, [])
        replies = book.execute([Reserve(SKU, f"buyer-{number}", 1, f"key-{number}") for number in range(4)], NOW, [])
        reservations = [reply.reservation for reply in replies]
        book.execute([Confirm(reservations[0], "buyer-0", "order-1"), Cancel(reservations[1], "buyer-1")], NOW, [])
        book.expire_due(later, [])
        book.execute([Reserve(SKU, "buyer-9", 1, None), Reserve("OTHER", "ann", 1, "k")], later, [])
        book.execute([Register("OTHER", ["bob"]), GetHold(reservations[0], "buyer-0"), Stock(SKU)], later, [])
        book.to_snapshot()
        assert len(book.holds) == 6
        assert not any(gc.is_tracked(hold) for hold in book.holds.values())
        gone = weakref.ref(book)
        del book
        assert gone() is None, "a book is kept alive by a reference cycle"
        assert gc.collect() == 0, "a book left objects that only the cyclic collector frees"
    finally:
        if collecting:
            gc.enable()
