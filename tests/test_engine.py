"""The in-process API through `open_engine`: statuses, idempotency, batches, expiry by
the shard's own timer, validation, backpressure, the data directory (reopen, torn and
corrupt journals, snapshots) and a flash crowd.

Memory-only tests run on `autojump_clock`. Tests with a data directory run on
`mock_clock`, which stands still until the test jumps it: recovery, fsyncs and
snapshots run in worker threads, and an autojumping clock would leap to the next
hold expiry while the test waits for one.
"""

from __future__ import annotations

import logging
import math
import os
import random
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from data_files import as_if_killed, entry_offsets, segment_entries

from engine import (
    DataDirError,
    EngineConfig,
    JournalCorrupt,
    Limits,
    open_engine,
)
from engine.router import shard_for_reservation, shard_for_sku
from protocol.messages import Cancel, Confirm, PutSku, Reply, Reserve, Stock, StockReply

SKU = "MI-BAND-1"
ConfigFactory = Callable[..., EngineConfig]
WallClock = Callable[[], float]


def shifted(wall_clock: WallClock, seconds: float) -> WallClock:
    """The same clock `seconds` later (earlier when negative): a process started at another time."""
    return lambda: wall_clock() + seconds


async def counts(engine: Any, sku: str = SKU) -> tuple[int, int, int, int]:
    """(stock, available, held, sold) as a `stock` request answers them."""
    reply = await engine.stock(sku)
    assert reply.status == "ok", reply
    assert reply.available == reply.stock - reply.held - reply.sold
    return reply.stock, reply.available, reply.held, reply.sold


def counts_without_a_request(engine: Any, sku: str = SKU) -> tuple[int, int, int, int]:
    """The same counts read from the shards directly: no command reaches the book."""
    (found,) = [entry for entry in engine.sku_counts() if entry.sku == sku]
    return found.stock, found.available, found.held, found.sold


def shard_files(data_dir: str, shard: int, prefix: str) -> list[str]:
    directory = os.path.join(data_dir, f"shard-{shard}")
    return sorted(name for name in os.listdir(directory) if name.startswith(prefix))


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def flip_byte(path: str, position: int) -> bytes:
    """Invert one byte of the file at `path`; returns the damaged contents."""
    data = bytearray(read_bytes(path))
    data[position] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    return bytes(data)


# ------------------------------------------------------------------ every method and status


async def test_every_method_answers_every_status(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory, wall_clock: WallClock
) -> None:
    async with open_engine(engine_config(shards=4)) as engine:
        assert (await engine.put_sku(SKU, stock=3, per_buyer_limit=2, hold_seconds=60)).status == "ok"
        first = await engine.reserve(SKU, buyer="u42", qty=2, key="u42-1")
        assert first.status == "ok"
        assert first.expires_at == wall_clock() + 60
        assert first.remaining == 1
        assert first.reservation is not None
        # The id names the SKU's shard, so confirm and cancel route without a lookup.
        assert shard_for_reservation(first.reservation, 4) == shard_for_sku(SKU, 4)
        assert (await engine.reserve(SKU, buyer="u42", qty=1)).status == "limit_exceeded"
        assert (await engine.reserve(SKU, buyer="u43", qty=2)).status == "sold_out"
        assert (await engine.reserve("nope", buyer="u43")).status == "unknown_sku"
        invalid = await engine.reserve(SKU, buyer="u43", qty=0)
        assert invalid.status == "invalid"
        assert invalid.error
        assert (await engine.confirm(first.reservation, buyer="u42")).status == "ok"
        assert (await engine.confirm(first.reservation, buyer="u42")).status == "ok"
        assert (await engine.cancel(first.reservation, buyer="u42")).status == "conflict"
        assert (await engine.confirm(first.reservation, buyer="u43")).status == "not_found"
        assert await counts(engine) == (3, 1, 0, 2)

        second = await engine.reserve(SKU, buyer="u43", qty=1)
        assert (await engine.cancel(second.reservation, buyer="u43")).status == "ok"
        assert (await engine.cancel(second.reservation, buyer="u43")).status == "ok"
        assert (await engine.confirm(second.reservation, buyer="u43")).status == "conflict"
        third = await engine.reserve(SKU, buyer="u43", qty=1)
        await trio.sleep(61)
        assert (await engine.confirm(third.reservation, buyer="u43")).status == "expired"
        assert (await engine.cancel(third.reservation, buyer="u43")).status == "expired"
        assert await counts(engine) == (3, 1, 0, 2)
        missing = await engine.stock("nope")
        assert isinstance(missing, StockReply)
        assert missing.status == "unknown_sku"

        now = wall_clock()
        await engine.put_sku("later", stock=5, opens_at=now + 10, closes_at=now + 20)
        assert (await engine.reserve("later", buyer="u1")).status == "not_open"
        await trio.sleep(10.5)
        assert (await engine.reserve("later", buyer="u1")).status == "ok"
        await trio.sleep(10)
        assert (await engine.reserve("later", buyer="u2")).status == "closed"

        await engine.put_sku("members", stock=5, registration_required=True)
        assert (await engine.register("members", ["u1"])).status == "ok"
        assert (await engine.reserve("members", buyer="u2")).status == "not_registered"
        assert (await engine.reserve("members", buyer="u1")).status == "ok"
        assert (await engine.register("nope", ["u1"])).status == "unknown_sku"


