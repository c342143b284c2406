"""`soldout serve` as a real process: its address, clean shutdown on SIGTERM, kill -9 under
load and recovery, and config files that stop the start.

Every server here runs on ports the system picks (`port = 0`), and is killed when its
test ends, whatever happens.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from wire_helpers import (
    ADMIN_TOKEN,
    FRONTEND_TOKEN,
    ClientStreams,
    Ledger,
    check_ledger_after_restart,
    exchange,
    load_until_closed,
    open_raw,
    process_environment,
    reserve_map,
    run_server_process,
    soldout_command,
    stop_with_signal,
    wire_counts,
    write_config,
)

SKU = "MI-BAND-1"

SALE = """
[server]
host = "127.0.0.1"
port = 0
metrics_port = 0

[engine]
shards = 4
data_dir = "{data_dir}"
durable = true

[auth]
frontend_tokens = ["front-secret"]
admin_tokens = ["admin-secret"]

[[sku]]
id = "MI-BAND-1"
stock = {stock}
per_buyer_limit = 1
hold_seconds = 900
"""


@pytest.fixture(autouse=True)
def client_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientStreams]:
    streams = ClientStreams()
    streams.install(monkeypatch)
    yield streams
    streams.release()


def sale_config(tmp_path: Path, *, stock: int = 1_000_000, name: str = "sale.toml") -> str:
    return write_config(tmp_path / name, SALE.format(data_dir=tmp_path / "data", stock=stock))


async def run_soldout(*arguments: str) -> trio.CompletedProcess[bytes]:
    """Run `soldout ARGUMENTS` to its end (for starts that must fail)."""
    with trio.fail_after(60):  # a guard against a hang, not a measurement
        return await trio.run_process(
            soldout_command(*arguments),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=process_environment(),
        )


async def test_serve_without_a_config_prints_its_address_and_sells_the_demo_sku(tmp_path: Path) -> None:
    async with run_server_process(["--port", "0", "--metrics-port", "0"], tmp_path / "stderr.txt") as server:
        assert server.url.startswith("ws://127.0.0.1:")
        assert server.url.endswith("/v1")
        # No tokens: open to anyone, on loopback only, and it says so.
        async with open_raw(server.url, None) as websocket:
            hold = await exchange(websocket, reserve_map(1, SKU, "u1"))
            assert (hold["status"], hold["remaining"]) == ("ok", 9999)
            stats = await exchange(websocket, {"id": 2, "op": "stats"})
            assert stats["stats"]["skus"][SKU] == {"stock": 10_000, "available": 9999, "held": 1, "sold": 0}
        assert await stop_with_signal(server, signal.SIGINT) == 0
        output = await server.read_rest_of_output()
        assert "metrics at http://127.0.0.1:" in output
        assert output.rstrip().endswith("soldout stopped")
        assert "loopback" in server.stderr()


async def test_sigterm_under_load_answers_what_is_in_flight_and_exits_0(tmp_path: Path) -> None:
    config = sale_config(tmp_path)
    ledger = Ledger(SKU, enough_holds=2000)
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        async with trio.open_nursery() as nursery:
            for connection in range(2):
                nursery.start_soon(load_until_closed, server.url, FRONTEND_TOKEN, ledger, connection)
            await ledger.enough.wait()
            server.process.send_signal(signal.SIGTERM)
            # The loads end when the server closes their connections.
        with trio.fail_after(60):  # a guard against a hang, not a measurement
            assert await server.process.wait() == 0, server.stderr()
        assert "soldout stopped" in await server.read_rest_of_output()
    assert set(ledger.close_codes) == {1001}  # going away, after the last reply
    assert len(ledger.holds) >= 2000
    assert ledger.confirmed

    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as restarted:
        stock, _, held, sold = await wire_counts(restarted.url, SKU)
        # Every request the server decided before it stopped was answered, so the counts are exact.
        assert (stock, held + sold, sold) == (1_000_000, len(ledger.holds), len(ledger.confirmed)), ledger.statuses
        await check_ledger_after_restart(restarted.url, ledger)
        assert await stop_with_signal(restarted) == 0


@pytest.mark.parametrize("acknowledged", [1, 500, 3000])
async def test_kill_9_under_load_loses_no_acknowledged_hold(tmp_path: Path, acknowledged: int) -> None:
    config = sale_config(tmp_path)
    ledger = Ledger(SKU, enough_holds=acknowledged)
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        async with trio.open_nursery() as nursery:
            for connection in range(3):
                nursery.start_soon(load_until_closed, server.url, FRONTEND_TOKEN, ledger, connection)
            await ledger.enough.wait()
            server.process.kill()
        with trio.fail_after(60):  # a guard against a hang, not a measurement
            assert await server.process.wait() == -signal.SIGKILL
    assert len(ledger.holds) >= acknowledged

    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as restarted:
        stock, available, held, sold = await wire_counts(restarted.url, SKU)
        assert held + sold >= len(ledger.holds), ledger.statuses
        assert sold >= len(ledger.confirmed)
        assert held + sold + available == stock == 1_000_000
        await check_ledger_after_restart(restarted.url, ledger)
        # The restarted server goes on selling.
        async with open_raw(restarted.url, FRONTEND_TOKEN) as websocket:
            assert (await exchange(websocket, reserve_map(1, SKU, "after-restart")))["status"] == "ok"
        assert await stop_with_signal(restarted) == 0


async def test_a_bad_config_file_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    # Every kind of bad file is in test_server_config.py; this is the real process's exit.
    config = write_config(tmp_path / "bad.toml", "[server]\nprot = 8765\n")
    finished = await run_soldout("serve", "--config", config, "--port", "0", "--metrics-port", "0")
    stderr = finished.stderr.decode()
    assert finished.returncode == 2, stderr
    assert stderr.startswith("soldout: config error: server.prot is not a known setting")
    assert b"soldout serving" not in finished.stdout


async def test_a_restart_keeps_the_journaled_sku_and_says_which_file_values_it_did_not_apply(
    tmp_path: Path,
) -> None:
    """The bug: with a [[sku]] in the config, a restart put the file's settings again and
    undid what an admin had changed. The journal is the truth now."""
    config = sale_config(tmp_path, stock=10)
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        async with open_raw(server.url, ADMIN_TOKEN) as websocket:
            replies = await exchange(websocket, [reserve_map(index, SKU, f"u{index}") for index in range(5)])
            assert [reply["status"] for reply in replies] == ["ok"] * 5
            # An admin restocks and makes the sale registration-only.
            change = {"id": 9, "op": "put_sku", "sku": SKU, "stock": 40, "registration_required": True}
            assert (await exchange(websocket, change))["status"] == "ok"
        assert await stop_with_signal(server) == 0
    async with run_server_process(["--config", config], tmp_path / "restart.txt") as server:
        assert await wire_counts(server.url, SKU, ADMIN_TOKEN) == (40, 35, 5, 0)
        async with open_raw(server.url, FRONTEND_TOKEN) as websocket:
            stranger = await exchange(websocket, reserve_map(20, SKU, "stranger"))
            assert stranger["status"] == "not_registered"
        assert await stop_with_signal(server) == 0
    logged = (tmp_path / "restart.txt").read_text()
    (line,) = [line for line in logged.splitlines() if "not applied" in line]
    assert SKU in line
    assert "stock 10 (journal: 40)" in line


async def test_apply_config_skus_applies_the_file_and_a_stock_below_held_and_sold_stops_the_start(
    tmp_path: Path,
) -> None:
    config = sale_config(tmp_path, stock=10)
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        async with open_raw(server.url, FRONTEND_TOKEN) as websocket:
            replies = await exchange(websocket, [reserve_map(index, SKU, f"u{index}") for index in range(5)])
            assert [reply["status"] for reply in replies] == ["ok"] * 5
        assert await stop_with_signal(server) == 0
    raised = sale_config(tmp_path, stock=12, name="raised.toml")
    async with run_server_process(["--config", raised, "--apply-config-skus"], tmp_path / "applied.txt") as server:
        assert await wire_counts(server.url, SKU, ADMIN_TOKEN) == (12, 7, 5, 0)
        assert await stop_with_signal(server) == 0
    lowered = sale_config(tmp_path, stock=3, name="lowered.toml")
    finished = await run_soldout("serve", "--config", lowered, "--apply-config-skus")
    stderr = finished.stderr.decode()
    assert finished.returncode != 0
    assert b"soldout serving" not in finished.stdout
    assert "sku[0]" in stderr
    assert "below" in stderr
    # Nothing was changed: the stock applied before still stands.
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        assert await wire_counts(server.url, SKU, ADMIN_TOKEN) == (12, 7, 5, 0)
        assert await stop_with_signal(server) == 0
    # Stopped as any other config error is: with a message and exit code 2, not a crash.
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("soldout: config error: sku[0]"), stderr
    assert finished.returncode == 2


async def test_flags_override_the_config_file(tmp_path: Path) -> None:
    config = sale_config(tmp_path)
    flagged = tmp_path / "flagged"
    arguments = ["--config", config, "--shards", "2", "--data-dir", str(flagged)]
    async with run_server_process(arguments, tmp_path / "stderr.txt") as server:
        async with open_raw(server.url, ADMIN_TOKEN) as websocket:
            stats = (await exchange(websocket, {"id": 1, "op": "stats"}))["stats"]
        assert len(stats["shards"]) == 2
        assert stats["skus"][SKU]["stock"] == 1_000_000
        assert await stop_with_signal(server) == 0
    assert json.loads((flagged / "soldout.json").read_text())["shards"] == 2
    assert not (tmp_path / "data").exists()
