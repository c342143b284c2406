"""The `soldout` command: a thin layer over the same engine API that tests use.

soldout serve [--config sale.toml] [--host H] [--port P] [--shards N] [--data-dir DIR]
soldout admin --url URL --token TOKEN put-sku|register|stock|stats ...
soldout export --data-dir DIR
soldout bench [flash|catalog|checkout|wire|embedded] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

import trio

from engine.cli.times import TimeFormatError, parse_time, parse_time_or_clear
from engine.cluster import ClusterUnavailable
from engine.journal import JournalCorrupt
from engine.server.config import (
    ConfigError,
    ServerConfig,
    SkuSettings,
    load_server_config,
    with_overrides,
)
from engine.server.listening import ListenError
from engine.store import DataDirError
from protocol.messages import UNCHANGED

HOLD_STATES = ("held", "confirmed", "cancelled", "expired")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soldout", description="A flash-sale reservation engine.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bench", help="run a flash crowd against a server (soldout bench --help)", add_help=False)

    serve = commands.add_parser("serve", help="run a soldout server until SIGINT/SIGTERM")
    serve.add_argument("--config", help="TOML config file; flags below override it")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="websocket port (default 8765; 0 picks a free one)")
    serve.add_argument("--shards", type=int, help="shard count, fixed when a data directory is made (default 8)")
    serve.add_argument("--data-dir", help="journal and snapshots here (default: memory only)")
    serve.add_argument("--metrics-port", type=int, help="port of /metrics (default 9765; 0 picks a free one)")
    serve.add_argument(
        "--metrics-host", help="address of /metrics (default 127.0.0.1; elsewhere it asks for an admin token)"
    )
    serve.add_argument(
        "--cluster", metavar="URL[,URL...]", help="join a cluster: its NATS servers ([cluster] nats_urls)"
    )
    serve.add_argument("--node", help="this node's name in the cluster ([cluster] node)")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    serve.add_argument(
        "--apply-config-skus",
        action="store_true",
        help="apply the config file's [[sku]] settings to SKUs that exist (restock semantics); "
        "without it the journal's settings stand and only missing SKUs are created",
    )

    admin = commands.add_parser("admin", help="run an admin operation against a server")
    admin.add_argument("--url", required=True, help="the server's websocket address, ws://HOST:PORT/v1")
    admin.add_argument("--token", help="an admin token (omit for a server with no tokens)")
    operations = admin.add_subparsers(dest="operation", required=True)
    put_sku = operations.add_parser(
        "put-sku", help="create a SKU, or change the settings given (the others stay as they are)"
    )
    put_sku.add_argument("sku", help="the SKU's id")
    put_sku.add_argument("--stock", type=int, help="total units, held and sold included (required to create)")
    put_sku.add_argument("--per-buyer-limit", type=int, help="units one buyer may hold and buy (new SKU: 1)")
    put_sku.add_argument("--hold-seconds", type=float, help="how long a hold lasts unpaid (new SKU: 900)")
    put_sku.add_argument(
        "--opens-at",
        type=_time_or_clear,
        default=UNCHANGED,
        help="sale start: epoch seconds or ISO 8601 with an offset; none clears it",
    )
    put_sku.add_argument(
        "--closes-at",
        type=_time_or_clear,
        default=UNCHANGED,
        help="sale end: epoch seconds or ISO 8601 with an offset; none clears it",
    )
    put_sku.add_argument(
        "--registration-required",
        action=argparse.BooleanOptionalAction,
        help="only registered buyers may reserve (--no-registration-required opens it to all)",
    )
    get_sku = operations.add_parser(
        "get-sku", help="every setting of a SKU, its counts, registered buyers, and whether it is open"
    )
    get_sku.add_argument("sku", help="the SKU's id")
    close = operations.add_parser("close", help="end a SKU's sale now (closes_at = now)")
    close.add_argument("sku", help="the SKU's id")
    register = operations.add_parser("register", help="register buyers (one id per line, first CSV column)")
    register.add_argument("sku", help="the SKU's id")
    register.add_argument("--file", required=True, help="CSV file of buyer ids, or - for standard input")
    register.add_argument("--chunk", type=int, default=2000, help="buyers per register request (default 2000)")
    stock = operations.add_parser("stock", help="a SKU's stock, available, held and sold")
    stock.add_argument("sku", help="the SKU's id")
    operations.add_parser("stats", help="the server's figures")
    operations.add_parser("cluster", help="a cluster's view: each shard's owner, and the live nodes")

    export = commands.add_parser("export", help="write every hold of a data directory as JSON lines")
    export.add_argument("--data-dir", required=True, help="the data directory of a stopped or running server")
    export.add_argument("--output", default="-", help="file to write (default: standard output)")
    export.add_argument("--sku", action="append", help="only this SKU (may be given more than once)")
    export.add_argument("--state", action="append", choices=HOLD_STATES, help="only holds in this state (repeatable)")
    export.add_argument(
        "--since", type=_time, help="only holds created or ended at or after this time (epoch seconds or ISO 8601)"
    )

    return parser


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except TimeFormatError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _time_or_clear(text: str) -> float | None:
    try:
        return parse_time_or_clear(text)
    except TimeFormatError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # The bench has its own parser: its flags pass through untouched.
        try:
            from bench.cli import main as bench_main
        except ImportError as error:
            print(
                f"soldout bench needs the bench extra ({error.name or error} is missing): pip install 'soldout[bench]'",
                file=sys.stderr,
            )
            return 2
        return bench_main(argv[1:])
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "serve":
            return _serve(arguments)
        if arguments.command == "admin":
            from engine.cli.admin import run_admin

            return trio.run(run_admin, arguments)
        if arguments.command == "export":
            return _export(arguments)
    except ConfigError as error:
        print(f"soldout: config error: {error}", file=sys.stderr)
        return 2
    except (DataDirError, JournalCorrupt) as error:
        print(f"soldout: {error}", file=sys.stderr)
        return 1
    return 2


def _serve(arguments: argparse.Namespace) -> int:
    from engine.server.runner import serve

    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if arguments.config:
        config = load_server_config(arguments.config)
    else:
        # No config: a memory-only server on loopback with a SKU to try.
        config = ServerConfig(skus=(SkuSettings("MI-BAND-1", stock=10_000, per_buyer_limit=1, hold_seconds=900),))
    config = with_overrides(
        config,
        host=arguments.host,
        port=arguments.port,
        shards=arguments.shards,
        data_dir=arguments.data_dir,
        metrics_port=arguments.metrics_port,
        metrics_host=arguments.metrics_host,
        cluster_urls=arguments.cluster,
        node=arguments.node,
    )
    if arguments.apply_config_skus:
        config = dataclasses.replace(config, apply_config_skus=True)
    try:
        trio.run(serve, config)
    except (ListenError, BaseExceptionGroup, Exception) as error:
        one_line = _find(error, ListenError) or _find(error, ClusterUnavailable)
        if one_line is None:
            config_error = _find(error, ConfigError)
            if config_error is None:
                raise
            print(f"soldout: config error: {config_error}", file=sys.stderr)
            return 2
        print(f"soldout: {one_line}", file=sys.stderr)
        return 1
    return 0


def _find(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first `kind` in `error` or, for an exception group, in the exceptions it holds."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def _export(arguments: argparse.Namespace) -> int:
    from engine.export import HoldFilter, export

    selection = HoldFilter(
        skus=frozenset(arguments.sku) if arguments.sku else None,
        states=frozenset(arguments.state) if arguments.state else None,
        since=arguments.since,
    )
    if arguments.output == "-":
        holds = export(arguments.data_dir, sys.stdout, selection)
    else:
        with open(arguments.output, "w") as output:
            holds = export(arguments.data_dir, output, selection)
    print(f"exported {holds} holds", file=sys.stderr)
    return 0
