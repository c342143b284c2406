"""`soldout export`: every hold in a data directory as JSON lines, for reconciliation.

Reads the journals and snapshots without changing them, so it works on a stopped
server and on a running one (a commit in progress at the tail is left out). Writes one
line per hold, then one line per SKU with the totals that `stock` reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, TextIO

from engine.book import HOLD_STATE_NAMES, Book, format_reservation
from engine.journal import JournalCorrupt
from engine.store import DataDir, read_meta_shards, rebuild_book
from protocol.limits import Limits

# A running server may replace a snapshot between listing and reading it: try again.
READ_ATTEMPTS = 5


def load_books(data_dir: str, limits: Limits | None = None) -> list[Book]:
    limits = limits or Limits()
    shards = read_meta_shards(data_dir)
    books = []
    for shard in range(shards):
        directory = f"{data_dir}/shard-{shard}"
        for attempt in range(READ_ATTEMPTS):
            try:
                books.append(rebuild_book(directory, shard, limits).book)
                break
            except (FileNotFoundError, JournalCorrupt):
                if attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)
    return books


def export_lines(books: list[Book]) -> Iterator[dict[str, Any]]:
    for book in books:
        for hold in book.holds.values():
            yield {
                "type": "hold",
                "reservation": format_reservation(book.shard, hold.number),
                "sku": hold.sku.sku,
                "buyer": hold.buyer,
                "units": hold.qty,
                "state": HOLD_STATE_NAMES[hold.state],
                "created_at": hold.created_at,
                "expires_at": hold.expires_at,
                "ended_at": hold.ended_at,
                "key": hold.key,
            }
    for book in books:
        for state in book.skus.values():
            yield {
                "type": "sku",
                "sku": state.sku,
                "stock": state.stock,
                "available": state.available,
                "held": state.held,
                "sold": state.sold,
            }


def export(data_dir: str, output: TextIO) -> int:
    """Write the export of `data_dir` to `output`; returns the number of holds."""
    DataDir.check_exists(data_dir)
    holds = 0
    for line in export_lines(load_books(data_dir)):
        holds += line["type"] == "hold"
        output.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n")
    return holds
