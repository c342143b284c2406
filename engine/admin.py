"""`soldout admin`: admin operations from a terminal, through the same client frontends use."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from typing import IO

import trio

from protocol.client import Client, ClientError, open_client

# Register requests in flight at once while streaming a large buyer file.
REGISTER_INFLIGHT_MAX = 8


def read_buyer_ids(file: IO[str]) -> Iterator[str]:
    """Buyer ids from the first column of a CSV file; a header row named buyer is skipped."""
    for number, row in enumerate(csv.reader(file)):
        if not row or not row[0].strip():
            continue
        buyer = row[0].strip()
        if number == 0 and buyer.lower() in ("buyer", "buyer_id", "id"):
            continue
        yield buyer


async def run_admin(arguments: argparse.Namespace) -> int:
    try:
        async with open_client(arguments.url, arguments.token, reconnect_attempts=3) as client:
            operation = arguments.operation
            if operation == "put-sku":
                reply = await client.put_sku(
                    arguments.sku,
                    stock=arguments.stock,
                    per_buyer_limit=arguments.per_buyer_limit,
                    hold_seconds=arguments.hold_seconds,
                    opens_at=arguments.opens_at,
                    closes_at=arguments.closes_at,
                    registration_required=arguments.registration_required,
                )
                return _report({"status": reply.status, "error": reply.error})
            if operation == "stock":
                stock = await client.stock(arguments.sku)
                return _report(
                    {
                        "status": stock.status,
                        "stock": stock.stock,
                        "available": stock.available,
                        "held": stock.held,
                        "sold": stock.sold,
                        "error": stock.error,
                    }
                )
            if operation == "stats":
                print(json.dumps(await client.stats(), indent=2, sort_keys=True))
                return 0
            if operation == "register":
                return await _register(client, arguments)
    except ClientError as error:
        print(f"soldout admin: {error}", file=sys.stderr)
        return 1
    return 2


async def _register(client: Client, arguments: argparse.Namespace) -> int:
    """Stream the file in chunks to a few workers, so memory stays flat for millions of ids."""
    registered = 0
    failure: dict[str, str | None] = {}
    chunks_send, chunks_receive = trio.open_memory_channel[list[str]](REGISTER_INFLIGHT_MAX)

    async def worker(chunks: trio.MemoryReceiveChannel[list[str]]) -> None:
        nonlocal registered
        async with chunks:
            async for chunk in chunks:
                reply = await client.register(arguments.sku, chunk)
                if reply.status == "ok":
                    registered += len(chunk)
                elif not failure:
                    failure.update(status=reply.status, error=reply.error)

    # A local file read line by line: each read is short, and reading ahead of the
    # network is what keeps the requests flowing.
    file = sys.stdin if arguments.file == "-" else open(arguments.file, newline="")  # noqa: SIM115, ASYNC230
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(REGISTER_INFLIGHT_MAX):
                nursery.start_soon(worker, chunks_receive.clone())
            chunks_receive.close()
            async with chunks_send:
                chunk: list[str] = []
                for buyer in read_buyer_ids(file):
                    chunk.append(buyer)
                    if len(chunk) >= arguments.chunk:
                        await chunks_send.send(chunk)
                        chunk = []
                    if failure:
                        break
                if chunk and not failure:
                    await chunks_send.send(chunk)
    finally:
        if file is not sys.stdin:
            file.close()
    if failure:
        return _report({**failure, "registered": registered})
    return _report({"status": "ok", "registered": registered})


def _report(result: dict[str, object]) -> int:
    print(json.dumps({key: value for key, value in result.items() if value is not None}, sort_keys=True))
    return 0 if result.get("status") == "ok" else 1
