"""`soldout admin`: admin operations from a terminal, through the same client frontends use."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import trio

from engine.cli.times import format_time
from protocol.client import Client, ClientError, open_client
from protocol.limits import REGISTER_INFLIGHT_MAX
from protocol.messages import UNCHANGED, UNKNOWN_SKU, AnyReply, SkuReply

# What get-sku prints: every field of the reply.
SKU_FIELDS = tuple(field.name for field in dataclasses.fields(SkuReply) if field.name not in ("status", "error"))


def read_buyer_ids(file: IO[str]) -> Iterator[str]:
    """Buyer ids from the first column of a CSV file; a header row named buyer is skipped."""
    for number, row in enumerate(csv.reader(file)):
        if not row or not row[0].strip():
            continue
        buyer = row[0].strip()
        if number == 0 and buyer.lower() in ("buyer", "buyer_id", "id"):
            continue
        yield buyer


class AdminError(Exception):
    """What an operator is told in one line: the operation cannot be done as asked."""


async def run_admin(arguments: argparse.Namespace) -> int:
    try:
        return await _run(arguments)
    except (ClientError, AdminError) as error:
        print(f"soldout admin: {error}", file=sys.stderr)
        return 1


async def _run(arguments: argparse.Namespace) -> int:
    if not arguments.url.startswith(("ws://", "wss://")):
        scheme = arguments.url.split("://", 1)[0] if "://" in arguments.url else ""
        hint = "use ws:// (or wss://)" + (f" instead of {scheme}://" if scheme else "")
        raise AdminError(f"--url {arguments.url} is not a websocket address: {hint}, as in ws://HOST:PORT/v1")
    file = None
    if arguments.operation == "register":
        file = _open_buyer_file(arguments.file)
    async with open_client(arguments.url, arguments.token, reconnect_attempts=3) as client:
        operation = arguments.operation
        if operation == "put-sku":
            return await _put_sku(client, arguments)
        if operation == "get-sku":
            sku = _known(await client.get_sku(arguments.sku), arguments.sku)
            return _report(_sku_document(sku))
        if operation == "close":
            return await _close(client, arguments.sku)
        if operation == "stock":
            stock = _known(await client.stock(arguments.sku), arguments.sku)
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
        if operation == "cluster":
            print(cluster_table((await client.stats()).get("cluster")))
            return 0
        if operation == "register":
            assert file is not None
            return await _register(client, arguments, file)
    return 2


def cluster_table(view: dict[str, Any] | None) -> str:
    """The stats reply's cluster view as a table: the node asked, the live nodes, and for
    each node the shards it owns (then the shards that have no owner now)."""
    if view is None:
        raise AdminError("this server is a single node, not part of a cluster (its config has no [cluster])")
    owners: dict[str, str | None] = view.get("owners", {})
    by_node: dict[str, list[int]] = {node: [] for node in view.get("nodes", [])}
    unowned = []
    for shard, node in sorted(owners.items(), key=lambda item: int(item[0])):
        if node is None:
            unowned.append(int(shard))
        else:
            by_node.setdefault(node, []).append(int(shard))
    width = max([len("node"), *(len(node) for node in by_node)])
    lines = [f"asked: {view.get('node')}   live nodes: {', '.join(view.get('nodes', [])) or '-'}", ""]
    lines.append(f"{'node':<{width}}  shards  owned")
    for node, shards in sorted(by_node.items()):
        live = "" if node in view.get("nodes", []) else "  (not live)"
        lines.append(f"{node:<{width}}  {len(shards):>6}  {', '.join(map(str, shards)) or '-'}{live}")
    if unowned:
        lines.append(f"{'(none)':<{width}}  {len(unowned):>6}  {', '.join(map(str, unowned))}")
    return "\n".join(lines)


def _open_buyer_file(path: str) -> IO[str]:
    if path == "-":
        return sys.stdin
    try:
        return open(path, newline="")
    except OSError as error:
        raise AdminError(f"cannot read the buyer file {path}: {error.strerror}") from None


def _known(reply: AnyReply, sku: str) -> Any:
    """The reply, unless it says the SKU does not exist: that is one line on stderr."""
    if reply.status == UNKNOWN_SKU:
        raise AdminError(f"SKU {sku!r} does not exist (put-sku {sku} --stock N creates it)")
    return reply


async def _put_sku(client: Client, arguments: argparse.Namespace) -> int:
    settings = {
        "stock": arguments.stock,
        "per_buyer_limit": arguments.per_buyer_limit,
        "hold_seconds": arguments.hold_seconds,
        "registration_required": arguments.registration_required,
    }
    # A flag not given leaves the setting as it is; --opens-at none clears the time (None).
    changes: dict[str, Any] = {name: value for name, value in settings.items() if value is not None}
    for name in ("opens_at", "closes_at"):
        if getattr(arguments, name) is not UNCHANGED:
            changes[name] = getattr(arguments, name)
    reply = await client.put_sku(arguments.sku, **changes)
    if reply.status == "invalid" and "stock is required" in (reply.error or ""):
        raise AdminError(f"SKU {arguments.sku!r} does not exist: give --stock N to create it")
    return _report({"status": reply.status, "error": reply.error})


async def _close(client: Client, sku: str) -> int:
    """End the sale now: closes_at = now (a sale not open yet loses its opening time too)."""
    current = _known(await client.get_sku(sku), sku)
    now = time.time()
    changes: dict[str, Any] = {"closes_at": now}
    if current.opens_at is not None and current.opens_at >= now:
        changes["opens_at"] = None  # closes_at must come after opens_at
    reply = await client.put_sku(sku, **changes)
    if reply.status != "ok":
        return _report({"status": reply.status, "error": reply.error})
    return _report(_sku_document(_known(await client.get_sku(sku), sku)))


def _sku_document(sku: SkuReply) -> dict[str, Any]:
    """get-sku's output: every field of the reply, and each time in ISO 8601 beside its epoch seconds."""
    document: dict[str, Any] = {"status": sku.status}
    for name in SKU_FIELDS:
        document[name] = getattr(sku, name)
    document["opens_at_iso"] = format_time(sku.opens_at)
    document["closes_at_iso"] = format_time(sku.closes_at)
    return document


async def _register(client: Client, arguments: argparse.Namespace, file: IO[str]) -> int:
    """Stream the file in chunks to a few workers, so memory stays flat for millions of ids."""
    counts = {"registered": 0, "already": 0}
    failure: dict[str, str | None] = {}
    chunks_send, chunks_receive = trio.open_memory_channel[list[str]](REGISTER_INFLIGHT_MAX)

    async def worker(chunks: trio.MemoryReceiveChannel[list[str]]) -> None:
        async with chunks:
            async for chunk in chunks:
                reply = await client.register(arguments.sku, chunk)
                if reply.status == "ok":
                    counts["registered"] += reply.registered or 0
                    counts["already"] += reply.already or 0
                elif not failure:
                    failure.update(status=reply.status, error=reply.error)

    # A local file read line by line: each read is short, and reading ahead of the
    # network is what keeps the requests flowing.
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
    if failure.get("status") == UNKNOWN_SKU:
        raise AdminError(f"SKU {arguments.sku!r} does not exist (put-sku {arguments.sku} --stock N creates it)")
    if failure:
        return _report({**failure, **counts})
    return _report({"status": "ok", **counts})


def _report(result: dict[str, object]) -> int:
    print(json.dumps({key: value for key, value in result.items() if value is not None}, sort_keys=True))
    return 0 if result.get("status") == "ok" else 1
