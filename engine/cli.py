"""The `soldout` command: a thin layer over the same engine API that tests use.

soldout serve [--config sale.toml] [--host H] [--port P] [--shards N] [--data-dir DIR]
soldout admin --url URL --token TOKEN put-sku|register|stock|stats ...
soldout export --data-dir DIR
soldout bench [flash|catalog|checkout] ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from engine.journal import JournalCorrupt
from engine.server_config import ConfigError, ServerConfig, SkuSettings, load_server_config, with_overrides
from engine.store import DataDirError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soldout", description="A flash-sale reservation engine.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bench", help="run a flash crowd against a server (soldout bench --help)", add_help=False)

    serve = commands.add_parser("serve", help="run a soldout server until SIGINT/SIGTERM")
    serve.add_argument("--config", help="TOML config file; flags below override it")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--shards", type=int)
    serve.add_argument("--data-dir")
    serve.add_argument("--metrics-port", type=int)
    serve.add_argument("--log-level", default="INFO")

    admin = commands.add_parser("admin", help="run an admin operation against a server")
    admin.add_argument("--url", required=True, help="ws://HOST:PORT/v1")
    admin.add_argument("--token", help="an admin token (omit for a server with no tokens)")
    operations = admin.add_subparsers(dest="operation", required=True)
    put_sku = operations.add_parser("put-sku", help="create a SKU or change and restock it")
    put_sku.add_argument("sku")
    put_sku.add_argument("--stock", type=int, required=True)
    put_sku.add_argument("--per-buyer-limit", type=int, default=1)
    put_sku.add_argument("--hold-seconds", type=float, default=900)
    put_sku.add_argument("--opens-at", type=float)
    put_sku.add_argument("--closes-at", type=float)
    put_sku.add_argument("--registration-required", action="store_true")
    register = operations.add_parser("register", help="register buyers (one id per line, first CSV column)")
    register.add_argument("sku")
    register.add_argument("--file", required=True, help="CSV file of buyer ids, or - for standard input")
    register.add_argument("--chunk", type=int, default=2000, help="buyers per register request")
    stock = operations.add_parser("stock", help="a SKU's stock, available, held and sold")
    stock.add_argument("sku")
    operations.add_parser("stats", help="the server's figures")

    export = commands.add_parser("export", help="write every hold of a data directory as JSON lines")
    export.add_argument("--data-dir", required=True)
    export.add_argument("--output", default="-", help="file to write (default: standard output)")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # The bench has its own parser: its flags pass through untouched.
        from bench.flash import main as bench_main

        return bench_main(argv[1:])
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "serve":
            return _serve(arguments)
        if arguments.command == "admin":
            from engine.admin import run_admin

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
    from engine.server import serve

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
    )
    trio.run(serve, config)
    return 0


def _export(arguments: argparse.Namespace) -> int:
    from engine.export import export

    if arguments.output == "-":
        holds = export(arguments.data_dir, sys.stdout)
    else:
        with open(arguments.output, "w") as output:
            holds = export(arguments.data_dir, output)
    print(f"exported {holds} holds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
