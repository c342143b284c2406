"""An embedded flash sale: the engine decides a crowd far larger than the stock."""

from __future__ import annotations

import time

import trio

from engine.api import open_engine
from engine.config import EngineConfig
from protocol.messages import OK, Reserve


async def run_embedded_flash_sale(units: int = 10_000, buyers: int = 200_000, batch: int = 100) -> dict[str, float]:
    """Sell `units` to `buyers` arriving at once in batches; returns the outcome."""
    async with open_engine(EngineConfig(shards=8)) as engine:
        await engine.put_sku("MI-BAND-1", stock=units, per_buyer_limit=1, hold_seconds=900)
        requests = [Reserve("MI-BAND-1", f"buyer-{index}", 1, f"buyer-{index}-1") for index in range(buyers)]
        counts: dict[str, int] = {}
        sold_out_after = 0.0
        started = time.perf_counter()

        async def crowd(worker: int, workers: int) -> None:
            nonlocal sold_out_after
            for start in range(worker * batch, buyers, workers * batch):
                for reply in await engine.execute(requests[start : start + batch]):
                    counts[reply.status] = counts.get(reply.status, 0) + 1
                    if reply.status == OK and reply.remaining == 0:
                        sold_out_after = time.perf_counter() - started

        async with trio.open_nursery() as nursery:
            for worker in range(16):
                nursery.start_soon(crowd, worker, 16)
        elapsed = time.perf_counter() - started
        stock = await engine.stock("MI-BAND-1")
    assert stock.held + stock.sold <= stock.stock, "oversold"
    assert counts.get(OK, 0) == min(units, buyers) == stock.held, "every unit goes to exactly one buyer"
    return {
        "units": units,
        "buyers": buyers,
        "ok": counts.get(OK, 0),
        "sold_out": counts.get("sold_out", 0),
        "sold_out_after_ms": sold_out_after * 1000,
        "all_answered_ms": elapsed * 1000,
        "decisions_per_second": buyers / elapsed,
    }