async def test_confirm_and_cancel_of_ids_no_shard_made_are_not_found(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    async with open_engine(engine_config(shards=2)) as engine:
        await engine.put_sku(SKU, stock=1)
        for reservation in ("7-1", "0-99", "junk", "1-"):
            assert (await engine.confirm(reservation, buyer="u1")).status == "not_found"
            assert (await engine.cancel(reservation, buyer="u1")).status == "not_found"


async def test_remaining_follows_every_decision(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    async with open_engine(engine_config(shards=2)) as engine:
        await engine.put_sku(SKU, stock=10, per_buyer_limit=5)
        assert (await engine.reserve(SKU, buyer="a", qty=3)).remaining == 7
        second = await engine.reserve(SKU, buyer="b", qty=4, key="b-1")
        assert second.remaining == 3
        await engine.cancel(second.reservation, buyer="b")
        assert (await engine.reserve(SKU, buyer="c", qty=5)).remaining == 2
        # A key replay reports what remains now, not what remained then.
        assert (await engine.reserve(SKU, buyer="b", qty=4, key="b-1")).remaining == 2
        await engine.put_sku(SKU, stock=20, per_buyer_limit=5)
        assert (await engine.reserve(SKU, buyer="d", qty=1)).remaining == 11
        assert (await engine.reserve(SKU, buyer="e", qty=5)).remaining == 6
        sold_out = await engine.reserve(SKU, buyer="f", qty=5)
        assert sold_out.status == "ok"
        assert sold_out.remaining == 1
        refused = await engine.reserve(SKU, buyer="g", qty=2)
        assert refused.status == "sold_out"
        assert refused.remaining is None
        assert refused.reservation is None


# ------------------------------------------------------------------ idempotency keys


async def test_a_key_replay_returns_the_same_hold_also_after_reopen(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, wall_clock: WallClock, data_dir: str
) -> None:
    config = engine_config(shards=3, data_dir=data_dir, durable=True)
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=10, per_buyer_limit=2, hold_seconds=300)
        reserved_at = wall_clock()
        first = await engine.reserve(SKU, buyer="u42", qty=2, key="u42-attempt-1")
        assert first.status == "ok"
        assert first.expires_at == reserved_at + 300
        mock_clock.jump(100)
        again = await engine.reserve(SKU, buyer="u42", qty=2, key="u42-attempt-1")
        assert (again.status, again.reservation, again.expires_at) == ("ok", first.reservation, first.expires_at)
        assert await counts(engine) == (10, 8, 2, 0)
    mock_clock.jump(100)
    async with open_engine(config) as engine:
        again = await engine.reserve(SKU, buyer="u42", qty=2, key="u42-attempt-1")
        assert (again.status, again.reservation, again.expires_at) == ("ok", first.reservation, first.expires_at)
        assert await counts(engine) == (10, 8, 2, 0)
        for other in (
            await engine.reserve(SKU, buyer="u43", qty=2, key="u42-attempt-1"),
            await engine.reserve(SKU, buyer="u42", qty=1, key="u42-attempt-1"),
        ):
            assert other.status == "invalid"
            assert other.error
        assert await counts(engine) == (10, 8, 2, 0)
        # Whatever became of the hold, the key still names it.
        assert (await engine.confirm(first.reservation, buyer="u42")).status == "ok"
        again = await engine.reserve(SKU, buyer="u42", qty=2, key="u42-attempt-1")
        assert again.reservation == first.reservation
        assert await counts(engine) == (10, 8, 0, 2)


async def test_a_used_key_with_another_buyer_or_qty_is_invalid(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    async with open_engine(engine_config(shards=2)) as engine:
        await engine.put_sku(SKU, stock=10, per_buyer_limit=3)
        assert (await engine.reserve(SKU, buyer="a", qty=2, key="k")).status == "ok"
        for buyer, qty in (("b", 2), ("a", 1), ("a", 3), ("b", 1)):
            reply = await engine.reserve(SKU, buyer=buyer, qty=qty, key="k")
            assert reply.status == "invalid"
            assert reply.error
        assert await counts(engine) == (10, 8, 2, 0)
        # A sold-out answer leaves no key behind.
        assert (await engine.reserve(SKU, buyer="c", qty=3, key="free")).status == "ok"
        await engine.put_sku(SKU, stock=5, per_buyer_limit=3)
        assert (await engine.reserve(SKU, buyer="d", qty=3, key="tried")).status == "sold_out"
        await engine.put_sku(SKU, stock=20, per_buyer_limit=3)
        assert (await engine.reserve(SKU, buyer="e", qty=1, key="tried")).status == "ok"


# ------------------------------------------------------------------ the batch entry point


def skus_on_distinct_shards(shards: int, wanted: int) -> list[str]:
    found: dict[int, str] = {}
    for index in range(1000):
        sku = f"sku-{index}"
        found.setdefault(shard_for_sku(sku, shards), sku)
        if len(found) == wanted:
            break
    assert len(found) == wanted
    return list(found.values())


async def test_execute_answers_in_request_order_across_shards_and_skus(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    async with open_engine(engine_config(shards=4)) as engine:
        skus = skus_on_distinct_shards(4, 4)
        setup = await engine.execute([PutSku(sku, 5, 1, 900) for sku in skus])
        assert [reply.status for reply in setup] == ["ok"] * 4
        commands: list[Any] = []
        for index in range(48):
            sku = skus[index % 4]
            commands.append(Reserve(sku, f"buyer-{index}", 1, f"key-{index}"))
            if index % 8 == 7:
                commands.append(Stock(sku))
        commands.insert(3, Reserve("", "x", 1))
        commands.insert(10, Confirm("0-1", ""))
        commands.insert(20, Confirm("not-an-id", "x"))
        commands.insert(30, Reserve("unknown", "x", 1))
        replies = await engine.execute(commands)
        assert len(replies) == len(commands)
        # Replay the batch against plain counters: each SKU's requests in request order.
        taken = dict.fromkeys(skus, 0)
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(command, Stock):
                assert isinstance(reply, StockReply)
                assert (reply.status, reply.held, reply.available) == ("ok", taken[command.sku], 5 - taken[command.sku])
            elif isinstance(command, Confirm):
                expected = "invalid" if command.buyer == "" else "not_found"
                assert reply.status == expected, command
            elif command.sku not in taken:
                assert reply.status == ("invalid" if command.sku == "" else "unknown_sku"), command
            elif taken[command.sku] < 5:
                taken[command.sku] += 1
                assert reply.status == "ok", command
                assert reply.remaining == 5 - taken[command.sku]
                assert shard_for_reservation(reply.reservation, 4) == shard_for_sku(command.sku, 4)
            else:
                assert reply.status == "sold_out", command
        # Confirm and cancel in a batch route by the reservation id alone.
        holds = [
            (command, reply)
            for command, reply in zip(commands, replies, strict=True)
            if isinstance(command, Reserve) and reply.status == "ok"
        ]
        endings: list[Any] = []
        for position, (command, reply) in enumerate(holds):
            ending = Confirm if position % 2 else Cancel
            endings.append(ending(reply.reservation, command.buyer))
            endings.append(ending(reply.reservation, "someone-else"))
        outcomes = await engine.execute(endings)
        assert [reply.status for reply in outcomes] == ["ok", "not_found"] * len(holds)
        sold = Counter(command.sku for position, (command, _) in enumerate(holds) if position % 2)
        for sku in skus:
            assert await counts(engine, sku) == (5, 5 - sold[sku], 0, sold[sku])
        assert await engine.execute([]) == []


# ------------------------------------------------------------------ expiry


async def test_a_hold_expires_by_the_shards_own_timer(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    async with open_engine(engine_config(shards=2)) as engine:
        await engine.put_sku(SKU, stock=4, per_buyer_limit=4, hold_seconds=60)
        early = await engine.reserve(SKU, buyer="a", qty=1)
        await trio.sleep(30)
        await engine.reserve(SKU, buyer="b", qty=2)
        await trio.sleep(29.5)
        assert counts_without_a_request(engine) == (4, 1, 3, 0)
        await trio.sleep(1)  # past the first hold's expiry, no request sent
        assert counts_without_a_request(engine) == (4, 2, 2, 0)
        await trio.sleep(30)  # past the second's
        assert counts_without_a_request(engine) == (4, 4, 0, 0)
        assert await counts(engine) == (4, 4, 0, 0)
        assert (await engine.confirm(early.reservation, buyer="a")).status == "expired"


async def test_the_timer_comes_forward_for_a_hold_that_runs_out_before_the_ones_it_waits_for(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    async with open_engine(engine_config(shards=1)) as engine:
        await engine.put_sku("LONG", stock=2, per_buyer_limit=2, hold_seconds=600)
        await engine.put_sku("SHORT", stock=2, per_buyer_limit=2, hold_seconds=10)
        await engine.reserve("LONG", buyer="a", qty=1)
        await trio.sleep(1)
        await engine.reserve("SHORT", buyer="a", qty=2)
        await trio.sleep(10.5)  # past SHORT's expiry, long before LONG's: no request sent
        assert counts_without_a_request(engine, "SHORT") == (2, 2, 0, 0)
        assert counts_without_a_request(engine, "LONG") == (2, 1, 1, 0)


async def test_the_timer_goes_on_past_an_earliest_hold_that_ended(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    async with open_engine(engine_config(shards=1)) as engine:
        await engine.put_sku(SKU, stock=3, per_buyer_limit=3, hold_seconds=60)
        first = await engine.reserve(SKU, buyer="a", qty=1)
        await trio.sleep(20)
        await engine.reserve(SKU, buyer="b", qty=2)
        assert (await engine.confirm(first.reservation, buyer="a")).status == "ok"
        await trio.sleep(41)  # the confirmed hold's time: nothing is due
        assert counts_without_a_request(engine) == (3, 0, 2, 1)
        await trio.sleep(20)  # past the second hold's: it expires with no request sent
        assert counts_without_a_request(engine) == (3, 2, 0, 1)


async def test_the_timer_journals_its_expiry(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, wall_clock: WallClock, data_dir: str
) -> None:
    async with open_engine(engine_config(shards=2, data_dir=data_dir, durable=True)) as engine:
        await engine.put_sku(SKU, stock=4, per_buyer_limit=4, hold_seconds=60)
        hold = await engine.reserve(SKU, buyer="a", qty=3)
        mock_clock.jump(61)
        await trio.testing.wait_all_tasks_blocked()
        assert counts_without_a_request(engine) == (4, 4, 0, 0)
    # Reopened at a wall-clock time before the expiry: only a journaled expiry ended it.
    early_config = engine_config(shards=2, data_dir=data_dir, wall_clock=shifted(wall_clock, -1000))
    async with open_engine(early_config) as engine:
        assert await counts(engine) == (4, 4, 0, 0)
        assert (await engine.confirm(hold.reservation, buyer="a")).status == "expired"


async def test_holds_that_ran_out_while_the_engine_was_closed_expire_at_reopen(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, wall_clock: WallClock, data_dir: str
) -> None:
    config = engine_config(shards=2, data_dir=data_dir, durable=True)
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=5, per_buyer_limit=5, hold_seconds=60)
        lapsing = await engine.reserve(SKU, buyer="a", qty=2)
        kept = await engine.reserve(SKU, buyer="b", qty=1)
        await engine.confirm(kept.reservation, buyer="b")
        assert await counts(engine) == (5, 2, 2, 1)
    later = engine_config(shards=2, data_dir=data_dir, wall_clock=shifted(wall_clock, 61))
    async with open_engine(later) as engine:
        assert counts_without_a_request(engine) == (5, 4, 0, 1)
    # Back at the old time: the expiry was journaled at reopen, not recomputed.
    async with open_engine(config) as engine:
        assert await counts(engine) == (5, 4, 0, 1)
        assert (await engine.confirm(lapsing.reservation, buyer="a")).status == "expired"
        assert (await engine.confirm(kept.reservation, buyer="b")).status == "ok"


# ------------------------------------------------------------------ validation


async def test_put_sku_below_held_plus_sold_is_invalid(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    async with open_engine(engine_config(shards=2)) as engine:
        await engine.put_sku(SKU, stock=10, per_buyer_limit=5)
        hold = await engine.reserve(SKU, buyer="a", qty=3)
        await engine.reserve(SKU, buyer="b", qty=2)
        await engine.confirm(hold.reservation, buyer="a")
        reply = await engine.put_sku(SKU, stock=4, per_buyer_limit=5)
        assert reply.status == "invalid"
        assert reply.error
        assert await counts(engine) == (10, 5, 2, 3)
        assert (await engine.put_sku(SKU, stock=5, per_buyer_limit=5)).status == "ok"
        assert await counts(engine) == (5, 0, 2, 3)
        assert (await engine.put_sku(SKU, stock=8, per_buyer_limit=5)).status == "ok"
        assert await counts(engine) == (8, 3, 2, 3)


LONG = "x" * 300

BAD_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("reserve", "qty 0", {"sku": SKU, "buyer": "a", "qty": 0}),
    ("reserve", "qty -1", {"sku": SKU, "buyer": "a", "qty": -1}),
    ("reserve", "qty above qty_max", {"sku": SKU, "buyer": "a", "qty": 1001}),
    ("reserve", "qty True", {"sku": SKU, "buyer": "a", "qty": True}),
    ("reserve", "qty text", {"sku": SKU, "buyer": "a", "qty": "1"}),
    ("reserve", "qty float", {"sku": SKU, "buyer": "a", "qty": 1.0}),
    ("reserve", "qty None", {"sku": SKU, "buyer": "a", "qty": None}),
    ("reserve", "sku None", {"sku": None, "buyer": "a"}),
    ("reserve", "sku empty", {"sku": "", "buyer": "a"}),
    ("reserve", "sku 300 bytes", {"sku": LONG, "buyer": "a"}),
    ("reserve", "sku number", {"sku": 7, "buyer": "a"}),
    ("reserve", "buyer 300 bytes", {"sku": SKU, "buyer": LONG}),
    ("reserve", "buyer 258 bytes of two-byte characters", {"sku": SKU, "buyer": "é" * 129}),
    ("reserve", "buyer empty", {"sku": SKU, "buyer": ""}),
    ("reserve", "buyer None", {"sku": SKU, "buyer": None}),
    ("reserve", "buyer bytes", {"sku": SKU, "buyer": b"a"}),
    ("reserve", "key empty", {"sku": SKU, "buyer": "a", "key": ""}),
    ("reserve", "key 300 bytes", {"sku": SKU, "buyer": "a", "key": LONG}),
    ("reserve", "key number", {"sku": SKU, "buyer": "a", "key": 5}),
    ("confirm", "reservation empty", {"reservation": "", "buyer": "a"}),
    ("confirm", "reservation None", {"reservation": None, "buyer": "a"}),
    ("confirm", "reservation 300 bytes", {"reservation": LONG, "buyer": "a"}),
    ("confirm", "buyer empty", {"reservation": "0-1", "buyer": ""}),
    ("cancel", "buyer 300 bytes", {"reservation": "0-1", "buyer": LONG}),
    ("cancel", "reservation number", {"reservation": 1, "buyer": "a"}),
    ("put_sku", "stock -1", {"sku": SKU, "stock": -1}),
    ("put_sku", "stock True", {"sku": SKU, "stock": True}),
    ("put_sku", "stock text", {"sku": SKU, "stock": "10"}),
    ("put_sku", "per_buyer_limit 0", {"sku": SKU, "stock": 10, "per_buyer_limit": 0}),
    ("put_sku", "hold_seconds NaN", {"sku": SKU, "stock": 10, "hold_seconds": math.nan}),
    ("put_sku", "hold_seconds 0", {"sku": SKU, "stock": 10, "hold_seconds": 0}),
    ("put_sku", "opens_at NaN", {"sku": SKU, "stock": 10, "opens_at": math.nan}),
    ("put_sku", "closes_at before opens_at", {"sku": SKU, "stock": 10, "opens_at": 2e9, "closes_at": 1e9}),
    ("put_sku", "registration_required 1", {"sku": SKU, "stock": 10, "registration_required": 1}),
    ("put_sku", "sku 300 bytes", {"sku": LONG, "stock": 10}),
    ("register", "buyers a string", {"sku": SKU, "buyers": "abc"}),
    ("register", "buyers None", {"sku": SKU, "buyers": None}),
    ("register", "a buyer number", {"sku": SKU, "buyers": ["u1", 5]}),
    ("register", "a buyer empty", {"sku": SKU, "buyers": ["u1", ""]}),
    ("register", "sku empty", {"sku": "", "buyers": ["u1"]}),
    ("stock", "sku None", {"sku": None}),
    ("stock", "sku 300 bytes", {"sku": LONG}),
]


@pytest.mark.parametrize(("method", "arguments"), [(m, a) for m, _, a in BAD_CALLS], ids=[i for _, i, _ in BAD_CALLS])
async def test_bad_arguments_are_invalid_with_a_message_and_change_nothing(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory, method: str, arguments: dict[str, Any]
) -> None:
    async with open_engine(engine_config(shards=2)) as engine:
        await engine.put_sku(SKU, stock=10, per_buyer_limit=2, registration_required=True)
        await engine.register(SKU, ["a"])
        await engine.reserve(SKU, buyer="a", qty=1)
        before = await counts(engine)
        arguments = dict(arguments)
        positional = arguments.pop("sku") if "sku" in arguments else arguments.pop("reservation")
        reply = await getattr(engine, method)(positional, **arguments)
        assert reply.status == "invalid", reply
        assert isinstance(reply.error, str)
        assert reply.error
        assert await counts(engine) == before
        # No one was registered by a refused register.
        assert (await engine.reserve(SKU, buyer="u1")).status == "not_registered"
        assert await counts(engine) == before


async def test_a_name_with_no_utf8_encoding_is_invalid_and_the_engine_goes_on(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, data_dir: str
) -> None:
    # A lone surrogate is a Python str with no UTF-8 form: it cannot be journaled.
    async with open_engine(engine_config(shards=1, data_dir=data_dir, durable=False)) as engine:
        await engine.put_sku(SKU, stock=10, per_buyer_limit=2)
        for reply in (
            await engine.reserve(SKU, buyer="\udc80"),
            await engine.reserve(SKU, buyer="a", key="\ud800"),
            await engine.put_sku("\udc80", stock=1),
            await engine.register(SKU, ["\udc80"]),
        ):
            assert reply.status == "invalid", reply
            assert reply.error
        assert (await engine.reserve(SKU, buyer="a")).status == "ok"
        assert await counts(engine) == (10, 9, 1, 0)


# ------------------------------------------------------------------ registration in bounded parts


async def test_register_more_buyers_than_one_command_holds(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    config = engine_config(shards=2, limits=Limits(register_buyers_max=10))
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=100, registration_required=True)
        buyers = [f"member-{index}" for index in range(35)]
        assert (await engine.register(SKU, buyers)).status == "ok"
        assert (await engine.register(SKU, iter(buyers[:3]))).status == "ok"
        replies = await engine.execute([Reserve(SKU, buyer, 1) for buyer in [*buyers, "stranger"]])
        assert [reply.status for reply in replies] == ["ok"] * 35 + ["not_registered"]


async def test_register_with_a_bad_buyer_in_a_later_part_registers_no_one(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    config = engine_config(shards=2, limits=Limits(register_buyers_max=10))
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=100, registration_required=True)
        buyers = [f"member-{index}" for index in range(25)]
        buyers[22] = ""
        reply = await engine.register(SKU, buyers)
        assert reply.status == "invalid"
        assert reply.error
        replies = await engine.execute([Reserve(SKU, buyer, 1) for buyer in buyers if buyer])
        assert {reply.status for reply in replies} == {"not_registered"}


# ------------------------------------------------------------------ backpressure


async def test_a_tiny_mailbox_still_answers_every_request() -> None:
    # Real clock: the outcome does not depend on time, and holds last an hour.
    config = EngineConfig(shards=2, limits=Limits(mailbox_batches_max=1))
    skus = skus_on_distinct_shards(2, 2)
    async with open_engine(config) as engine:
        for sku in skus:
            await engine.put_sku(sku, stock=300, per_buyer_limit=1, hold_seconds=3600)
        statuses: Counter[str] = Counter()

        async def single(task: int) -> None:
            for index in range(20):
                reply = await engine.reserve(skus[index % 2], buyer=f"single-{task}-{index}")
                statuses[reply.status] += 1

        async def batches(task: int) -> None:
            for round_ in range(4):
                commands = [Reserve(skus[index % 2], f"batch-{task}-{round_}-{index}", 1) for index in range(10)]
                for reply in await engine.execute(commands):
                    statuses[reply.status] += 1

        async with trio.open_nursery() as nursery:
            for task in range(50):
                nursery.start_soon(single, task)
            for task in range(10):
                nursery.start_soon(batches, task)
        assert sum(statuses.values()) == 50 * 20 + 10 * 4 * 10
        assert statuses == Counter({"ok": 600, "sold_out": 800})
        for sku in skus:
            assert await counts(engine, sku) == (300, 0, 300, 0)


async def test_a_full_mailbox_makes_callers_wait_for_room_and_every_one_is_answered(
    autojump_clock: trio.testing.MockClock, engine_config: ConfigFactory
) -> None:
    config = engine_config(shards=1, limits=Limits(mailbox_batches_max=1))
    # On the autojump clock a request that is never answered fails here, not hangs.
    with trio.fail_after(60):
        await waits_when_the_mailbox_is_full(config)


async def waits_when_the_mailbox_is_full(config: EngineConfig) -> None:
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=4, per_buyer_limit=1)
        await trio.testing.wait_all_tasks_blocked()  # the shard waits on its mailbox
        replies: dict[int, list[Any]] = {}
        handed_over = 0

        async def attempt(index: int) -> None:
            nonlocal handed_over
            replies[index] = await engine.execute([Reserve(SKU, f"buyer-{index}", 1), Stock(SKU)])
            handed_over += 1

        # All six start in one scheduling batch: the first batch goes straight to the
        # waiting shard, the second fills the mailbox, and the other four wait for room
        # (trio's backpressure) instead of being refused.
        async with trio.open_nursery() as nursery:
            for index in range(6):
                nursery.start_soon(attempt, index)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.statistics().shards[0].mailbox_used <= 1
        assert handed_over == 6
        statuses = Counter(reply[0].status for reply in replies.values())
        assert statuses == Counter({"ok": 4, "sold_out": 2})
        for _, stock_reply in replies.values():
            assert isinstance(stock_reply, StockReply)
            assert stock_reply.status == "ok"
        assert await counts(engine) == (4, 0, 4, 0)


# ------------------------------------------------------------------ the data directory


async def test_reopening_with_another_shard_count_fails_clearly(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, data_dir: str
) -> None:
    async with open_engine(engine_config(shards=2, data_dir=data_dir)) as engine:
        await engine.put_sku(SKU, stock=5)
    with pytest.raises(DataDirError) as raised:
        async with open_engine(engine_config(shards=3, data_dir=data_dir)):
            pytest.fail("opened a data directory with the wrong shard count")
    message = str(raised.value)
    assert data_dir in message
    assert "2" in message
    assert "3" in message
    async with open_engine(engine_config(shards=2, data_dir=data_dir)) as engine:
        assert await counts(engine) == (5, 5, 0, 0)


async def test_two_engines_cannot_share_a_data_dir(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, data_dir: str
) -> None:
    config = engine_config(shards=2, data_dir=data_dir)
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=5)
        with pytest.raises(DataDirError, match="in use"):
            async with open_engine(config):
                pytest.fail("two engines opened one data directory")
        assert await counts(engine) == (5, 5, 0, 0)
    async with open_engine(config) as engine:
        assert await counts(engine) == (5, 5, 0, 0)


async def fill_single_shard_journal(config: EngineConfig, holds: int) -> list[Reply]:
    """put_sku, then `holds` reserves one at a time: one journal entry each."""
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=100, per_buyer_limit=100)
        return [await engine.reserve(SKU, buyer="a", key=f"k{index}") for index in range(holds)]


def damage_torn_last_entry(path: str) -> None:
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) - 3)


