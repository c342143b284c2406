"""`soldout admin` against a live server: put-sku, register from a CSV file, stock, stats,
and what it says when the token is wrong. Each command is `engine.cli.main([...])` in a
worker thread (its own trio run), as the `soldout` script calls it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from wire_helpers import ADMIN_TOKEN, FRONTEND_TOKEN, ClientStreams, server_config

from engine.cli.main import main
from engine.server.config import ServerConfig, SkuSettings
from engine.server.runner import RunningServer, open_server
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

        code, out, err = await admin("stock", "NOPE")
        assert (code, out) == (1, "")
        assert err.strip() == "soldout admin: SKU 'NOPE' does not exist (put-sku NOPE --stock N creates it)"


async def test_register_streams_a_csv_file_of_25000_buyers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    buyers = [f"buyer-{index:06d}" for index in range(25_000)]
    path = tmp_path / "buyers.csv"
    path.write_text("buyer,email\n" + "".join(f"{buyer},{buyer}@example.com\n" for buyer in buyers) + "\n")
    sku = SkuSettings(SKU, stock=30_000, registration_required=True)
    async with serving_admin(server_config(skus=(sku,)), capsys, client_streams) as (server, admin):
        code, out, err = await admin("register", SKU, "--file", str(path))
        assert (code, last_json(out)) == (0, {"status": "ok", "registered": 25_000, "already": 0}), err
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
        assert (code, last_json(out)) == (0, {"status": "ok", "registered": 3, "already": 0}), err
        assert (await server.engine.reserve(SKU, buyer="u3")).status == "ok"
        code, out, err = await admin("register", SKU, "--file", "-", stdin="u3\nu4\n")
        assert (code, last_json(out)) == (0, {"status": "ok", "registered": 1, "already": 1}), err
        code, out, err = await admin("register", "NOPE", "--file", "-", stdin="u1\n")
        assert (code, out) == (1, "")
        assert "SKU 'NOPE' does not exist" in err


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


async def test_a_restock_from_the_command_line_keeps_every_setting_it_does_not_name(
    capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    """The bug, as an operator met it: `put-sku FLASH-2 --stock 2100` on a registration-only
    sale with an opening time reset both, and a stranger got a 900 s hold."""
    async with serving_admin(server_config(), capsys, client_streams) as (server, admin):
        opens = "2100-01-01T00:00:00+00:00"
        code, out, err = await admin(
            "put-sku",
            "FLASH-2",
            "--stock",
            "2000",
            "--registration-required",
            "--opens-at",
            opens,
            "--hold-seconds",
            "60",
        )
        assert (code, last_json(out)) == (0, {"status": "ok"}), err
        code, out, err = await admin("put-sku", "FLASH-2", "--stock", "2100")
        assert (code, last_json(out)) == (0, {"status": "ok"}), err
        code, out, err = await admin("get-sku", "FLASH-2")
        assert code == 0, err
        sku = last_json(out)
        assert (sku["stock"], sku["registration_required"], sku["hold_seconds"]) == (2100, True, 60)
        assert (sku["opens_at"], sku["opens_at_iso"]) == (4102444800.0, opens)
        assert (await server.engine.reserve("FLASH-2", buyer="stranger")).status == "not_open"
        # --opens-at none clears the opening; registration still keeps strangers out.
        code, out, err = await admin("put-sku", "FLASH-2", "--opens-at", "none")
        assert (code, last_json(out)) == (0, {"status": "ok"}), err
        assert (await server.engine.reserve("FLASH-2", buyer="stranger")).status == "not_registered"
        code, out, err = await admin("put-sku", "FLASH-2", "--no-registration-required")
        assert code == 0, err
        assert (await server.engine.reserve("FLASH-2", buyer="stranger")).status == "ok"
        # A SKU that does not exist needs a stock to be created.
        code, out, err = await admin("put-sku", "NEW", "--per-buyer-limit", "2")
        assert (code, out) == (1, "")
        assert err.strip() == "soldout admin: SKU 'NEW' does not exist: give --stock N to create it"


async def test_get_sku_prints_every_setting_counts_registered_buyers_and_open(
    capsys: pytest.CaptureFixture[str], client_streams: ClientStreams
) -> None:
    sku = SkuSettings(SKU, stock=10, per_buyer_limit=2, hold_seconds=120, registration_required=True)
    async with serving_admin(server_config(skus=(sku,)), capsys, client_streams) as (server, admin):
        await server.engine.register(SKU, ["u1", "u2", "u3"])
        assert (await server.engine.reserve(SKU, buyer="u1", qty=2)).ok
        code, out, err = await admin("get-sku", SKU)
        assert code == 0, err
        assert last_json(out) == {
            "status": "ok",
            "sku": SKU,
            "stock": 10,
            "available": 8,
            "held": 2,
            "sold": 0,
            "per_buyer_limit": 2,
            "hold_seconds": 120,
            "registration_required": True,
            "registered": 3,
            "open": True,
            "shard": server.engine.route(server.engine.parser.stock(SKU)),
        }  # opens_at, closes_at and their ISO forms are null: left out of the JSON
        code, out, err = await admin("get-sku", "NOPE")
        assert (code, out) == (1, "")
        assert "SKU 'NOPE' does not exist" in err


@pytest.mark.parametrize("opens_in_seconds", [None, -60, 3600])
async def test_close_ends_the_sale_now(
    capsys: pytest.CaptureFixture[str], client_streams: ClientStreams, opens_in_seconds: float | None
) -> None:
    opens_at = None if opens_in_seconds is None else time.time() + opens_in_seconds
    async with serving_admin(
        server_config(skus=(SkuSettings(SKU, stock=10, opens_at=opens_at),)), capsys, client_streams
    ) as (server, admin):
        before = time.time()
        code, out, err = await admin("close", SKU)
        assert code == 0, err
        closed = last_json(out)
        assert closed["open"] is False
        assert before <= closed["closes_at"] <= time.time()
        assert closed["closes_at_iso"].endswith("+00:00")
        assert (await server.engine.reserve(SKU, buyer="u1")).status == "closed"


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2026-12-01T04:30:00+05:30", 1796079600.0),  # 2026-11-30 23:00 UTC
        ("2026-12-01T00:00:00Z", 1796083200.0),
        ("1796083200", 1796083200.0),
        ("1796083200.5", 1796083200.5),
    ],
)
async def test_times_on_the_command_line_are_iso_8601_or_epoch_seconds(
    capsys: pytest.CaptureFixture[str], client_streams: ClientStreams, text: str, epoch: float
) -> None:
    async with serving_admin(server_config(), capsys, client_streams) as (_, admin):
        code, out, err = await admin("put-sku", SKU, "--stock", "5", "--closes-at", text)
        assert (code, last_json(out)) == (0, {"status": "ok"}), err
        code, out, err = await admin("get-sku", SKU)
        assert last_json(out)["closes_at"] == epoch


@pytest.mark.parametrize("text", ["2026-12-01T04:30:00", "tomorrow", "-5", "inf"])
def test_a_time_without_an_offset_or_that_is_no_time_is_refused_before_anything_is_sent(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["admin", "--url", "ws://127.0.0.1:1/v1", "put-sku", SKU, "--opens-at", text])
    assert raised.value.code == 2
    assert "--opens-at" in capsys.readouterr().err


def run_soldout(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_an_http_url_is_one_line_that_says_to_use_ws() -> None:
    assert_one_line_error(
        run_soldout("admin", "--url", "http://127.0.0.1:8765/v1", "stock", SKU), "use ws://", "http://"
    )


def test_a_missing_buyer_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "buyers.csv"
    assert_one_line_error(
        run_soldout("admin", "--url", "ws://127.0.0.1:1/v1", "register", SKU, "--file", str(missing)), str(missing)
    )


async def test_a_wrong_token_and_an_unknown_sku_are_one_line_errors_from_a_real_process() -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=5),))
    async with open_server(config) as server:
        wrong = await trio.to_thread.run_sync(
            run_soldout, "admin", "--url", server.url, "--token", "not-a-token", "stock", SKU
        )
        assert_one_line_error(wrong, "401")
        unknown = await trio.to_thread.run_sync(
            run_soldout, "admin", "--url", server.url, "--token", ADMIN_TOKEN, "get-sku", "NOPE"
        )
        assert_one_line_error(unknown, "SKU 'NOPE' does not exist")


def test_every_flag_of_every_subcommand_has_a_help_text() -> None:
    from engine.cli.main import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    from bench.flash import build_parser as build_bench_parser

    walk(build_parser(), "soldout")
    walk(build_bench_parser(), "soldout bench")
    assert missing == []


def test_bench_without_its_extra_says_which_extra_to_install(tmp_path: Path) -> None:
    """`soldout bench --help` failed with ModuleNotFoundError when the bench extra was missing."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('hdrh', 'rich', 'redis'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(hide)},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "pip install 'soldout[bench]'" in result.stderr
