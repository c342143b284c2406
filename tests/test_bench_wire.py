"""The wire benchmark (bench/wire.py): its quick run end to end, and the pieces it judges by.

The quick run starts real processes (an echo server, soldout servers, load drivers) on
loopback. What is checked is that it prints its table and that its own correctness
checks passed; its figures are never asserted, since they measure a shared machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from bench.wire import (
    ECHOED,
    HEADERS,
    SKU,
    check_echo_case,
    check_soldout_case,
    read_reply_frame,
    reserve_payload,
    rss_is_flat,
)
from protocol.codec import ServerCodec
from protocol.limits import Limits
from protocol.messages import Reserve

ROOT = Path(__file__).resolve().parent.parent
QUICK_RUN_SECONDS_MAX = 300


@pytest.mark.slow
def test_quick_run_prints_its_table_and_passes_its_correctness_check() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.wire", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_SECONDS_MAX,
        check=False,
    )
    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    lines = output.splitlines()
    header = next((line for line in lines if line.startswith("case ")), None)
    assert header is not None, output
    for column in HEADERS:
        assert column in header
    table = lines[lines.index(header) + 2 :]
    for label in (
        "echo, 1/frame",
        "soldout memory, 1/frame",
        "soldout durable, 1/frame",
        "echo, 100/frame",
        "soldout memory, 100/frame",
        "soldout durable, 100/frame",
        "open loop",
        "soak at",
    ):
        assert any(line.startswith(label) for line in table), f"no row for {label!r}:\n{output}"
    assert "correctness check passed" in output
    assert "FAIL" not in output
    assert "server RSS idle" in output


def test_a_frame_of_the_bench_is_a_batch_of_valid_reserves_for_distinct_buyers() -> None:
    frame = ServerCodec(Limits()).decode(reserve_payload(7, 100, "run.case.0.3."))
    assert frame.batch
    assert frame.ids == list(range(7, 107))
    assert frame.ops == ["reserve"] * 100
    commands = frame.commands
    assert all(type(command) is Reserve and command.sku == SKU and command.qty == 1 for command in commands)
    assert len({command.buyer for command in commands}) == 100


def test_a_frame_of_one_request_is_a_single_map() -> None:
    frame = ServerCodec(Limits()).decode(reserve_payload(1, 1, "p."))
    assert not frame.batch
    assert frame.commands == [Reserve(SKU, "p.1", 1, None)]


def test_reply_frames_are_matched_by_their_first_id_and_tallied_by_status() -> None:
    statuses: dict[str, int] = {}
    replies = [{"id": 5, "status": "ok"}, {"id": 6, "status": "sold_out"}, {"id": 7, "status": "sold_out"}]
    assert read_reply_frame(msgpack.packb(replies), statuses) == (5, 3)
    assert read_reply_frame(msgpack.packb({"id": 9, "status": "busy"}), statuses) == (9, 1)
    # An echo server sends the requests back: they have no status.
    assert read_reply_frame(reserve_payload(20, 2, "e."), statuses) == (20, 2)
    assert statuses == {"ok": 1, "sold_out": 2, "busy": 1, ECHOED: 2}


def _failed(checks: list) -> list[str]:
    return [check.name for check in checks if not check.passed]


def test_a_consistent_sold_out_case_passes_every_check() -> None:
    counts = {"status": "ok", "stock": 100, "available": 0, "held": 100, "sold": 0}
    checks = check_soldout_case("case", {"ok": 100, "sold_out": 900, "busy": 5}, counts, 100, 0)
    assert _failed(checks) == []
    assert any("exactly stock ok" in check.name for check in checks)


def test_more_held_and_sold_than_stock_fails() -> None:
    counts = {"status": "ok", "stock": 100, "available": 0, "held": 90, "sold": 11}
    checks = check_soldout_case("case", {"ok": 101, "sold_out": 900}, counts, 100, 0)
    assert "case: held + sold <= stock" in _failed(checks)


def test_fewer_ok_than_stock_when_demand_exceeded_it_fails() -> None:
    counts = {"status": "ok", "stock": 100, "available": 1, "held": 99, "sold": 0}
    checks = check_soldout_case("case", {"ok": 99, "sold_out": 900}, counts, 100, 0)
    assert _failed(checks) == ["case: exactly stock ok when demand exceeds stock"]


def test_ok_replies_the_server_does_not_hold_fail() -> None:
    counts = {"status": "ok", "stock": 100, "available": 60, "held": 40, "sold": 0}
    checks = check_soldout_case("case", {"ok": 41}, counts, 100, 0)
    assert _failed(checks) == ["case: ok replies = held + sold"]


def test_unanswered_requests_unexpected_statuses_and_a_failed_stock_fail() -> None:
    counts = {"status": "ok", "stock": 100, "available": 100, "held": 0, "sold": 0}
    checks = check_soldout_case("case", {"invalid": 3}, counts, 100, 2)
    assert _failed(checks) == ["case: only ok, sold_out or busy", "case: every request answered"]
    assert _failed(check_soldout_case("case", {}, {"status": "busy"}, 100, 0)) == ["case: stock answered"]
    assert _failed(check_echo_case("echo", {ECHOED: 10, "ok": 1}, 1)) == [
        "echo: only echoed requests came back",
        "echo: every request answered",
    ]


@pytest.mark.parametrize(
    ("start", "end", "flat"),
    [(100_000, 100_000, True), (100_000, 105_000, True), (400_000, 419_000, True), (400_000, 430_000, False)],
)
def test_rss_is_flat_within_a_small_growth(start: int, end: int, flat: bool) -> None:
    assert rss_is_flat(start, end) is flat