def damage_partial_header(path: str) -> None:
    with open(path, "ab") as file:
        file.write(b"SJ\x02\x00\x40")


def damage_partial_payload(path: str) -> None:
    head = struct.pack("<4sII", b"SJ\x02\x00", 100, 12345)
    with open(path, "ab") as file:
        file.write(head + struct.pack("<I", zlib.crc32(head)) + b"\x93" * 10)


def damage_zeros(path: str) -> None:
    with open(path, "ab") as file:
        file.write(b"\x00" * 4096)


@pytest.mark.parametrize(
    ("damage", "holds_kept"),
    [
        (damage_torn_last_entry, 4),
        (damage_partial_header, 5),
        (damage_partial_payload, 5),
        (damage_zeros, 5),
    ],
)
async def test_a_torn_tail_is_cut_off_with_a_warning(
    mock_clock: trio.testing.MockClock,
    engine_config: ConfigFactory,
    data_dir: str,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[str], None],
    holds_kept: int,
) -> None:
    config = engine_config(shards=1, data_dir=data_dir, durable=False)
    holds = await fill_single_shard_journal(config, 5)
    (segment,) = shard_files(data_dir, 0, "journal-")
    path = os.path.join(data_dir, "shard-0", segment)
    committed = entry_offsets(path)
    prefix_bytes = committed[holds_kept + 1] if holds_kept + 1 < len(committed) else len(read_bytes(path))
    as_if_killed(data_dir)
    damage(path)
    with caplog.at_level(logging.WARNING):
        async with open_engine(config) as engine:
            assert await counts(engine) == (100, 100 - holds_kept, holds_kept, 0)
            for index, hold in enumerate(holds[:holds_kept]):
                again = await engine.reserve(SKU, buyer="a", key=f"k{index}")
                assert again.reservation == hold.reservation
            # The lost hold was never committed: its number and its key are free again.
            fresh = await engine.reserve(SKU, buyer="a", key=f"k{holds_kept}")
            assert fresh.reservation == f"0-{holds_kept + 1}"
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert path in warnings[0].getMessage()
    # The cut left the committed prefix, and the new entry went right after it.
    assert entry_offsets(path)[: holds_kept + 2] == [*committed[: holds_kept + 1], prefix_bytes]
    caplog.clear()
    async with open_engine(config) as engine:
        assert await counts(engine) == (100, 99 - holds_kept, holds_kept + 1, 0)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("entry", [0, 2])
