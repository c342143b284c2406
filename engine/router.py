"""The router: which shard owns a SKU, and which owns a reservation.

The hash is CRC-32 of the SKU's UTF-8 bytes: stable across processes, versions and
machines, so a data directory's SKUs stay on the shards that journaled them.
"""

from __future__ import annotations

import zlib

from engine.book import parse_reservation


def shard_for_sku(sku: str, shards: int) -> int:
    return zlib.crc32(sku.encode("utf-8")) % shards


def shard_for_reservation(reservation: str, shards: int) -> int | None:
    """The shard a reservation id names; None when no shard of ours could have made it."""
    parsed = parse_reservation(reservation)
    if parsed is None or parsed[0] >= shards:
        return None
    return parsed[0]
