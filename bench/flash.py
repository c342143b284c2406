"""The name `soldout bench` had before bench/cli.py: its parser and entry point, for the
callers that still import them from here. Everything lives in bench/cli.py."""

from bench.cli import build_parser, main

__all__ = ["build_parser", "main"]