async def test_corruption_before_the_tail_stops_the_start_naming_file_and_offset(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, data_dir: str, entry: int
) -> None:
    config = engine_config(shards=1, data_dir=data_dir, durable=False)
    await fill_single_shard_journal(config, 5)
    (segment,) = shard_files(data_dir, 0, "journal-")
    path = os.path.join(data_dir, "shard-0", segment)
    offset = entry_offsets(path)[entry]
    data = flip_byte(path, offset + 16 + 2)  # a payload byte: the checksum no longer matches
    for _ in range(2):  # the failed start let go of the data directory
        with pytest.raises(JournalCorrupt) as raised:
            async with open_engine(config):
                pytest.fail("started on a corrupt journal")
        assert raised.value.path == path
        assert raised.value.offset == offset
        assert path in str(raised.value)
        assert str(offset) in str(raised.value)
    assert read_bytes(path) == data  # nothing was cut


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_snapshots_bound_replay_and_reopen_to_the_same_state(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, data_dir: str, seed: int
) -> None:
    generator = random.Random(seed)
    config = engine_config(shards=1, data_dir=data_dir, durable=False, snapshot_records_min=10)
    outcome: dict[str, tuple[str, str, int, Reply]] = {}  # key -> (ending, buyer, qty, hold)
    records_written = 1  # the put_sku
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=1000, per_buyer_limit=1000, hold_seconds=3600)
        for index in range(80):
            buyer = f"buyer-{index % 7}"
            qty = generator.randint(1, 3)
            hold = await engine.reserve(SKU, buyer=buyer, qty=qty, key=f"k{index}")
            assert hold.status == "ok", f"seed={seed}"
            ending = generator.choice(["held", "confirmed", "cancelled"])
            if ending == "confirmed":
                assert (await engine.confirm(hold.reservation, buyer=buyer)).status == "ok"
            elif ending == "cancelled":
                assert (await engine.cancel(hold.reservation, buyer=buyer)).status == "ok"
            records_written += 1 if ending == "held" else 2
            outcome[f"k{index}"] = (ending, buyer, qty, hold)
        before = await counts(engine)
    # Closing waited for the snapshot in progress: the files are final.
    snapshots = shard_files(data_dir, 0, "snapshot-")
    segments = shard_files(data_dir, 0, "journal-")
    assert len(snapshots) == 1, f"seed={seed}: want the newest snapshot alone, found {snapshots}"
    assert snapshots[0].endswith(".msgpack"), snapshots
    newest = int(snapshots[0].removeprefix("snapshot-").removesuffix(".msgpack"))
    assert newest >= 1, f"seed={seed}"
    numbers = [int(name.removeprefix("journal-").removesuffix(".log")) for name in segments]
    assert numbers, f"seed={seed}"
    assert min(numbers) >= newest, f"seed={seed}: segments older than the snapshot were kept: {segments}"
    records_left = sum(
        len(records)
        for name in segments
        for records in segment_entries(os.path.join(data_dir, "shard-0", name)).entries
    )
    # The first snapshot is due after 10 records: replay skips at least those.
    assert records_left <= records_written - 10, f"seed={seed}: replay reads {records_left} of {records_written}"

    async with open_engine(config) as engine:
        assert await counts(engine) == before, f"seed={seed}"
        for key, (ending, buyer, qty, hold) in outcome.items():
            again = await engine.reserve(SKU, buyer=buyer, qty=qty, key=key)
            assert (again.reservation, again.expires_at) == (hold.reservation, hold.expires_at), f"seed={seed}"
            cancel = await engine.cancel(hold.reservation, buyer=buyer)
            expected = {"held": "ok", "confirmed": "conflict", "cancelled": "ok"}[ending]
            assert cancel.status == expected, f"seed={seed}: {key} was {ending}"
        # Hold numbers go on from the last one: no id is handed out twice.
        fresh = await engine.reserve(SKU, buyer="newcomer")
        assert fresh.reservation == "0-81", f"seed={seed}"
        stock, _, held, sold = await counts(engine)
        assert (stock, held, sold) == (1000, 1, before[3]), f"seed={seed}"


