"""The `soldout` command: a thin layer over the same engine API that tests use."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soldout", description="A flash-sale reservation engine.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a flash sale on the embedded engine and print its outcome")
    demo.add_argument("--units", type=int, default=10_000)
    demo.add_argument("--buyers", type=int, default=200_000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        from engine.demo import run_embedded_flash_sale

        outcome = trio.run(run_embedded_flash_sale, arguments.units, arguments.buyers)
        print(
            f"{outcome['units']:,} units, {outcome['buyers']:,} buyers: {outcome['ok']:,} held, "
            f"{outcome['sold_out']:,} sold out; sold out after {outcome['sold_out_after_ms']:.0f} ms, "
            f"every buyer answered after {outcome['all_answered_ms']:.0f} ms "
            f"({outcome['decisions_per_second']:,.0f} decisions/s); held + sold <= stock checked"
        )
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
