"""`soldout serve` as a real process against peers that do not play along.

A crowd of half-open connections beyond the process's descriptor limit leaves commits,
snapshots and new clients working; SIGTERM with a half-open connection open exits in
far less than the grace; clients that send and never read pin a bounded amount of
memory, and the server's resident set falls back once they are gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection
from wire_helpers import (
    ADMIN_TOKEN,
    FRONTEND_TOKEN,
    ClientStreams,
    NonReadingPeer,
    RawPeer,
    bearer,
    exchange,
    open_raw,
    port_of,
    process_environment,
    reserve_map,
    resident_mib,
    run_server_process,
    soldout_command,
    stop_with_signal,
    wire_counts,
    write_config,
)

SKU = "MI-BAND-1"
GRACE_SECONDS = 10

SALE = """
[server]
host = "127.0.0.1"
port = 0
metrics_port = false
shutdown_grace_seconds = {grace}

[engine]
shards = 2
{data_dir}
snapshot_records_min = 1

[auth]
frontend_tokens = ["front-secret"]
admin_tokens = ["admin-secret"]

[limits]
{limits}

[[sku]]
id = "MI-BAND-1"
stock = 1000000
"""


@pytest.fixture(autouse=True)
def client_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientStreams]:
    streams = ClientStreams()
    streams.install(monkeypatch)
    yield streams
    streams.release()


def sale_config(tmp_path: Path, *, data_dir: bool = True, limits: str = "") -> str:
    data = f'data_dir = "{tmp_path / "data"}"' if data_dir else ""
    return write_config(tmp_path / "sale.toml", SALE.format(grace=GRACE_SECONDS, data_dir=data, limits=limits))


async def poll_until(condition: Callable[[], Awaitable[bool]], *, guard_seconds: float) -> None:
    """Ask `condition` again and again: another process's figures give no event to wait on."""
    with trio.fail_after(guard_seconds):  # a guard against a hang, not a measurement
        while not await condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def stats(websocket: WebSocketConnection) -> dict[str, Any]:
    reply = await exchange(websocket, {"id": 0, "op": "stats"})
    assert reply["status"] == "ok", reply
    return reply["stats"]


# ------------------------------------------------------------ descriptors

DESCRIPTOR_LIMIT = 128


async def test_half_open_connections_past_the_descriptor_limit_leave_commits_snapshots_and_clients_working(
    tmp_path: Path,
) -> None:
    config = sale_config(tmp_path, limits="handshake_seconds_max = 1")
    stderr = tmp_path / "stderr.txt"
    async with run_server_process(["--config", config], stderr, descriptor_limit=DESCRIPTOR_LIMIT) as server:
        port = port_of(server.url)
        idle: list[RawPeer] = []
        try:
            async with open_raw(server.url, ADMIN_TOKEN) as admin:
                # Three times what the process may open: connections that send nothing...
                for _ in range(3 * DESCRIPTOR_LIMIT):
                    idle.append(await RawPeer.connect(port))
                # ...and as many that connect and hang up at once.
                for _ in range(3 * DESCRIPTOR_LIMIT):
                    peer = await RawPeer.connect(port)
                    await peer.aclose()
                # Every batch still commits, and snapshots (one every batch or two) are written.
                for batch in range(6):
                    frame = [reserve_map(index, SKU, f"b{batch}-{index}") for index in range(50)]
                    replies = await exchange(admin, frame)
                    assert [reply["status"] for reply in replies] == ["ok"] * 50, replies[0]

                async def two_snapshots_written() -> bool:
                    return sum(shard["snapshots"] for shard in (await stats(admin))["shards"]) >= 2

                await poll_until(two_snapshots_written, guard_seconds=60)
            # A new client gets in: after the idle ones' handshake_seconds_max, group by group.
            with trio.fail_after(60):
                async with open_raw(server.url, FRONTEND_TOKEN) as client:
                    assert (await exchange(client, reserve_map(1, SKU, "late")))["status"] == "ok"
        finally:
            for peer in idle:
                await peer.aclose()
        assert await wire_counts(server.url, SKU) == (1_000_000, 1_000_000 - 301, 301, 0)
        assert await stop_with_signal(server) == 0, server.stderr()
    assert "Too many open files" not in server.stderr()
    assert "Traceback" not in server.stderr()


async def test_a_descriptor_limit_that_leaves_no_room_for_sockets_stops_the_start(tmp_path: Path) -> None:
    config = sale_config(tmp_path)
    with trio.fail_after(60):  # a guard against a hang, not a measurement
        finished = await trio.run_process(
            soldout_command("serve", "--config", config, descriptor_limit=48),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=process_environment(),
        )
    stderr = finished.stderr.decode()
    assert finished.returncode == 2, stderr
    assert stderr.startswith("soldout: config error: the descriptor limit (RLIMIT_NOFILE 48"), stderr
    assert b"soldout serving" not in finished.stdout


