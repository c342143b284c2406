"""What an operator's tooling sees of a server: /healthz and /readyz through start, serving,
a shard that cannot commit and shutdown; the metrics a dashboard expects; the start-up
summary line; a data_dir relative to its config file; and the Grafana dashboard shipped
for those metrics.
"""

from __future__ import annotations

import errno
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest
import trio
from wire_helpers import (
    ADMIN_TOKEN,
    FRONTEND_TOKEN,
    exchange,
    open_raw,
    reserve_map,
    run_server_process,
    server_config,
    stop_with_signal,
    write_config,
)

from engine import journal as journal_module
from engine.server.config import SkuSettings, load_server_config
from engine.server.health import ServerHealth
from engine.server.runner import RunningServer, open_server
from engine.shard import Shard
from protocol.messages import Stock

SKU = "MI-BAND-1"
REPOSITORY = Path(__file__).resolve().parent.parent
DASHBOARD = REPOSITORY / "engine" / "server" / "grafana" / "soldout-dashboard.json"


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:PORT/PATH, in a worker thread's blocking call."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def fetch(port: int, path: str) -> tuple[int, str]:
    return await trio.to_thread.run_sync(get, port, path)


async def wait_for(port: int, path: str, status: int) -> str:
    with trio.fail_after(30):
        while True:
            answered, body = await fetch(port, path)
            if answered == status:
                return body
            await trio.sleep(0.02)


async def metrics_showing(port: int, line: str) -> str:
    """/metrics once it shows `line` (the engine's figures are copied for it once a second)."""
    with trio.fail_after(30):
        while True:
            _, text = await fetch(port, "/metrics")
            if line in text.splitlines():
                return text
            await trio.sleep(0.1)


async def test_readyz_is_503_while_recovering_200_while_serving_and_503_while_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recovering = trio.Event()
    let_it_recover = trio.Event()
    real_load = Shard.load

    async def slow_load(self: Shard) -> object:
        recovering.set()
        await let_it_recover.wait()
        return await real_load(self)

    monkeypatch.setattr(Shard, "load", slow_load)
    config = server_config(skus=(SkuSettings(SKU, stock=10),), data_dir=str(tmp_path / "data"), metrics_port=0)
    health = ServerHealth()
    running: dict[str, RunningServer] = {}
    stop = trio.Event()
    fsync_entered = threading.Event()
    release_fsync = threading.Event()
    real_fsync = journal_module.fsync_system_call

    def slow_fsync(fd: int) -> None:
        fsync_entered.set()
        release_fsync.wait(30)
        real_fsync(fd)

    async def run(task_status: trio.TaskStatus[None]) -> None:
        async with open_server(config, health) as server:
            running["server"] = server
            task_status.started()
            await stop.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: nursery.start(run))
        await health.listening.wait()
        port = health.metrics_port
        assert port is not None
        await recovering.wait()
        assert await fetch(port, "/readyz") == (503, "starting\n")
        assert await fetch(port, "/healthz") == (200, "ok\n")
        let_it_recover.set()
        assert await wait_for(port, "/readyz", 200) == "ready\n"
        server = running["server"]
        # A request in flight during shutdown: its commit waits, and the shutdown waits for it.
        async with open_raw(server.url, FRONTEND_TOKEN) as websocket:
            monkeypatch.setattr(journal_module, "fsync_system_call", slow_fsync)
            await websocket.send_message(msgpack.packb(reserve_map(1, SKU, "u1")))
            await trio.to_thread.run_sync(fsync_entered.wait, 30)
            stop.set()
            assert await wait_for(port, "/readyz", 503) == "stopping\n"
            assert (await fetch(port, "/healthz"))[0] == 200
            monkeypatch.setattr(journal_module, "fsync_system_call", real_fsync)
            release_fsync.set()
            reply = msgpack.unpackb(await websocket.get_message())
            assert reply["status"] == "ok"


async def test_readyz_is_503_while_a_shard_is_unavailable_and_stats_say_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=10),), data_dir=str(tmp_path / "data"), metrics_port=0)
    failing = {"on": False}
    real_fsync = journal_module.fsync_system_call

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(journal_module, "fsync_system_call", fsync)
    async with open_server(config) as server, open_raw(server.url, ADMIN_TOKEN) as websocket:
        assert server.metrics_port is not None
        assert (await fetch(server.metrics_port, "/readyz"))[0] == 200
        failing["on"] = True
        reply = await exchange(websocket, reserve_map(1, SKU, "u1", key="u1-first"))
        assert reply["status"] == "unavailable"
        assert "retry with the same key" in reply["error"]
        shard = server.engine.route(Stock(SKU))
        status, body = await fetch(server.metrics_port, "/readyz")
        assert (status, body) == (503, f"shards unavailable: {shard}\n")
        stats = (await exchange(websocket, {"id": 2, "op": "stats"}))["stats"]
        states = {entry["shard"]: entry["state"] for entry in stats["shards"]}
        assert states[shard] == "unavailable"
        assert [state for number, state in states.items() if number != shard] == ["serving"] * (len(states) - 1)
        await metrics_showing(server.metrics_port, f'soldout_shard_unavailable{{shard="{shard}"}} 1.0')
        await metrics_showing(server.metrics_port, f'soldout_shard_faults_total{{shard="{shard}"}} 1.0')
        failing["on"] = False
        await wait_for(server.metrics_port, "/readyz", 200)
        # The retry with the same key is safe: one hold, whether the first landed or not.
        retried = await exchange(websocket, reserve_map(3, SKU, "u1", key="u1-first"))
        again = await exchange(websocket, reserve_map(4, SKU, "u1", key="u1-first"))
        assert retried["status"] == again["status"] == "ok"
        assert retried["reservation"] == again["reservation"]


