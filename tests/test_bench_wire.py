"""The wire cases of `soldout bench wire`: its quick run end to end, and the pieces the
harness reads the wire with (the frames, the reply frames, the echo checks, the soak's
RSS figures).

The quick run starts real processes (an echo server, soldout servers, load drivers) on
loopback. What is checked is that it prints its table and its ratios to echo, and that
its own correctness checks passed; its figures are never asserted, since they measure a
shared machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from bench.checks import Counts, Observed, check_echo_run, check_run, failures
from bench.driver import Batch, crowd_items
from bench.report import RUN_HEADERS, rss_figures
from bench.scenarios import WIRE_CASES, build_scenario, wire_cases
from bench.targets import ECHOED, ProtocolBreach, soldout_encoder, websocket_answers
from protocol.codec import ServerCodec
from protocol.limits import Limits
from protocol.messages import Reserve

ROOT = Path(__file__).resolve().parent.parent
QUICK_RUN_SECONDS_MAX = 300


@pytest.mark.slow
def test_quick_run_prints_its_table_and_passes_its_correctness_check() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.cli", "wire", "--quick", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_SECONDS_MAX,
        check=False,
    )
    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    lines = output.splitlines()
    header = next((line for line in lines if line.startswith("run ")), None)
    assert header is not None, output
    for column in RUN_HEADERS:
        assert column in header
    table = lines[lines.index(header) + 2 :]
    for label in (
        "echo, 1/frame, closed loop",
        "soldout memory, 1/frame, closed loop",
        "soldout durable, 1/frame, closed loop",
        "echo, 100/frame, closed loop",
        "soldout memory, 100/frame, closed loop",
        "soldout durable, 100/frame, closed loop",
        "soldout durable, 10/frame, open loop, 5,000/s offered",
        "soldout durable, 100/frame, soak",
    ):
        assert any(line.startswith(label) for line in table), f"no row for {label!r}:\n{output}"
    for share in ("memory, 1/frame", "durable, 1/frame", "memory, 100/frame", "durable, 100/frame"):
        assert re.search(rf"soldout {share}, closed loop: \d+% of the echo server's rate in the same run", output)
    assert "correctness checks passed" in output
    assert "FAIL" not in output
    assert "server RSS start" in output
    # Figures and ratios only: no target, no verdict on speed.
    assert not re.search(r"\b(met|target|targets)\b", output), output


def test_the_wire_cases_come_in_their_order_with_their_frames_and_pace() -> None:
    cases = wire_cases(list(reversed(WIRE_CASES)), open_batch=50)
    assert [case.name for case in cases] == list(WIRE_CASES)
    by_name = {case.name: case for case in cases}
    assert (by_name["echo-1"].target, by_name["echo-1"].batch) == ("echo", 1)
    assert (by_name["durable-100"].storage, by_name["durable-100"].batch) == ("durable", 100)
    assert by_name["open-loop"].open_loop
    assert by_name["open-loop"].batch == 50
    assert by_name["soak"].soak
    assert by_name["soak"].storage == "durable"
    with pytest.raises(ValueError, match="unknown wire cases stampede"):
        wire_cases(["stampede"], open_batch=50)


def _plan_and_items(count: int) -> tuple[object, list]:
    plan = build_scenario("flash", buyers=count, sku_tag="t").plan()
    return plan, crowd_items(plan, range(count))


def test_a_frame_of_the_bench_is_a_batch_of_valid_reserves_for_distinct_buyers() -> None:
    plan, items = _plan_and_items(100)
    frame = ServerCodec(Limits()).decode(soldout_encoder(plan)(items, 7))  # type: ignore[arg-type]
    assert frame.batch
    assert frame.ids == list(range(7, 107))
    assert frame.ops == ["reserve"] * 100
    commands = frame.commands
    assert all(type(command) is Reserve and command.sku == "MI-BAND-t" and command.qty == 1 for command in commands)
    assert len({command.buyer for command in commands}) == 100
    assert len({command.key for command in commands}) == 100


def test_a_frame_of_one_request_is_a_single_map() -> None:
    plan, items = _plan_and_items(1)
    frame = ServerCodec(Limits()).decode(soldout_encoder(plan)(items, 1))  # type: ignore[arg-type]
    assert not frame.batch
    assert frame.commands == [Reserve("MI-BAND-t", "u0", 1, "k0")]


def test_reply_frames_are_matched_by_their_first_id_and_read_in_order() -> None:
    plan, items = _plan_and_items(3)
    outstanding = {5: Batch(items, 5, b""), 9: Batch(items[:1], 9, b""), 20: Batch(items[:2], 20, b"")}
    replies = [{"id": 5, "status": "ok", "reservation": "0-1", "remaining": 4}, {"id": 6, "status": "sold_out"}]
    replies.append({"id": 7, "status": "sold_out"})
    assert websocket_answers(msgpack.packb(replies), outstanding) == (
        5,
        [("ok", "0-1", 4), ("sold_out", None, None), ("sold_out", None, None)],
    )
    assert websocket_answers(msgpack.packb({"id": 9, "status": "busy"}), outstanding) == (9, [("busy", None, None)])
    # An echo server sends the requests back: they have no status.
    echoed = soldout_encoder(plan)(items[:2], 20)  # type: ignore[arg-type]
    assert websocket_answers(echoed, outstanding) == (20, [(ECHOED, None, None), (ECHOED, None, None)])
    with pytest.raises(ProtocolBreach, match="not in flight"):
        websocket_answers(msgpack.packb({"id": 99, "status": "ok"}), outstanding)
    with pytest.raises(ProtocolBreach, match="2 replies for a batch of 3"):
        websocket_answers(msgpack.packb(replies[:2]), outstanding)


def _observed(buyers: int, answered: int, unanswered: int = 0) -> Observed:
    return Observed([], {}, {}, buyers, answered, 0, unanswered)


def test_the_echo_checks_want_every_request_back_as_it_went() -> None:
    assert failures(check_echo_run(_observed(10, 10), {"reserve": {ECHOED: 10}})) == []
    problems = failures(check_echo_run(_observed(10, 8, unanswered=1), {"reserve": {ECHOED: 7, "ok": 1}}))
    assert problems == [
        "only echoed requests came back: {'reserve ok': 1}",
        "every request sent came back: 3 requests sent but not echoed",
    ]


def test_rss_figures_give_the_growth_from_the_settled_size_to_the_end() -> None:
    assert rss_figures([]) is None
    # 100 s of soak: settled after 20 s (a fifth of it).
    samples = [(0.0, 90_000), (10.0, 99_000), (20.0, 100_000), (60.0, 101_000), (100.0, 105_000)]
    figures = rss_figures(samples)
    assert figures is not None
    assert (figures["start_kibibytes"], figures["settled_kibibytes"], figures["end_kibibytes"]) == (
        90_000,
        100_000,
        105_000,
    )
    assert figures["peak_kibibytes"] == 105_000
    assert figures["growth_kibibytes"] == 5_000
    assert figures["growth_share"] == pytest.approx(0.05)


def test_a_crowd_answered_anything_but_ok_sold_out_or_busy_fails() -> None:
    scenario = build_scenario("flash", buyers=20, stock=10, sku_tag="t")
    holds = [(0, number, f"0-{number}") for number in range(10)]
    observed = Observed(holds, {}, {}, 20, 20, 0, 0)
    counts = [Counts(10, 0, 10, 0)]
    good = {"ok": 10, "sold_out": 10, "busy": 3}
    assert failures(check_run(scenario, [20], observed, counts, reserve_statuses=good)) == []
    problems = failures(check_run(scenario, [20], observed, counts, reserve_statuses={"ok": 10, "invalid": 10}))
    assert problems == ["reserves answered only ok, sold_out, busy or unavailable: {'invalid': 10}"]
