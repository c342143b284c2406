"""The bench's own logic: scenarios, the driving logic, merging and reporting (the spread
of repeated runs, the chart), the end checks (a deliberately oversold result must fail
them), and small end-to-end runs of `soldout bench` against a spawned server, against
Redis and the echo server side by side, and against a running server it must leave as
it found it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from wire_helpers import ADMIN_TOKEN, FRONTEND_TOKEN, server_config

from bench import cli, redis_peer, runs
from bench.checks import Check, Counts, Observed, check_run, failures
from bench.driver import (
    BUSY,
    CANCEL_OP,
    CONFIRM_OP,
    OK,
    RESERVE_OP,
    Answer,
    Batch,
    ConnectionWork,
    DriverResult,
    DriverSettings,
    Item,
    Tally,
    connection_phase,
    crowd_items,
)
from bench.orchestrator import Load
from bench.redis_peer import REDIS_MISSING
from bench.report import (
    PLOT_MISSING,
    SOLD_OUT_LABEL,
    PlotUnavailable,
    RunReport,
    chart,
    human_summary,
    json_report,
    merge,
    plot,
    ratio,
    remaining_left,
    runs_table,
    spread,
    spread_table,
    units_left,
)
from bench.scenarios import (
    CANCEL,
    CONFIRM,
    EXPIRE,
    KEEP,
    build_scenario,
    split,
    split_weighted,
)
from engine.server.runner import open_server
from protocol.client import open_client

# ---------------------------------------------------------------- scenarios


def test_flash_defaults_are_the_mi_band_sale() -> None:
    scenario = build_scenario("flash")
    assert len(scenario.skus) == 1
    (sku,) = scenario.skus
    assert (sku.stock, sku.per_buyer_limit) == (10_000, 1)
    assert scenario.buyers == 200_000
    plan = scenario.plan()
    assert plan.demand() == [200_000]
    assert set(plan.actions) == {KEEP}


def test_catalog_spreads_buyers_uniformly_over_a_thousand_skus() -> None:
    scenario = build_scenario("catalog", buyers=100_000, seed=7)
    assert len(scenario.skus) == 1000
    assert len({sku.sku for sku in scenario.skus}) == 1000
    demand = scenario.plan().demand()
    assert sum(demand) == 100_000
    # 100 expected per SKU; a uniform draw of this size stays well inside these bounds.
    assert 50 < min(demand) <= max(demand) < 150


def test_a_plan_is_the_same_for_the_same_seed_and_differs_for_another() -> None:
    first = build_scenario("catalog", buyers=5000, seed=3).plan()
    again = build_scenario("catalog", buyers=5000, seed=3).plan()
    other = build_scenario("catalog", buyers=5000, seed=4).plan()
    assert first.sku_indexes == again.sku_indexes
    assert first.sku_indexes != other.sku_indexes
    checkout = build_scenario("checkout", buyers=5000, seed=3)
    assert checkout.plan().actions == build_scenario("checkout", buyers=5000, seed=3).plan().actions


def test_checkout_draws_winner_actions_in_the_given_shares() -> None:
    scenario = build_scenario("checkout", buyers=20_000, seed=11, confirm_share=0.5, cancel_share=0.3)
    assert scenario.skus[0].hold_seconds == 2.0
    actions = scenario.plan().actions
    shares = {action: actions.count(action) / len(actions) for action in (CONFIRM, CANCEL, EXPIRE)}
    assert shares[CONFIRM] == pytest.approx(0.5, abs=0.02)
    assert shares[CANCEL] == pytest.approx(0.3, abs=0.02)
    assert shares[EXPIRE] == pytest.approx(0.2, abs=0.02)


def test_bad_scenarios_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        build_scenario("stampede")
    with pytest.raises(ValueError, match="shares"):
        build_scenario("checkout", confirm_share=0.8, cancel_share=0.3)
    with pytest.raises(ValueError, match="buyers"):
        build_scenario("flash", buyers=0)


def test_sku_names_carry_the_run_tag() -> None:
    assert build_scenario("flash", sku_tag="abc").skus[0].sku == "MI-BAND-abc"
    names = [sku.sku for sku in build_scenario("catalog", skus=12, sku_tag="abc").skus]
    assert names[0] == "SKU-abc-00"
    assert names[-1] == "SKU-abc-11"


@pytest.mark.parametrize(("count", "parts"), [(10, 3), (7, 7), (3, 5), (0, 2), (200_000, 16)])
def test_split_covers_the_range_in_contiguous_near_equal_parts(count: int, parts: int) -> None:
    ranges = split(range(count), parts)
    assert len(ranges) == parts
    assert [number for part in ranges for number in part] == list(range(count))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_split_weighted_follows_the_weights() -> None:
    ranges = split_weighted(range(100, 1100), [3, 1])
    assert ranges == [range(100, 850), range(850, 1100)]


def test_load_gives_each_process_its_connections_and_buyers() -> None:
    scenario = build_scenario("flash", buyers=1001)
    load = Load(procs=3, connections=7, batch=10, inflight=40, rate=700.0, duration_seconds=None, show_progress=False)
    template = DriverSettings("soldout", "ws://x/v1", None, scenario, 0, range(0), 1, 1, 1, None, None)
    settings = load.settings(scenario, template)
    assert [one.connections for one in settings] == [3, 2, 2]
    assert [number for one in settings for number in one.buyers] == list(range(1001))
    assert [one.index for one in settings] == [0, 1, 2]
    assert {one.rate_per_connection for one in settings} == {100.0}
    assert [one.connection_offset for one in settings] == [0, 3, 5]
    # Every connection gets its own place in the open-loop interval.
    phases = [connection_phase(one, number) for one in settings for number in range(one.connections)]
    assert phases == [number / 7 for number in range(7)]


# ---------------------------------------------------------------- the driving logic, without I/O


def encode_nothing(items: Sequence[Item], first_id: int) -> bytes:
    return f"{first_id}:{len(items)}".encode()


def work_for(
    scenario_name: str = "flash",
    *,
    buyers: int = 10,
    batch: int = 3,
    inflight: int = 3,
    rate: float | None = None,
    duration_seconds: float | None = None,
    start_at: float = 100.0,
) -> ConnectionWork:
    scenario = build_scenario(scenario_name, buyers=buyers, stock=5, seed=1)
    plan = scenario.plan()
    tally = Tally(start_at)
    return ConnectionWork(
        crowd_items(plan, range(buyers)),
        plan,
        encode_nothing,
        tally,
        batch=batch,
        inflight=inflight,
        rate=rate,
        duration_seconds=duration_seconds,
    )


def answers(batch: Batch, status: str = "sold_out") -> list[Answer]:
    return [(status, None, None) for _ in batch.items]


def test_closed_loop_sends_batches_within_the_window_and_ends_when_all_are_answered() -> None:
    work = work_for(buyers=10, batch=3, inflight=6)
    first = work.take(100.0)
    second = work.take(100.0)
    assert first is not None
    assert second is not None
    assert [len(first.items), len(second.items)] == [3, 3]
    assert (first.first_id, second.first_id) == (1, 4)
    assert first.payload == b"1:3"
    assert work.take(100.0) is None  # the window of 6 is full
    assert work.wake_at() is None  # only an answer can help
    work.answered(first, answers(first), 100.002)
    third = work.take(100.002)
    assert third is not None
    assert work.take(100.002) is None
    for batch in (second, third):
        work.answered(batch, answers(batch), 100.004)
    last = work.take(100.004)
    assert last is not None
    assert len(last.items) == 1
    assert not work.finished
    work.answered(last, answers(last), 100.005)
    assert work.finished
    tally = work.tally
    assert tally.statuses[RESERVE_OP] == {"sold_out": 10}
    assert (tally.sent, tally.answered, tally.crowd_answered) == (10, 10, 10)
    # The first batch was answered 2 ms after it went: three requests of about 2,000 us.
    assert tally.histogram.get_total_count() == 10
    assert 1990 <= tally.histogram.get_value_at_percentile(30) <= 2010


def test_a_batch_bigger_than_the_window_still_goes_alone() -> None:
    work = work_for(buyers=4, batch=4, inflight=2)
    batch = work.take(100.0)
    assert batch is not None
    assert len(batch.items) == 4


def test_open_loop_follows_the_schedule_and_charges_the_wait() -> None:
    # 2 requests per batch at 100 requests/s: a batch every 20 ms from the start.
    work = work_for(buyers=6, batch=2, inflight=100, rate=100.0, start_at=100.0)
    first = work.take(100.0)
    assert first is not None
    assert first.intended_at == 100.0
    assert work.take(100.001) is None
    assert work.wake_at() == pytest.approx(100.02)
    # The driver was late: the batch goes at 100.05 but was due at 100.02.
    second = work.take(100.05)
    assert second is not None
    assert second.intended_at == pytest.approx(100.02)
    work.answered(second, answers(second), 100.06)
    assert work.tally.histogram.get_max_value() == pytest.approx(40_000, rel=0.01)


def test_open_loop_connections_keep_their_phase_in_the_interval() -> None:
    scenario = build_scenario("flash", buyers=4, stock=5)
    plan = scenario.plan()
    work = ConnectionWork(
        crowd_items(plan, range(4)),
        plan,
        encode_nothing,
        Tally(100.0),
        batch=2,
        inflight=100,
        rate=100.0,
        duration_seconds=None,
        phase=0.25,
    )
    assert work.take(100.0) is None
    assert work.wake_at() == pytest.approx(100.005)
    first = work.take(100.005)
    assert first is not None
    assert work.wake_at() == pytest.approx(100.025)


def test_busy_answers_are_retried_with_the_same_request() -> None:
    work = work_for(buyers=3, batch=3, inflight=3)
    batch = work.take(100.0)
    assert batch is not None
    work.answered(batch, [(BUSY, None, None), (OK, "0-1", 4), ("sold_out", None, None)], 100.001)
    retry = work.take(100.001)
    assert retry is not None
    assert retry.items == [batch.items[0]]
    assert work.tally.busy_retries == 1
    assert work.tally.crowd_answered == 2
    work.answered(retry, [(OK, "0-2", 3)], 100.002)
    assert work.finished
    assert work.tally.holds == [(0, 1, "0-1"), (0, 0, "0-2")]
    assert work.tally.statuses[RESERVE_OP] == {BUSY: 1, OK: 2, "sold_out": 1}


def test_checkout_winners_follow_up_with_their_action() -> None:
    work = work_for("checkout", buyers=40, batch=40, inflight=100)
    actions = work.plan.actions
    batch = work.take(100.0)
    assert batch is not None
    work.answered(batch, [(OK, f"0-{number}", 0) for number in range(40)], 100.001)
    follow_up = work.take(100.001)
    assert follow_up is not None
    expected = [
        (CONFIRM_OP if actions[number] == CONFIRM else CANCEL_OP, number, 0, f"0-{number}")
        for number in range(40)
        if actions[number] in (CONFIRM, CANCEL)
    ]
    assert list(follow_up.items) == expected
    assert follow_up.intended_at == 100.001
    work.answered(follow_up, [(OK, None, None)] * len(expected), 100.002)
    confirms = sum(1 for item in expected if item[0] == CONFIRM_OP)
    assert work.tally.confirmed == {0: confirms}
    assert work.tally.cancelled == {0: len(expected) - confirms}
    assert work.tally.won == 40
    # All within the first 100 ms: units taken less units given back, and the fewest left.
    assert work.tally.held_per_bucket == [40 - (len(expected) - confirms)]
    assert work.tally.remaining_per_bucket == [0]
    assert work.tally.sold_out_at == {0: 100.001}
    assert work.finished


def test_the_duration_cap_stops_the_crowd_but_not_the_answers() -> None:
    work = work_for(buyers=9, batch=3, inflight=100, duration_seconds=1.0, start_at=100.0)
    batch = work.take(100.5)
    assert batch is not None
    assert work.take(101.0) is None
    assert work.tally.unsent_buyers == 6
    assert not work.finished
    work.answered(batch, answers(batch), 101.1)
    assert work.finished


def test_open_loop_packs_each_batch_when_due_and_the_cap_counts_the_buyers_never_packed() -> None:
    # 3 requests per batch at 300 requests/s: a batch every 10 ms, for 25 ms.
    work = work_for(buyers=12, batch=3, inflight=100, rate=300.0, duration_seconds=0.025, start_at=100.0)
    assert len(work._crowd) == 1  # only the next batch is packed ahead
    sent = [work.take(moment) for moment in (100.0, 100.01, 100.02)]
    assert [batch.first_id for batch in sent if batch is not None] == [1, 4, 7]
    assert work.take(100.03) is None
    assert work.tally.unsent_buyers == 3
    for batch in sent:
        assert batch is not None
        work.answered(batch, answers(batch), 100.031)
    assert work.finished
    assert work.tally.crowd_answered == 9


# ---------------------------------------------------------------- merging and reporting


def driver_result(
    index: int, latencies_us: Sequence[int], holds: list[tuple[int, int, str]], **overrides: object
) -> DriverResult:
    tally = Tally(10.0)
    for latency in latencies_us:
        tally.histogram.record_value(latency)
    fields: dict[str, object] = {
        "index": index,
        "statuses": {RESERVE_OP: {OK: len(holds), "sold_out": len(latencies_us) - len(holds)}},
        "histogram": tally.histogram.encode(),
        "answered_per_bucket": [len(latencies_us)],
        "held_per_bucket": [len(holds)],
        "ok_per_bucket": [len(holds)],
        "sold_out_per_bucket": [len(latencies_us) - len(holds)],
        "remaining_per_bucket": [None],
        "first_send_at": 10.0 + index,
        "last_answer_at": 12.0 + index,
        "crowd_answered_at": 12.0 + index,
        "sold_out_at": {0: 11.0 + index} if holds else {},
        "holds": holds,
        "confirmed": {},
        "cancelled": {},
        "sent": len(latencies_us),
        "crowd_buyers": len(latencies_us),
        "crowd_answered": len(latencies_us),
        "busy_retries": 0,
    }
    fields.update(overrides)
    return DriverResult(**fields)  # type: ignore[arg-type]


def test_merge_adds_up_histograms_statuses_and_timelines() -> None:
    first = driver_result(0, [1000] * 90 + [50_000] * 10, [(0, 1, "0-1")])
    second = driver_result(
        1,
        [2000] * 100,
        [(0, 2, "0-2")],
        answered_per_bucket=[60, 40],
        held_per_bucket=[1, 0],
        remaining_per_bucket=[0, 1],
    )
    merged = merge([first, second])
    assert merged.histogram.get_total_count() == 200
    assert merged.statuses == {RESERVE_OP: {OK: 2, "sold_out": 198}}
    assert merged.answered_per_bucket == [160, 40]
    assert merged.held_per_bucket == [2, 0]
    assert merged.remaining_per_bucket == [0, 1]
    assert merged.first_send_at == 10.0
    assert merged.last_answer_at == 13.0
    assert merged.sold_out_at == {0: 11.0}
    assert merged.answered == 200
    assert merged.observed.holds == [(0, 1, "0-1"), (0, 2, "0-2")]
    assert merged.observed.crowd_buyers == 200

    run = RunReport("soldout memory", "soldout", "memory", "flash", 1, 2, 200, merged)
    summary = run.summary()
    assert summary["elapsed_seconds"] == 3.0
    assert summary["throughput_per_second"] == pytest.approx(200 / 3)
    assert summary["latency_ms"]["p50"] == pytest.approx(2.0, rel=0.01)
    assert summary["latency_ms"]["p99"] == pytest.approx(50.0, rel=0.01)
    assert summary["latency_ms"]["max"] == pytest.approx(50.0, rel=0.01)
    assert summary["sold_out_after_ms"] == pytest.approx(1000.0)
    assert summary["all_answered_after_ms"] == pytest.approx(3000.0)
    # One SKU: units left as the server reported them, a unit given back included.
    assert summary["timeline"]["units_left"] == [0, 1]


def test_units_left_counts_down_from_the_stock() -> None:
    assert units_left(10, [3, 0, 5, -1, 3]) == [7, 7, 2, 3, 0]
    assert remaining_left(10, [None, 6, None, 7], 6) == [10, 6, 6, 7, 7, 7]


def test_table_json_and_ratio() -> None:
    fast = merge([driver_result(0, [1000] * 100, [(0, 1, "0-1")])])
    slow = merge([driver_result(0, [4000] * 100, [(0, 1, "S:1")], last_answer_at=14.0)])
    ours = RunReport("soldout durable", "soldout", "durable", "flash", 1, 1, 100, fast, [Check("a check", True)])
    theirs = RunReport(
        "redis durable", "redis", "durable", "flash", 1, 1, 100, slow, [Check("a check", False, "broke")]
    )
    figures = ratio(ours, theirs)
    assert figures["throughput"] == pytest.approx(2.0)
    assert figures["p99"] == pytest.approx(0.25, rel=0.01)
    table = runs_table([ours, theirs])
    assert "soldout durable" in table
    assert "redis durable" in table
    assert "passed" in table
    assert "FAILED" in table
    document = json.loads(json_report({"scenario": "flash"}, [ours, theirs]))
    assert document["passed"] is False
    assert document["ratio"]["throughput"] == pytest.approx(2.0)
    assert [run["label"] for run in document["runs"]] == ["soldout durable", "redis durable"]
    assert document["runs"][1]["checks"] == [{"name": "a check", "passed": False, "detail": "broke"}]
    assert human_summary(ours) == (
        "soldout durable: 1 units, 100 buyers, 1 holds; sold out after 1,000 ms, "
        "every buyer answered after 2,000 ms; 50 requests/s, p99 1.0 ms; all 1 invariant checks passed"
    )
    assert human_summary(theirs).endswith("1 of 1 checks FAILED")


def test_plot_says_what_to_install_when_matplotlib_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = RunReport("soldout memory", "soldout", "memory", "flash", 1, 1, 100, merge([driver_result(0, [1000], [])]))
    with pytest.raises(PlotUnavailable) as raised:
        plot([run], str(tmp_path / "chart.png"))
    assert str(raised.value) == PLOT_MISSING
    assert "pip install" in PLOT_MISSING
    assert not (tmp_path / "chart.png").exists()


def test_the_redis_driver_has_as_many_connections_as_soldouts_each_with_one_batch_in_flight() -> None:
    scenario = build_scenario("flash", buyers=1000)
    load = Load(procs=2, connections=6, batch=50, inflight=100, rate=None, duration_seconds=None, show_progress=False)
    template = DriverSettings("soldout", "ws://x/v1", None, scenario, 0, range(0), 1, 1, 1, None, None)
    soldout = load.settings(scenario, template)
    redis = runs.redis_load(load).settings(scenario, replace(template, target="redis"))
    assert sum(one.connections for one in redis) == sum(one.connections for one in soldout) == 6
    assert [one.connections for one in redis] == [one.connections for one in soldout]
    assert [one.buyers for one in redis] == [one.buyers for one in soldout]
    assert {one.inflight for one in redis} == {50}  # one pipelined batch per connection
    assert {one.batch for one in redis} == {one.batch for one in soldout} == {50}


def test_spread_gives_the_median_the_range_and_its_share() -> None:
    assert spread([10.0, 12.0, 8.0]) == {"median": 10.0, "min": 8.0, "max": 12.0, "spread": 0.4}
    runs = [
        RunReport(
            "soldout memory", "soldout", "memory", "flash", 1, 1, 100, merge([driver_result(0, [1000] * 100, [])])
        ),
        RunReport(
            "soldout memory",
            "soldout",
            "memory",
            "flash",
            1,
            1,
            100,
            merge([driver_result(0, [3000] * 100, [], last_answer_at=14.0)]),
        ),
    ]
    table = spread_table(runs).splitlines()
    assert table[0].split() == ["run", "figure", "runs", "median", "min", "max", "spread"]
    throughput = next(line for line in table if "throughput" in line)
    # 100 answers over 2 s and over 4 s: 50/s and 25/s.
    assert throughput.split()[-5:] == ["2", "37.50", "25.00", "50.00", "67%"]
    p50 = next(line for line in table if "p50 latency" in line)
    assert p50.split()[-4:-1] == ["2.00", "1.00", "3.00"]


def _chart_texts(figure: object) -> list[str]:
    texts = [figure._suptitle.get_text()]  # type: ignore[attr-defined]
    for axes in figure.axes:  # type: ignore[attr-defined]
        texts += [text.get_text() for text in axes.texts]
    return texts


def test_the_chart_is_titled_with_the_settings_marks_the_sell_out_and_splits_ok_from_sold_out() -> None:
    result = driver_result(
        0,
        [1000] * 100,
        [(0, 1, "0-1")],
        answered_per_bucket=[60, 40],
        held_per_bucket=[1, 0],
        ok_per_bucket=[1, 0],
        sold_out_per_bucket=[59, 40],
        remaining_per_bucket=[0, None],
    )
    run = RunReport("soldout memory", "soldout", "memory", "flash", 1, 1, 100, merge([result]))
    title = "flash: 1 SKU x 1 units, 100 buyers (seed 1); 2 procs, 4 connections, batches of 50"
    figure = chart([run], title)
    try:
        assert title in _chart_texts(figure)
        units_axes, rate_axes, _ = figure.axes
        # Sold out 1 s after the first send: a line there, labelled, and a note saying when.
        marks = [line for line in units_axes.get_lines() if line.get_label() == f"soldout memory: {SOLD_OUT_LABEL}"]
        assert len(marks) == 1
        assert list(marks[0].get_xdata()) == [1.0, 1.0]
        assert any(text.startswith(f"soldout memory: {SOLD_OUT_LABEL} at 1.000 s") for text in _chart_texts(figure))
        series = {line.get_label(): list(line.get_ydata()) for line in rate_axes.get_lines()}
        assert series["soldout memory: ok"] == [pytest.approx(10.0), 0.0]
        assert series["soldout memory: sold_out"] == [pytest.approx(590.0), pytest.approx(400.0)]
    finally:
        import matplotlib.pyplot as pyplot

        pyplot.close(figure)


# ---------------------------------------------------------------- the end checks


def observed(holds: list[tuple[int, int, str]], *, buyers: int = 20, **overrides: object) -> Observed:
    fields: dict[str, object] = {
        "holds": holds,
        "confirmed": {},
        "cancelled": {},
        "crowd_buyers": buyers,
        "crowd_answered": buyers,
        "unsent_buyers": 0,
        "unanswered": 0,
    }
    fields.update(overrides)
    return Observed(**fields)  # type: ignore[arg-type]


def test_an_honest_flash_sale_passes_every_check() -> None:
    scenario = build_scenario("flash", buyers=20, stock=10)
    holds = [(0, number, f"0-{number}") for number in range(10)]
    checks = check_run(
        scenario,
        [20],
        observed(holds),
        [Counts(stock=10, available=0, held=10, sold=0)],
        stats_skus={scenario.skus[0].sku: {"stock": 10, "available": 0, "held": 10, "sold": 0}},
        stats_reserve_ok=10,
    )
    assert failures(checks) == []
    assert {check.name for check in checks} >= {
        "held + sold <= stock",
        "held + sold == stock where demand exceeds it",
        "no buyer over the limit",
        "every ok reservation id distinct",
        "every buyer sent got an answer",
        "stats count every ok reserve",
    }


def test_an_oversold_result_fails_and_says_what_broke() -> None:
    scenario = build_scenario("flash", buyers=20, stock=10)
    sku = scenario.skus[0].sku
    holds = [(0, number, f"0-{number}") for number in range(10)]
    holds.append((0, 3, "0-3"))  # buyer u3 told ok twice, with the same reservation id
    holds.append((0, 15, "0-15"))  # and one more unit than exists
    checks = check_run(
        scenario,
        [20],
        observed(holds),
        [Counts(stock=10, available=-2, held=12, sold=0)],
        stats_reserve_ok=11,
    )
    problems = failures(checks)
    assert f"held + sold <= stock: {sku}: held 12 + sold 0 > stock 10" in problems
    assert f"ok replies <= stock: {sku}: 12 ok for a stock of 10" in problems
    assert f"no buyer over the limit: u3 holds 2 of {sku} (limit 1)" in problems
    assert "every ok reservation id distinct: 0-3 x2" in problems
    assert (
        "stats count every ok reserve: the server counted 11 ok reserves during the run, the drivers were told 12"
        in problems
    )


def test_lost_or_phantom_holds_fail() -> None:
    scenario = build_scenario("flash", buyers=20, stock=10)
    sku = scenario.skus[0].sku
    holds = [(0, number, f"0-{number}") for number in range(9)]
    problems = failures(check_run(scenario, [20], observed(holds), [Counts(10, 0, 10, 0)]))
    assert f"held + sold == ok replies: {sku}: server holds 10, drivers were told ok 9" in problems
    problems = failures(check_run(scenario, [20], observed(holds), [Counts(10, 1, 9, 0)]))
    assert problems == [
        f"held + sold == stock where demand exceeds it: {sku}: held + sold 9, expected 10 (stock 10, demand 20)"
    ]


def test_unanswered_buyers_and_unknown_skus_fail() -> None:
    scenario = build_scenario("catalog", buyers=20, stock=1, skus=2, sku_tag="t")
    holds = [(0, 0, "0-1")]
    problems = failures(check_run(scenario, [10, 10], observed(holds, crowd_answered=18), [Counts(1, 0, 1, 0), None]))
    assert "the server knows every SKU: unknown: SKU-t-1" in problems
    assert "every buyer sent got an answer: 2 buyers sent but without an answer" in problems


def test_checkout_checks_sales_against_confirms_and_expiry() -> None:
    scenario = build_scenario("checkout", buyers=20, stock=10)
    sku = scenario.skus[0].sku
    holds = [(0, number, f"0-{number}") for number in range(12)]  # units came back and went again
    good = observed(holds, confirmed={0: 6}, cancelled={0: 2})
    assert failures(check_run(scenario, [20], good, [Counts(10, 4, 0, 6)], holds_expired=True)) == []
    problems = failures(check_run(scenario, [20], good, [Counts(10, 2, 1, 7)], holds_expired=True))
    assert problems == [
        f"sold == ok confirms: {sku}: sold 7, confirmed ok 6",
        f"no hold outlives its expiry: {sku}: held 1",
    ]


def test_stats_that_disagree_with_stock_fail() -> None:
    scenario = build_scenario("flash", buyers=20, stock=10, sku_tag="t")
    holds = [(0, number, f"0-{number}") for number in range(10)]
    stats = {"MI-BAND-t": {"stock": 10, "available": 1, "held": 9, "sold": 0}}
    problems = failures(check_run(scenario, [20], observed(holds), [Counts(10, 0, 10, 0)], stats_skus=stats))
    assert len(problems) == 1
    assert problems[0].startswith("stats agree with stock: MI-BAND-t: stats")


# ---------------------------------------------------------------- end to end


SMALL = ["--buyers", "3000", "--procs", "2", "--connections", "4", "--batch", "50", "--quiet"]


def test_bench_needs_a_server_to_drive(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--buyers", "10"]) == 2
    assert "give --url" in capsys.readouterr().err
    assert cli.main(["--spawn", "--batch", "0"]) == 2
    assert cli.main(["--no-such-flag"]) == 2


def test_the_redis_peer_without_redis_server_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(redis_peer, "find_redis_server", lambda: None)
    assert cli.main(["--spawn", "--peer", "redis", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "make bench-peer" in error
    assert "apt-get install redis-server" in error


@pytest.mark.slow
def test_flash_against_a_spawned_memory_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "report.json"
    chart_path = tmp_path / "chart.png"
    arguments = [*SMALL, "--stock", "200", "--spawn", "--memory", "--json", str(report_path), "--plot", str(chart_path)]
    assert cli.main(arguments) == 0, capsys.readouterr()
    output = capsys.readouterr().out
    assert "soldout memory" in output
    assert "all 11 checks passed" in output
    assert "soldout memory: 200 units, 3,000 buyers, 200 holds; sold out after" in output
    document = json.loads(report_path.read_text())
    assert document["passed"] is True
    (run,) = document["runs"]
    assert run["statuses"]["reserve"] == {"ok": 200, "sold_out": 2800}
    assert run["requests_answered"] == 3000
    assert run["client_cpu_seconds"] > 0
    assert run["timeline"]["units_left"][-1] == 0
    assert run["sold_out_after_ms"] is not None
    assert sum(run["timeline"]["ok"]) == 200
    assert sum(run["timeline"]["sold_out"]) == 2800
    assert run["server_cpu_microseconds_per_reserve"] is not None
    # Figures only: no target, no verdict on speed.
    assert not re.search(r"\b(met|target|targets)\b", output), output
    # matplotlib comes with the dev extra (soldout[plot]).
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_open_loop_with_a_duration_cap_ends_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "report.json"
    arguments = [
        *SMALL,
        "--buyers",
        "20000",
        "--rate",
        "2000",
        "--duration",
        "0.5",
        "--spawn",
        "--json",
        str(report_path),
    ]
    assert cli.main(arguments) == 0, capsys.readouterr()
    assert "buyers never sent: the duration cap came first" in capsys.readouterr().out
    (run,) = json.loads(report_path.read_text())["runs"]
    assert 0 < run["requests_answered"] < 20_000
    assert run["buyers_not_sent"] == 20_000 - run["requests_answered"]
    assert run["errors"] == []


@pytest.mark.slow
def test_a_failed_check_makes_the_run_exit_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_check_run = runs.check_run

    def with_a_broken_check(*arguments: object, **keywords: object) -> list[Check]:
        return [*real_check_run(*arguments, **keywords), Check("a planted check", False, "planted to fail")]  # type: ignore[arg-type]

    monkeypatch.setattr(runs, "check_run", with_a_broken_check)
    assert cli.main([*SMALL, "--buyers", "500", "--stock", "20", "--spawn"]) == 1
    assert "CHECK FAILED: a planted check: planted to fail" in capsys.readouterr().err


@pytest.mark.slow
def test_checkout_durable_beside_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail(REDIS_MISSING)
    report_path = tmp_path / "report.json"
    arguments = [
        *SMALL,
        "checkout",
        "--stock",
        "300",
        "--hold-seconds",
        "0.5",
        "--spawn",
        "--durable",
        "--peer",
        "redis",
        "--json",
        str(report_path),
    ]
    assert cli.main(arguments) == 0, capsys.readouterr()
    output = capsys.readouterr().out
    assert "soldout durable / redis durable: throughput" in output
    document = json.loads(report_path.read_text())
    assert document["passed"] is True
    assert set(document["ratio"]) == {"throughput", "p99", "server_cpu_per_reserve"}
    soldout, peer = document["runs"]
    for run in (soldout, peer):
        checks = {check["name"] for check in run["checks"]}
        assert {"sold == ok confirms", "no hold outlives its expiry"} <= checks
        assert run["statuses"]["confirm"].get("ok", 0) > 0
        assert run["statuses"]["cancel"].get("ok", 0) > 0
    # The same crowd met the same stock on both sides, over as many connections, Redis
    # with one pipelined batch in flight on each.
    assert soldout["buyers"] == peer["buyers"] == 3000
    assert soldout["connections"] == peer["connections"] == 4
    assert (soldout["inflight_per_connection"], peer["inflight_per_connection"]) == (100, 50)
    # Both servers' CPU per reserve, read from /proc, and their ratio.
    assert soldout["server_cpu_microseconds_per_reserve"] > 0
    assert peer["server_cpu_microseconds_per_reserve"] > 0
    assert document["ratio"]["server_cpu_per_reserve"] > 0
    assert "server CPU per reserve" in output


@pytest.mark.slow
def test_repeat_prints_each_figures_spread_and_the_ratios_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "report.json"
    arguments = [*SMALL, "--buyers", "600", "--stock", "40", "--spawn", "--peer", "echo", "--repeat", "2"]
    assert cli.main([*arguments, "--json", str(report_path)]) == 0, capsys.readouterr()
    output = capsys.readouterr().out
    lines = output.splitlines()
    assert "over 2 rounds:" in lines
    table = lines[lines.index("over 2 rounds:") + 1 :]
    assert table[0].split() == ["run", "figure", "runs", "median", "min", "max", "spread"]
    for label in ("soldout memory", "echo"):
        row = next(line for line in table if line.startswith(label) and "throughput" in line)
        assert row.split()[-5] == "2"  # two runs behind the figure
        assert row.endswith("%")
    assert any(line.startswith("soldout memory / echo over 2 runs, median (range): throughput") for line in lines)
    assert "of the echo server's rate in the same run" in output
    document = json.loads(report_path.read_text())
    assert [run["label"] for run in document["runs"]] == ["soldout memory", "echo"] * 2
    # Each round put SKUs of its own: every soldout round sold exactly its stock.
    assert [run["statuses"]["reserve"]["ok"] for run in document["runs"][::2]] == [40, 40]


async def _held_and_sold(url: str) -> dict[str, tuple[int, int, int]]:
    async with open_client(url, ADMIN_TOKEN) as client:
        stats = await client.stats()
    return {name: (sku["stock"], sku["held"], sku["sold"]) for name, sku in stats["skus"].items()}


@pytest.mark.slow
async def test_a_run_against_a_url_cancels_the_holds_it_made(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    async with open_server(server_config()) as server:
        url = ["--url", server.url, "--token", FRONTEND_TOKEN, "--admin-token", ADMIN_TOKEN]
        arguments = [*url, *SMALL, "--buyers", "800", "--stock", "150", "--json", str(report_path)]
        assert await trio.to_thread.run_sync(cli.main, arguments) == 0
        (run,) = json.loads(report_path.read_text())["runs"]
        assert run["statuses"]["reserve"] == {"ok": 150, "sold_out": 650}
        assert "no hold of the run left on the server" in {check["name"] for check in run["checks"]}
        (cancelled,) = (await _held_and_sold(server.url)).values()
        assert cancelled == (150, 0, 0)
        # Asked to, it leaves them.
        kept = [*url, *SMALL, "--buyers", "300", "--stock", "100", "--keep-holds"]
        assert await trio.to_thread.run_sync(cli.main, kept) == 0
        counts = sorted((await _held_and_sold(server.url)).values())
    assert counts == [(100, 100, 0), (150, 0, 0)]
