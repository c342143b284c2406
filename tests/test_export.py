"""`soldout export`: every hold of a data directory, and per-SKU totals that match `stock`."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from data_files import as_if_killed

from engine import DataDirError, EngineConfig, open_engine
from engine.cli.main import main
from engine.export import export


async def make_sale(data_dir: str, wall_clock: object) -> dict[str, tuple[int, int, int, int]]:
    """Holds in every state over two SKUs; returns each SKU's (stock, available, held, sold)."""
    config = EngineConfig(shards=3, data_dir=data_dir, durable=False, wall_clock=wall_clock)  # type: ignore[arg-type]
    async with open_engine(config) as engine:
        await engine.put_sku("BAND", stock=10, per_buyer_limit=2, hold_seconds=60)
        await engine.put_sku("PHONE", stock=5, per_buyer_limit=1, hold_seconds=3600)
        confirmed = await engine.reserve("BAND", buyer="u1", qty=2, key="u1-1")
        cancelled = await engine.reserve("BAND", buyer="u2", qty=1)
        expiring = await engine.reserve("BAND", buyer="u3", qty=1)
        held = await engine.reserve("PHONE", buyer="u1", qty=1, key="u1-phone")
        assert (await engine.confirm(confirmed.reservation, buyer="u1", order="po-1001")).status == "ok"
        assert (await engine.cancel(cancelled.reservation, buyer="u2")).status == "ok"
        await trio.sleep(61)  # the BAND hold of u3 runs out; the PHONE hold does not
        assert (await engine.confirm(expiring.reservation, buyer="u3")).status == "expired"
        assert held.status == "ok"
        totals = {}
        for sku in ("BAND", "PHONE"):
            stock = await engine.stock(sku)
            totals[sku] = (stock.stock, stock.available, stock.held, stock.sold)
    return totals


async def test_export_lists_every_hold_with_its_state_and_totals_that_match_stock(
    autojump_clock: trio.testing.MockClock, wall_clock: object, data_dir: str
) -> None:
    totals = await make_sale(data_dir, wall_clock)
    output = io.StringIO()
    assert export(data_dir, output) == 4
    lines = [json.loads(line) for line in output.getvalue().splitlines()]
    holds = [line for line in lines if line["type"] == "hold"]
    skus = {line["sku"]: line for line in lines if line["type"] == "sku"}
    assert sorted((hold["sku"], hold["buyer"], hold["qty"], hold["state"]) for hold in holds) == [
        ("BAND", "u1", 2, "confirmed"),
        ("BAND", "u2", 1, "cancelled"),
        ("BAND", "u3", 1, "expired"),
        ("PHONE", "u1", 1, "held"),
    ]
    assert len({hold["reservation"] for hold in holds}) == 4
    assert {hold["key"] for hold in holds} == {"u1-1", "u1-phone", None}
    for hold in holds:
        assert hold["expires_at"] > hold["created_at"]
        assert (hold["ended_at"] is None) == (hold["state"] == "held")
    for sku, (stock, available, held, sold) in totals.items():
        assert (skus[sku]["stock"], skus[sku]["available"], skus[sku]["held"], skus[sku]["sold"]) == (
            stock,
            available,
            held,
            sold,
        )
        # The totals are the sum of the holds, not a second bookkeeping.
        assert skus[sku]["held"] == sum(h["qty"] for h in holds if h["sku"] == sku and h["state"] == "held")
        assert skus[sku]["sold"] == sum(h["qty"] for h in holds if h["sku"] == sku and h["state"] == "confirmed")


async def test_export_reads_without_changing_a_file(
    autojump_clock: trio.testing.MockClock, wall_clock: object, data_dir: str
) -> None:
    await make_sale(data_dir, wall_clock)
    append_torn_entry(data_dir)
    before = file_sizes(data_dir)
    assert export(data_dir, io.StringIO()) == 4
    assert file_sizes(data_dir) == before


def append_torn_entry(data_dir: str) -> None:
    """A torn tail, as a commit in progress on a running server leaves it."""
    as_if_killed(data_dir)  # a running server has not recorded a clean close
    with open(os.path.join(data_dir, "shard-0", "journal-0000000000.log"), "ab") as file:
        file.write(b"SJ\x02\x00\x40\x00")


def file_sizes(data_dir: str) -> dict[str, int]:
    return {
        os.path.join(root, name): os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(data_dir)
        for name in names
    }


def test_the_export_command_writes_json_lines_and_refuses_a_directory_that_is_not_soldouts(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(tmp_path / "data")  # type: ignore[operator]
    trio.run(
        make_sale,
        data_dir,
        lambda: 1_700_000_000.0 + trio.current_time(),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
    output = str(tmp_path / "holds.jsonl")  # type: ignore[operator]
    assert main(["export", "--data-dir", data_dir, "--output", output]) == 0
    with open(output) as file:
        assert sum(json.loads(line)["type"] == "hold" for line in file) == 4
    assert main(["export", "--data-dir", str(tmp_path)]) == 1
    assert "not a soldout data directory" in capsys.readouterr().err
    with pytest.raises(DataDirError):
        export(str(tmp_path), io.StringIO())


def export_command(data_dir: str, tmp_path: Path, *filters: str) -> list[dict[str, Any]]:
    output = str(tmp_path / "holds.jsonl")
    assert main(["export", "--data-dir", data_dir, "--output", output, *filters]) == 0
    with open(output) as file:
        return [json.loads(line) for line in file]


def test_export_writes_the_order_and_filters_by_sku_state_and_time(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    epoch = 1_700_000_000.0
    trio.run(
        make_sale, data_dir, lambda: epoch + trio.current_time(), clock=trio.testing.MockClock(autojump_threshold=0)
    )
    every = export_command(data_dir, tmp_path)
    holds = [line for line in every if line["type"] == "hold"]
    (confirmed,) = [hold for hold in holds if hold["state"] == "confirmed"]
    assert confirmed["order"] == "po-1001"
    assert all(hold["order"] is None for hold in holds if hold is not confirmed)

    band = export_command(data_dir, tmp_path, "--sku", "BAND")
    assert {line["sku"] for line in band} == {"BAND"}
    assert [line["type"] for line in band].count("hold") == 3
    # The totals stay whole, so they keep matching stock.
    assert [line for line in band if line["type"] == "sku"] == [
        line for line in every if line["type"] == "sku" and line["sku"] == "BAND"
    ]

    ended = export_command(data_dir, tmp_path, "--state", "cancelled", "--state", "expired")
    assert sorted(line["state"] for line in ended if line["type"] == "hold") == ["cancelled", "expired"]
    assert len([line for line in ended if line["type"] == "sku"]) == 2

    # Holds created or ended at or after the time: the expiry (61 s in) is the only one that late.
    for since in (str(epoch + 30), "2023-11-14T22:13:50+00:00"):
        late = [line for line in export_command(data_dir, tmp_path, "--since", since) if line["type"] == "hold"]
        assert [line["state"] for line in late] == ["expired"], since
    assert (
        len([line for line in export_command(data_dir, tmp_path, "--since", str(epoch)) if line["type"] == "hold"]) == 4
    )