async def test_the_metrics_a_dashboard_needs_and_no_created_series(tmp_path: Path) -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=10, hold_seconds=900),), metrics_port=0)
    async with open_server(config) as server, open_raw(server.url, ADMIN_TOKEN) as websocket:
        holds = [await exchange(websocket, reserve_map(index, SKU, f"u{index}")) for index in range(3)]
        confirm = {"id": 10, "op": "confirm", "reservation": holds[0]["reservation"], "buyer": "u0"}
        cancel = {"id": 11, "op": "cancel", "reservation": holds[1]["reservation"], "buyer": "u1"}
        assert (await exchange(websocket, confirm))["status"] == "ok"
        assert (await exchange(websocket, cancel))["status"] == "ok"
        assert server.metrics_port is not None
        text = await metrics_showing(server.metrics_port, f'soldout_holds_cancelled_total{{sku="{SKU}"}} 1.0')
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for expected in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "soldout_holds_created_total",
        "soldout_holds_confirmed_total",
        "soldout_holds_cancelled_total",
        "soldout_holds_expired_total",
        "soldout_requests_total",
        "soldout_reserve_latency_seconds_bucket",
        "soldout_sku_available_units",
        "soldout_shard_unavailable",
        "soldout_connections",
    ):
        assert expected in names, expected
    assert f'soldout_holds_created_total{{sku="{SKU}"}} 3.0' in text
    assert f'soldout_holds_confirmed_total{{sku="{SKU}"}} 1.0' in text
    assert not [name for name in names if name.endswith("_created")]


async def test_any_path_but_the_three_is_404(tmp_path: Path) -> None:
    config = server_config(metrics_port=0)
    async with open_server(config) as server:
        assert server.metrics_port is not None
        for path in ("/", "/metric", "/metrics/x", "/v1", "/readyz/"):
            assert (await fetch(server.metrics_port, path))[0] == 404, path


def test_the_grafana_dashboard_charts_metrics_the_server_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", []) if "expr" in target
    ]
    assert expressions
    used = {
        name for expression in expressions for name in re.findall(r"\b(soldout_[a-z_]+|process_[a-z_]+)", expression)
    }
    exported = {
        "soldout_requests_total",
        "soldout_reserve_latency_seconds_bucket",
        "soldout_sku_stock_units",
        "soldout_sku_available_units",
        "soldout_sku_held_units",
        "soldout_sku_sold_units",
        "soldout_holds_created_total",
        "soldout_holds_confirmed_total",
        "soldout_holds_cancelled_total",
        "soldout_holds_expired_total",
        "soldout_shard_unavailable",
        "soldout_shard_mailbox_used",
        "soldout_journal_commit_seconds_bucket",
        "soldout_connections",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    }
    assert used <= exported, used - exported
    assert {"soldout_holds_created_total", "process_cpu_seconds_total", "soldout_shard_unavailable"} <= used


def test_a_relative_data_dir_is_relative_to_its_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "sale"
    directory.mkdir()
    path = write_config(directory / "sale.toml", '[engine]\ndata_dir = "data"\n')
    monkeypatch.chdir(tmp_path)
    assert load_server_config(str(path)).engine.data_dir == str(directory / "data")
    absolute = write_config(directory / "absolute.toml", f'[engine]\ndata_dir = "{tmp_path / "elsewhere"}"\n')
    assert load_server_config(str(absolute)).engine.data_dir == str(tmp_path / "elsewhere")


async def test_start_up_prints_one_summary_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "sale.toml",
        f"""
[server]
port = 0
metrics_port = 0
[engine]
shards = 3
data_dir = "{tmp_path / "data"}"
[auth]
frontend_tokens = ["{FRONTEND_TOKEN}"]
admin_tokens = ["{ADMIN_TOKEN}"]
[[sku]]
id = "{SKU}"
stock = 100
""",
    )
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        async with open_raw(server.url, FRONTEND_TOKEN) as websocket:
            for index in range(4):
                assert (await exchange(websocket, reserve_map(index, SKU, f"u{index}")))["status"] == "ok"
        assert await stop_with_signal(server) == 0
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        lines = server.output.decode().splitlines()
        assert await stop_with_signal(server) == 0
    (summary,) = [line for line in lines if line.startswith("soldout: ")]
    assert re.fullmatch(
        rf"soldout: 3 shards, durable, data directory {re.escape(str(tmp_path / 'data'))}, 1 SKUs, "
        r"4 holds recovered in \d+\.\d\d s",
        summary,
    ), summary