async def test_reopen_restores_keys_from_a_snapshot(
    mock_clock: trio.testing.MockClock, engine_config: ConfigFactory, data_dir: str
) -> None:
    config = engine_config(shards=1, data_dir=data_dir, durable=True, snapshot_records_min=5)
    async with open_engine(config) as engine:
        await engine.put_sku(SKU, stock=100, per_buyer_limit=100)
        holds = [await engine.reserve(SKU, buyer="a", key=f"k{index}") for index in range(30)]
    assert shard_files(data_dir, 0, "snapshot-")
    async with open_engine(config) as engine:
        for index, hold in enumerate(holds):
            again = await engine.reserve(SKU, buyer="a", key=f"k{index}")
            assert (again.reservation, again.expires_at) == (hold.reservation, hold.expires_at)
        assert await counts(engine) == (100, 70, 30, 0)
        fresh = await engine.reserve(SKU, buyer="a", key="k30")
        assert fresh.reservation == "0-31"
        assert (await engine.confirm(holds[0].reservation, buyer="a")).status == "ok"
        assert await counts(engine) == (100, 69, 30, 1)


# ------------------------------------------------------------------ a flash crowd


async def test_a_flash_crowd_gets_exactly_the_stock_and_no_buyer_more_than_the_limit() -> None:
    # Real clock: a crowd racing for 10,000 units through many tasks at once.
    units = 10_000
    buyers = 100_000
    tasks = 200
    per_task = buyers // tasks
    async with open_engine(EngineConfig(shards=8)) as engine:
        await engine.put_sku(SKU, stock=units, per_buyer_limit=1, hold_seconds=3600)
        oks: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        remaining: list[int] = []
        reservations: set[str] = set()

        def tally(buyer: str, reply: Any) -> None:
            statuses[reply.status] += 1
            if reply.status == "ok":
                oks[buyer] += 1
                remaining.append(reply.remaining)
                reservations.add(reply.reservation)

        async def one_at_a_time(task: int) -> None:
            for index in range(task * per_task, (task + 1) * per_task):
                buyer = f"buyer-{index}"
                tally(buyer, await engine.reserve(SKU, buyer=buyer))
                if index % 10 == 0:  # an impatient buyer tries again
                    tally(buyer, await engine.reserve(SKU, buyer=buyer))

        async def in_batches(task: int) -> None:
            for start in range(task * per_task, (task + 1) * per_task, 100):
                names = [f"buyer-{index}" for index in range(start, start + 100)]
                names += names[:10]  # the same buyers twice in one batch
                replies = await engine.execute([Reserve(SKU, name, 1) for name in names])
                for name, reply in zip(names, replies, strict=True):
                    tally(name, reply)

        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                nursery.start_soon(one_at_a_time if task % 2 else in_batches, task)
        assert statuses["ok"] == units
        assert set(statuses) <= {"ok", "sold_out", "limit_exceeded"}
        assert sum(statuses.values()) == buyers + buyers // 10
        assert len(oks) == units
        assert max(oks.values()) == 1
        assert len(reservations) == units
        assert sorted(remaining) == list(range(units))
        assert await counts(engine) == (units, 0, units, 0)
