"""The process that tests/test_crash.py kills: a durable engine under load, reporting every `ok`.

    python tests/crash_child.py DATA_DIR SEED

It opens a durable engine on DATA_DIR (taking snapshots often), puts the SKUs on sale,
then runs many tasks that reserve (each attempt with its own idempotency key, some
through the batch entry point) and confirm or cancel some of their holds. Every `ok` it receives is written to
stdout as one JSON line and flushed — only after the engine returned it, so each line
the parent reads is an acknowledged reply. It never stops on its own: the parent ends
it with SIGKILL (it gives up after a few minutes if nobody does).
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import trio

from engine import EngineConfig, open_engine
from protocol.messages import Reserve

# Shared with the test, which reopens the data directory with the same settings.
SHARDS = 4
EPOCH = 1_700_000_000.0  # a fixed wall clock: no hold expires while the test runs
SKUS = tuple(f"flash-{index}" for index in range(8))
STOCK = 2_000
PER_BUYER_LIMIT = 2
HOLD_SECONDS = 900
WORKERS = 48
BATCH_REQUESTS = 8
LIFETIME_SECONDS_MAX = 180
# Small, so that snapshots are taken under load and a kill can land in the middle of one.
SNAPSHOT_RECORDS_MIN = 200


def fixed_wall_clock() -> float:
    return EPOCH


def report(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def main(data_dir: str, seed: int) -> None:
    config = EngineConfig(
        shards=SHARDS,
        data_dir=data_dir,
        durable=True,
        wall_clock=fixed_wall_clock,
        snapshot_records_min=SNAPSHOT_RECORDS_MIN,
    )
    async with open_engine(config) as engine:
        for sku in SKUS:
            reply = await engine.put_sku(sku, stock=STOCK, per_buyer_limit=PER_BUYER_LIMIT, hold_seconds=HOLD_SECONDS)
            assert reply.ok, reply
        report("ready")

        async def worker(index: int) -> None:
            generator = random.Random(seed * 1_000 + index)
            attempt = 0
            while True:
                requests = []
                for _ in range(BATCH_REQUESTS if index % 4 == 0 else 1):
                    attempt += 1
                    buyer = f"buyer-{index}-{generator.randrange(50)}"
                    key = f"{buyer}-attempt-{attempt}"
                    requests.append(Reserve(generator.choice(SKUS), buyer, generator.choice((1, 1, 2)), key))
                replies = await engine.execute(requests)
                for request, reply in zip(requests, replies, strict=True):
                    if not reply.ok:
                        continue
                    report(
                        "hold",
                        reservation=reply.reservation,
                        sku=request.sku,
                        buyer=request.buyer,
                        qty=request.qty,
                        key=request.key,
                        expires_at=reply.expires_at,
                    )
                    roll = generator.random()
                    if roll < 0.3:
                        ended = await engine.confirm(reply.reservation, buyer=request.buyer)
                        if ended.ok:
                            report("confirmed", reservation=reply.reservation, buyer=request.buyer)
                    elif roll < 0.5:
                        ended = await engine.cancel(reply.reservation, buyer=request.buyer)
                        if ended.ok:
                            report("cancelled", reservation=reply.reservation, buyer=request.buyer)

        with trio.move_on_after(LIFETIME_SECONDS_MAX):
            async with trio.open_nursery() as nursery:
                for index in range(WORKERS):
                    nursery.start_soon(worker, index)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
