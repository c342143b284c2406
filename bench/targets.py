"""The targets a crowd is driven against, each as one small protocol object, as memtier's
`abstract_protocol` is: how a batch of the crowd becomes bytes on the wire, and how the
bytes that come back become answers (status, reservation, units left).

    soldout   msgpack batch frames over a websocket (protocol v1)
    echo      the same frames to bench/echo.py, which sends them back: the ceiling
    redis     pipelined EVALSHA calls of the Lua script in bench/redis_peer.py

Beside the protocol objects: what the bench asks a soldout server as its admin (put the
run's SKUs, read `stock`, `stats`, `get_sku`, cancel the run's holds), through
`protocol.client`. The embedded engine, the fourth target, has no wire: bench/embedded.py.
No trio or asyncio loop here; the loops are in bench/driver.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from bench.redis_peer import SCRIPT_KEYS, sku_keys
from bench.scenarios import RESERVE_OP, Item, Plan, Scenario, SkuPlan, buyer_name, idempotency_key

TARGETS = ("soldout", "echo", "redis")
# The status an echoed request counts as: it comes back as it went, without one.
ECHOED = "echoed"

# (status, reservation or None, units left or None)
Answer = tuple[str, str | None, int | None]
Encoder = Callable[[Sequence[Item], int], bytes]


class ProtocolBreach(Exception):
    """The server answered something the driver cannot match to what it sent."""


# ---------------------------------------------------------------- soldout and echo


def soldout_encoder(plan: Plan) -> Encoder:
    """A batch as one frame: a map for a single request, an array for more (protocol v1)."""
    sku_names = [sku.sku for sku in plan.scenario.skus]
    buyer_of, key_of = plan.buyer, plan.key
    packb = msgpack.packb

    def encode(items: Sequence[Item], first_id: int) -> bytes:
        maps = []
        for offset, (op, buyer, sku, reservation) in enumerate(items):
            if op == RESERVE_OP:
                maps.append(
                    {
                        "id": first_id + offset,
                        "op": RESERVE_OP,
                        "sku": sku_names[sku],
                        "buyer": buyer_of(buyer),
                        "qty": 1,
                        "key": key_of(buyer),
                    }
                )
            else:
                maps.append({"id": first_id + offset, "op": op, "reservation": reservation, "buyer": buyer_of(buyer)})
        return packb(maps[0] if len(maps) == 1 else maps)

    return encode


def websocket_answers(payload: bytes | str, outstanding: Mapping[int, Any]) -> tuple[int, list[Answer]]:
    """The first id of the batch a reply frame answers, and its answers in request order.

    The batch is `outstanding[first id]` (anything with `items`). An echoed frame holds the
    requests themselves, which have no status: each counts as `echoed`. Both servers'
    frames are read the same way, so the drivers do the same work for both.
    """
    replies = msgpack.unpackb(payload)
    if isinstance(replies, dict):
        replies = [replies]
    if not replies or not isinstance(replies, list):
        raise ProtocolBreach(f"reply frame is not a non-empty array of maps: {replies!r:.200}")
    first_id = replies[0].get("id")
    batch = outstanding.get(first_id)
    if batch is None:
        raise ProtocolBreach(f"reply for an id that is not in flight: {replies[0]!r:.200}")
    if len(replies) != len(batch.items):
        raise ProtocolBreach(f"{len(replies)} replies for a batch of {len(batch.items)}")
    answers: list[Answer] = []
    expected_id = first_id
    for reply in replies:
        if reply.get("id") != expected_id:
            raise ProtocolBreach(f"reply id {reply.get('id')!r} where {expected_id} was due")
        expected_id += 1
        answers.append((reply.get("status", ECHOED), reply.get("reservation"), reply.get("remaining")))
    return first_id, answers


# ---------------------------------------------------------------- Redis + Lua


def redis_encoder(
    pack_commands: Callable[[Any], list[bytes]], sha: str, prefix: str, skus: Sequence[SkuPlan]
) -> Encoder:
    """A batch as one pipelined write of EVALSHA calls (packed by redis-py's own packer)."""
    keys = [sku_keys(prefix, plan.sku) for plan in skus]

    def encode(items: Sequence[Item], first_id: int) -> bytes:
        commands = []
        for op, buyer, sku, reservation in items:
            if op == RESERVE_OP:
                name, key = buyer_name(buyer), idempotency_key(buyer)
                commands.append(("EVALSHA", sha, SCRIPT_KEYS, *keys[sku], RESERVE_OP, "", name, 1, key))
            else:
                commands.append(("EVALSHA", sha, SCRIPT_KEYS, *keys[sku], op, "", reservation, buyer_name(buyer)))
        return b"".join(pack_commands(commands))

    return encode


def redis_answer(reply: Any) -> Answer:
    status = reply[0]
    if status == "ok" and len(reply) == 4:
        return status, reply[1], reply[3]
    return status, None, None


# ---------------------------------------------------------------- a soldout server's admin side


class AdminError(Exception):
    """The server refused or could not answer an admin request; the message says why."""


async def soldout_admin(url: str, token: str | None, work: Callable[[Any], Any]) -> Any:
    """Run `await work(client)` on a `protocol.client` connection of its own."""
    from protocol.client import ClientError, open_client

    try:
        async with open_client(url, token, reconnect_attempts=2) as client:
            return await work(client)
    except ClientError as error:
        raise AdminError(f"{url}: {error} (is the server up, are the tokens right?)") from None


async def put_skus(client: Any, scenario: Scenario) -> None:
    from protocol.messages import PutSku

    commands = [PutSku(plan.sku, plan.stock, plan.per_buyer_limit, plan.hold_seconds) for plan in scenario.skus]
    for command, reply in zip(commands, await client.execute(commands), strict=True):
        if reply.status != "ok":
            raise AdminError(f"put_sku {command.sku} was answered {reply.status}: {reply.error or ''}")


async def stock_counts(client: Any, scenario: Scenario) -> list[Any]:
    """Each SKU's `stock` reply; None for a SKU the server does not know."""
    from protocol.messages import Stock

    replies = await client.execute([Stock(plan.sku) for plan in scenario.skus])
    return [reply if reply.status == "ok" else None for reply in replies]


async def reserve_ok_count(client: Any) -> tuple[dict[str, Any], int]:
    """The server's stats, and how many reserves they count `ok`."""
    stats = await client.stats()
    return stats, int(stats.get("requests", {}).get("reserve", {}).get("ok", 0))


# Cancels go in chunks of this many, so one call never waits on a huge batch.
CANCEL_CHUNK = 1000


async def cancel_run_holds(client: Any, holds: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Cancel each (reservation, buyer); replies counted by status (a confirmed hold stays sold)."""
    from protocol.messages import Cancel

    statuses: dict[str, int] = {}
    for start in range(0, len(holds), CANCEL_CHUNK):
        chunk = [Cancel(reservation, buyer) for reservation, buyer in holds[start : start + CANCEL_CHUNK]]
        for reply in await client.execute(chunk):
            statuses[str(reply.status)] = statuses.get(str(reply.status), 0) + 1
    return statuses