# ------------------------------------------------------------ SIGTERM


async def connect_and_hang_up(port: int) -> RawPeer | None:
    peer = await RawPeer.connect(port)
    await peer.aclose()
    return None


async def connect_and_send_nothing(port: int) -> RawPeer | None:
    return await RawPeer.connect(port)


async def plain_http_get(port: int) -> RawPeer | None:
    # A load balancer's health check.
    peer = await RawPeer.connect(port)
    await peer.stream.send_all(b"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await peer.http_response())[0] == 400
    return peer


async def open_and_never_answer_the_close(port: int) -> RawPeer | None:
    peer = await RawPeer.connect(port)
    assert await peer.upgrade(headers=bearer(FRONTEND_TOKEN)) == 101
    return peer


HALF_OPEN: dict[str, Callable[[int], Awaitable[RawPeer | None]]] = {
    "connect and hang up": connect_and_hang_up,
    "idle TCP connection": connect_and_send_nothing,
    "plain GET /v1": plain_http_get,
    "a peer that never answers the close": open_and_never_answer_the_close,
}


@pytest.mark.parametrize("half_open", HALF_OPEN.values(), ids=HALF_OPEN.keys())
async def test_sigterm_with_a_half_open_connection_exits_well_within_the_grace(
    tmp_path: Path, half_open: Callable[[int], Awaitable[RawPeer | None]]
) -> None:
    config = sale_config(tmp_path, data_dir=False)
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        peer = await half_open(port_of(server.url))
        try:
            # Accepted after the half-open one, so that one is surely in the server's hands.
            assert await wire_counts(server.url, SKU) == (1_000_000, 1_000_000, 0, 0)
            signalled = trio.current_time()
            assert await stop_with_signal(server) == 0, server.stderr()
            took = trio.current_time() - signalled
            # Nothing was in flight: the grace is for requests, not for half-open connections.
            assert took < GRACE_SECONDS / 2, f"{took:.1f} s to stop, with a grace of {GRACE_SECONDS} s"
            if half_open is open_and_never_answer_the_close:
                assert peer is not None
                assert await peer.close_code() == 1001
        finally:
            if peer is not None:
                await peer.aclose()
        assert "soldout stopped" in await server.read_rest_of_output()


# ------------------------------------------------------------ memory

# Clients that never read, each trying to pin more than its share: with the default
# bounds (16 MiB per connection, 256 MiB for the server), before this bound existed
# each pinned about 90 MiB.
NON_READERS = 16
# The resident set may grow by less than the server's bound on bytes in flight...
GROWTH_MIB_MAX = 256
# ...and once the clients are gone it comes back to within this of where it started.
RETURNED_MIB_MAX = 24


async def test_memory_held_by_clients_that_never_read_is_bounded_and_given_back(tmp_path: Path) -> None:
    config = sale_config(tmp_path, data_dir=False)
    async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
        pid = server.process.pid
        hogs = [NonReadingPeer(port_of(server.url)) for _ in range(NON_READERS)]
        try:
            async with open_raw(server.url, ADMIN_TOKEN) as admin:
                await stats(admin)
                start = resident_mib(pid)
                peak = start
                async with trio.open_nursery() as nursery:
                    for hog in hogs:
                        nursery.start_soon(hog.run)
                    # Until every client has had ten 1 MB frames decided, and the server has
                    # stopped taking any more.
                    registers = -1
                    quiet = 0

                    async def settled() -> bool:
                        nonlocal peak, registers, quiet
                        figures = await stats(admin)
                        peak = max(peak, resident_mib(pid))
                        # Checked as it grows, so that a server without the bound stops early.
                        assert peak - start < GROWTH_MIB_MAX, f"{peak - start:.0f} MiB for {NON_READERS} clients"
                        decided = figures["requests"].get("register", {}).get("forbidden", 0)
                        quiet = quiet + 1 if decided >= 10 * NON_READERS and decided == registers else 0
                        registers = decided
                        return quiet >= 20

                    await poll_until(settled, guard_seconds=120)
                    nursery.cancel_scope.cancel()
                for hog in hogs:
                    await hog.aclose()
                # Given back: the connections' memory is freed and returned to the system.

                async def returned() -> bool:
                    await stats(admin)
                    return resident_mib(pid) - start <= RETURNED_MIB_MAX

                await poll_until(returned, guard_seconds=30)
        finally:
            for hog in hogs:
                await hog.aclose()
        assert await stop_with_signal(server) == 0, server.stderr()
