"""`soldout admin` against a live server: put-sku, register from a CSV file, stock, stats,
and what it says when the token is wrong. Each command is `engine.cli.main([...])` in a
worker thread (its own trio run), as the `soldout` script calls it.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from wire_helpers import ADMIN_TOKEN, FRONTEND_TOKEN, ClientStreams, server_config

from engine.cli import main
from engine.server import RunningServer, open_server
from engine.server_config import ServerConfig, SkuSettings
from protocol.messages import Reserve

SKU = "MI-BAND-1"


@pytest.fixture(autouse=True)
def client_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientStreams]:
    streams = ClientStreams()
    streams.install(monkeypatch)
    yield streams
    streams.release()


class Admin:
    """Runs `soldout admin --url URL --token TOKEN ...` and keeps what it printed."""

    def __init__(self, server: RunningServer, capsys: pytest.CaptureFixture[str], streams: ClientStreams) -> None:
        self.server = server
        self.capsys = capsys
        self.streams = streams

    async def __call__(
        self, *arguments: str, token: str | None = ADMIN_TOKEN, stdin: str | None = None
    ) -> tuple[int | BaseException, str, str]:
        """(exit code, or what `main` raised; stdout; stderr)."""
        argv = ["admin", "--url", self.server.url, *(["--token", token] if token else []), *arguments]

        def run() -> int | BaseException:
            try:
                return main(argv)
            except BaseException as crash:  # reported to the test, which says what it expected
                return crash

        self.capsys.readouterr()
        if stdin is None:
            code = await trio.to_thread.run_sync(run)
        else:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(sys, "stdin", io.StringIO(stdin))
                code = await trio.to_thread.run_sync(run)
        # Any socket left open by that finished run is closed, so the server is not kept waiting.
        self.streams.release()
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


@asynccontextmanager
async def serving_admin(
    config: ServerConfig, capsys: pytest.CaptureFixture[str], streams: ClientStreams
) -> AsyncIterator[tuple[RunningServer, Admin]]:
    async with open_server(config) as server:
        yield server, Admin(server, capsys, streams)


def last_json(output: str) -> Any:
    return json.loads(output.strip().splitlines()[-1])


async def counts(server: RunningServer, sku: str) -> tuple[int, int, int, int]:
    reply = await server.engine.stock(sku)
    assert reply.status == "ok", reply
    return reply.stock, reply.available, reply.held, reply.sold


async def test_put_sku_creates_and_restocks_and_stock_reports_it(
    capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    async with serving_admin(server_config(), capsys, client_streams) as (server, admin):
        code, out, err = await admin("put-sku", SKU, "--stock", "50", "--per-buyer-limit", "2")
        assert (code, last_json(out)) == (0, {"status": "ok"}), err
        assert await counts(server, SKU) == (50, 50, 0, 0)
        assert (await server.engine.reserve(SKU, buyer="u1", qty=2)).status == "ok"

        code, out, err = await admin("put-sku", SKU, "--stock", "80", "--per-buyer-limit", "2")
        assert (code, last_json(out)) == (0, {"status": "ok"}), err
        code, out, err = await admin("stock", SKU)
        assert code == 0, err
        assert last_json(out) == {"status": "ok", "stock": 80, "available": 78, "held": 2, "sold": 0}

        # Below what is held is refused, and changes nothing.
        code, out, _ = await admin("put-sku", SKU, "--stock", "1", "--per-buyer-limit", "2")
        refused = last_json(out)
        assert (code, refused["status"]) == (1, "invalid")
        assert "below" in refused["error"]
        assert await counts(server, SKU) == (80, 78, 2, 0)

        code, out, _ = await admin("stock", "NOPE")
        assert (code, last_json(out)) == (1, {"status": "unknown_sku"})


async def test_register_streams_a_csv_file_of_25000_buyers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    buyers = [f"buyer-{index:06d}" for index in range(25_000)]
    path = tmp_path / "buyers.csv"
    path.write_text("buyer,email\n" + "".join(f"{buyer},{buyer}@example.com\n" for buyer in buyers) + "\n")
    sku = SkuSettings(SKU, stock=30_000, registration_required=True)
    async with serving_admin(server_config(skus=(sku,)), capsys, client_streams) as (server, admin):
        code, out, err = await admin("register", SKU, "--file", str(path))
        assert (code, last_json(out)) == (0, {"status": "ok", "registered": 25_000}), err
        # Every one of them, and nobody else, may now reserve.
        strangers = [f"stranger-{index}" for index in range(100)]
        replies = await server.engine.execute([Reserve(SKU, buyer) for buyer in buyers + strangers])
        statuses = [reply.status for reply in replies]
        assert statuses == ["ok"] * len(buyers) + ["not_registered"] * len(strangers)
        stats = server.metrics.stats(server.engine)
        assert stats["requests"]["register"] == {"ok": 13}  # 2000 buyers a request


async def test_register_reads_standard_input_and_reports_an_unknown_sku(
    capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    async with serving_admin(
        server_config(skus=(SkuSettings(SKU, stock=5, registration_required=True),)), capsys, client_streams
    ) as (server, admin):
        code, out, err = await admin("register", SKU, "--file", "-", stdin="u1\nu2\n\nu3\n")
        assert (code, last_json(out)) == (0, {"status": "ok", "registered": 3}), err
        assert (await server.engine.reserve(SKU, buyer="u3")).status == "ok"
        code, out, _ = await admin("register", "NOPE", "--file", "-", stdin="u1\n")
        assert (code, last_json(out)) == (1, {"status": "unknown_sku", "registered": 0})


async def test_stats_prints_the_servers_figures(
    capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    async with serving_admin(server_config(skus=(SkuSettings(SKU, stock=5),)), capsys, client_streams) as (
        server,
        admin,
    ):
        await server.engine.reserve(SKU, buyer="u1")
        code, out, err = await admin("stats")
        assert code == 0, err
        stats = json.loads(out)
        assert stats["skus"][SKU] == {"stock": 5, "available": 4, "held": 1, "sold": 0}
        assert stats["connections_open"] == 1
        assert len(stats["shards"]) == 4


async def test_a_frontend_token_is_told_no_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    async with serving_admin(server_config(skus=(SkuSettings(SKU, stock=5),)), capsys, client_streams) as (
        server,
        admin,
    ):
        code, out, _ = await admin("put-sku", SKU, "--stock", "500", token=FRONTEND_TOKEN)
        assert (code, last_json(out)["status"]) == (1, "forbidden")
        code, _, err = await admin("stats", token=FRONTEND_TOKEN)
        assert code == 1
        assert "forbidden" in err
        assert await counts(server, SKU) == (5, 5, 0, 0)


@pytest.mark.parametrize("token", ["not-a-token", None])
async def test_an_unknown_or_missing_token_is_refused_with_a_message(
    token: str | None, capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=5),))
    async with serving_admin(config, capsys, client_streams) as (_, admin):
        code, out, err = await admin("stock", SKU, token=token)
    assert code == 1, repr(code)
    assert out == ""
    assert err.startswith("soldout admin: "), err
    assert "401" in err
    assert "Traceback" not in err
