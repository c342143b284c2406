"""`soldout export`: every hold in a data directory as JSON lines, for reconciliation.

Reads the journals and snapshots without changing them, so it works on a stopped
server and on a running one (a commit in progress at the tail is left out). Writes one
line per hold, then one line per SKU with the totals that `stock` reports. A filter
(SKUs, states, a time) selects holds; the SKU totals stay whole, so they keep matching
`stock` (with a SKU filter, only those SKUs' totals are written).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from engine.book import Book, Hold, format_reservation
from engine.journal import JournalCorrupt
from engine.manifest import DataDirError
from engine.store import LEGACY_FORMAT_VERSION, legacy_manifest, read_meta, rebuild_book
from protocol.limits import Limits

# A running server may replace a snapshot between listing and reading it: try again.
READ_ATTEMPTS = 5


def load_books(data_dir: str, limits: Limits | None = None) -> list[Book]:
    limits = limits or Limits()
    version, shards = read_meta(data_dir)
    books = []
    for shard in range(shards):
        directory = f"{data_dir}/shard-{shard}"
        for attempt in range(READ_ATTEMPTS):
            try:
                # A format 1 directory (no manifests) is read as it is, not upgraded.
                manifest = legacy_manifest(directory, shard) if version == LEGACY_FORMAT_VERSION else None
                books.append(rebuild_book(directory, shard, limits, manifest).book)
                break
            except (FileNotFoundError, JournalCorrupt, DataDirError):
                if attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)
    return books


@dataclass(frozen=True, slots=True)
class HoldFilter:
    """Which holds to write; None means all."""

    skus: frozenset[str] | None = None
    states: frozenset[str] | None = None
    since: float | None = None  # holds created or ended at or after this time

    def selects(self, hold: Hold) -> bool:
        if self.skus is not None and hold.sku.sku not in self.skus:
            return False
        if self.states is not None and hold.state not in self.states:
            return False
        if self.since is not None:
            changed_at = hold.created_at if hold.ended_at is None else hold.ended_at
            return changed_at >= self.since
        return True


EVERY_HOLD = HoldFilter()


def export_lines(books: list[Book], selection: HoldFilter = EVERY_HOLD) -> Iterator[dict[str, Any]]:
    for book in books:
        for hold in book.holds.values():
            if not selection.selects(hold):
                continue
            yield {
                "type": "hold",
                "reservation": format_reservation(book.shard, hold.number),
                "sku": hold.sku.sku,
                "buyer": hold.buyer,
                "qty": hold.qty,
                "state": hold.state.value,
                "created_at": hold.created_at,
                "expires_at": hold.expires_at,
                "ended_at": hold.ended_at,
                "key": hold.key,
                "order": hold.order,
            }
    for book in books:
        for state in book.skus.values():
            if selection.skus is not None and state.sku not in selection.skus:
                continue
            yield {
                "type": "sku",
                "sku": state.sku,
                "stock": state.stock,
                "available": state.available,
                "held": state.held,
                "sold": state.sold,
            }


def export(data_dir: str, output: TextIO, selection: HoldFilter = EVERY_HOLD) -> int:
    """Write the export of `data_dir` to `output`; returns the number of holds written."""
    # load_books reads soldout.json first: a directory that is not one of ours stops here.
    holds = 0
    for line in export_lines(load_books(data_dir), selection):
        holds += line["type"] == "hold"
        output.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n")
    return holds
