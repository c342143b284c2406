"""The embedded benchmark: a quick run prints its tables and its correctness checks pass,
and those checks catch an oversold SKU. Speed is printed as figures and ratios by the
benchmark, never judged by it, and never asserted here."""

from __future__ import annotations

import re
from typing import Any

import pytest

import bench.embedded
from bench.embedded import HOT_SKU, build_workload, check_case, main
from protocol.messages import OK, SOLD_OUT, AnyReply, Reply, StockReply


def test_a_quick_run_prints_every_case_and_passes_its_checks(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--quick"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "decisions/s" in output
    assert "correctness checks: all passed" in output
    assert "FAILED" not in output
    case_rows = [line for line in output.splitlines() if line.rstrip().endswith("passed")]
    assert len(case_rows) == 8, output  # 2 modes x 2 workloads x 2 storages
    for storage in ("memory", "durable"):
        assert sum(f" {storage} " in row for row in case_rows) == 4, output
    assert "durable/memory" in output
    assert "reopen the data_dir of 10,000 live holds" in output
    # Figures and ratios only: no target column, no "met".
    assert not re.search(r"\b(met|target|targets)\b", output), output


def test_soldout_bench_embedded_runs_the_same_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import main as bench_main

    assert bench_main(["embedded", "--case", "batch-hot-memory", "--requests", "1000"]) == 0
    assert '"case": "batch-hot-memory"' in capsys.readouterr().out


def _replies(ok: int, sold_out: int) -> list[AnyReply]:
    return [Reply(OK, reservation=f"0-{number}") for number in range(1, ok + 1)] + [Reply(SOLD_OUT)] * sold_out


def test_the_checks_pass_an_exact_flash_crowd() -> None:
    workload = build_workload("hot", 100, seed=1)
    assert workload.stocks == {HOT_SKU: 10}
    counts = {HOT_SKU: StockReply(OK, stock=10, available=0, held=10, sold=0)}
    assert check_case(workload, _replies(10, 90), counts) == []


def test_the_checks_catch_an_oversold_sku() -> None:
    workload = build_workload("hot", 100, seed=1)
    counts = {HOT_SKU: StockReply(OK, stock=10, available=-1, held=11, sold=0)}
    failures = check_case(workload, _replies(11, 89), counts)
    assert f"{HOT_SKU}: held 11 + sold 0 > stock 10" in failures
    assert "11 ok replies where stock and demand allow exactly 10" in failures


def test_the_checks_catch_a_hold_answered_twice() -> None:
    workload = build_workload("hot", 100, seed=1)
    replies = _replies(10, 90)
    replies[1] = replies[0]
    counts = {HOT_SKU: StockReply(OK, stock=10, available=0, held=10, sold=0)}
    assert check_case(workload, replies, counts) == ["10 ok replies name only 9 distinct holds"]


def test_the_spread_workload_sells_about_half_its_requests() -> None:
    workload = build_workload("spread", 10_000, seed=7)
    assert len(workload.stocks) == 1000
    assert sum(workload.demand.values()) == 10_000
    assert workload.expected_ok == 5000
    assert build_workload("spread", 10_000, seed=7).requests == workload.requests  # a seed replays


def test_a_case_whose_checks_fail_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_check(*arguments: Any) -> list[str]:
        return ["held 11 + sold 0 > stock 10"]

    monkeypatch.setattr(bench.embedded, "check_case", failing_check)
    status = main(["--case", "batch-hot-memory", "--requests", "1000"])
    assert status == 1
    assert "held 11 + sold 0 > stock 10" in capsys.readouterr().out


def test_a_run_whose_case_failed_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_child(arguments: list[str]) -> dict[str, Any]:
        return {"failures": ["the child exited with status 1"]}

    monkeypatch.setattr(bench.embedded, "run_child", failing_child)
    status = main(["--quick", "--skip-holds"])
    output = capsys.readouterr().out
    assert status == 1
    assert "correctness checks FAILED" in output
    assert "batch-hot-memory: the child exited with status 1" in output
