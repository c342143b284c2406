"""`soldout bench --sku NAME` rehearses a sale an operator configured: it reads the SKU from
the server (stock, limit, hold time, opening time, registration), takes its buyers from a
file, starts the crowd when the sale opens, changes none of the SKU's settings, and
cancels the holds it made, so the sale is as the operator left it. And checkout says up
front when its holds would expire before the crowd is even sent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio
from wire_helpers import ADMIN_TOKEN, FRONTEND_TOKEN, server_config

from bench import cli
from engine.server.config import SkuSettings
from engine.server.runner import open_server

LOAD = ["--procs", "2", "--connections", "4", "--batch", "50", "--quiet"]


@pytest.mark.slow
async def test_the_bench_drives_a_configured_registration_only_sale_from_its_opening(tmp_path: Path) -> None:
    registered = [f"fan-{index:05d}" for index in range(1500)]
    buyers_file = tmp_path / "registered.csv"
    buyers_file.write_text("buyer\n" + "".join(f"{buyer}\n" for buyer in registered))
    opens_at = time.time() + 3
    sku = SkuSettings(
        "FLASH-2", stock=400, per_buyer_limit=1, hold_seconds=600, opens_at=opens_at, registration_required=True
    )
    report_path = tmp_path / "report.json"
    async with open_server(server_config(skus=(sku,))) as server:
        assert (await server.engine.register("FLASH-2", registered)).ok
        before = await server.engine.get_sku("FLASH-2")
        arguments = [
            "--url",
            server.url,
            "--token",
            FRONTEND_TOKEN,
            "--admin-token",
            ADMIN_TOKEN,
            "--sku",
            "FLASH-2",
            "--buyers-file",
            str(buyers_file),
            "--json",
            str(report_path),
            *LOAD,
        ]
        code = await trio.to_thread.run_sync(cli.main, arguments)
        after = await server.engine.get_sku("FLASH-2")
    assert code == 0
    (run,) = json.loads(report_path.read_text())["runs"]
    # Nobody was sent before the opening, every buyer was a registered one.
    assert run["statuses"]["reserve"] == {"ok": 400, "sold_out": 1100}
    # The run's 400 holds were cancelled at its end: the units are back on sale.
    assert "cancelled the 400 holds the run made (ok 400)" in run["notes"]
    assert (after.held, after.sold, after.stock, after.available) == (0, 0, 400, 400)
    # The operator's settings are as they were.
    assert (after.opens_at, after.registration_required, after.hold_seconds) == (
        before.opens_at,
        before.registration_required,
        before.hold_seconds,
    )
    assert after.registered == 1500


async def test_a_registration_only_sku_without_a_buyers_file_is_refused_up_front(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sku = SkuSettings("VIP", stock=5, registration_required=True)
    async with open_server(server_config(skus=(sku,))) as server:
        arguments = ["--url", server.url, "--token", ADMIN_TOKEN, "--sku", "VIP", *LOAD]
        assert await trio.to_thread.run_sync(cli.main, arguments) == 1
        missing = ["--url", server.url, "--token", ADMIN_TOKEN, "--sku", "NOPE", *LOAD]
        assert await trio.to_thread.run_sync(cli.main, missing) == 1
    err = capsys.readouterr().err
    assert "VIP takes registered buyers only: give them with --buyers-file" in err
    assert "the server has no SKU 'NOPE'" in err


def test_sku_takes_its_settings_from_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--url", "ws://127.0.0.1:1/v1", "--sku", "X", "--stock", "5", *LOAD]) == 2
    assert "--sku takes the SKU's settings from the server: leave out --stock" in capsys.readouterr().err
    assert cli.main(["--spawn", "--sku", "X", *LOAD]) == 2
    assert "--sku drives a SKU of a running server" in capsys.readouterr().err


def test_a_checkout_whose_holds_expire_before_the_crowd_is_sent_is_refused_up_front(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bug: a checkout of 200,000 buyers with 2 s holds took longer than 2 s to send, so
    every hold expired before its winner's confirm and the report said so only at the end."""
    assert cli.main(["checkout", "--spawn", "--buyers", "200000", "--hold-seconds", "2", *LOAD]) == 1
    err = capsys.readouterr().err
    assert "holds last 2 s, but the crowd of 200,000 takes about" in err
    assert "--rate" in err
    # In open loop the pace is known: 3,000 buyers at 1,000/s take 3 s.
    assert cli.main(["checkout", "--spawn", "--buyers", "3000", "--rate", "1000", "--hold-seconds", "2"]) == 1
    assert "at 1,000 requests/s" in capsys.readouterr().err


def test_checkouts_default_hold_outlives_the_crowd() -> None:
    parser = cli.build_parser()
    big = parser.parse_args(["checkout", "--spawn", "--buyers", "200000"])
    hold = cli._checkout_hold_seconds(big, big.buyers)
    assert hold is not None
    assert hold > cli._crowd_send_seconds(200_000, big)
    small = parser.parse_args(["checkout", "--spawn", "--buyers", "3000"])
    assert cli._checkout_hold_seconds(small, small.buyers) == 2.0
