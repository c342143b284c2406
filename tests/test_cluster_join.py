"""A third `soldout serve` node joins a running two-node cluster, real processes on
loopback over the real three-server JetStream cluster: while a client streams keyed
reserves through one gateway, shards move to the newcomer without anyone restarting,
it settles at its fair share, and nothing acknowledged is lost: every `ok`'s key
returns its hold, and each SKU sold exactly its stock, no more."""

from __future__ import annotations

from pathlib import Path

import trio
from cluster_nodes import RETRY_SECONDS, SHARDS, NodeProcess, cluster_view, owner_counts, until
from nats_cluster import NatsCluster

from engine.cluster.leases import fair_shares
from protocol.client import Client, open_client
from protocol.messages import OK, SOLD_OUT, UNAVAILABLE, Reply

STOCK = 60
BUYERS_PER_SKU = 80  # more than the stock: every SKU sells out
SETTLE_SECONDS = 60.0
NAMES = ("join-a", "join-b", "join-c")


def test_a_joining_node_takes_its_share_without_a_restart_and_nothing_is_lost(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    a, b, c = (NodeProcess(tmp_path, name, nats_cluster.urls) for name in NAMES)
    try:
        a.start()
        b.start()
        trio.run(a_node_joins_under_load, a, b, c)
    finally:
        for node in (a, b, c):
            node.stop()


async def settled(url: str, names: tuple[str, ...]) -> bool:
    """Every shard owned, each of `names` at its fair share, as the node at `url` sees it."""
    counts = await owner_counts(url)
    return counts == {name: share for name, share in fair_shares(SHARDS, names).items() if share}


async def reserve_until_decided(client: Client, sku: str, buyer: str, key: str) -> Reply:
    """The reserve, retried with its key while the shard has no owner for a moment."""
    with trio.fail_after(RETRY_SECONDS):
        while True:
            reply = await client.reserve(sku, buyer=buyer, key=key)
            if reply.status != UNAVAILABLE:
                return reply
            await trio.sleep(0.2)


async def a_node_joins_under_load(a: NodeProcess, b: NodeProcess, c: NodeProcess) -> None:
    assert a.process is not None
    assert b.process is not None
    pids = (a.process.pid, b.process.pid)
    await until_settled(a.url, NAMES[:2])
    async with open_client(a.url, reconnect_attempts=10) as client:
        # One SKU on every shard, so whichever shards move carry holds with them.
        skus: dict[int, str] = {}
        for number in range(400):
            sku = f"JOIN-{number}"
            assert (await client.put_sku(sku, stock=STOCK, per_buyer_limit=1)).ok
            shard = (await client.get_sku(sku)).shard
            skus.setdefault(shard, sku)
            if len(skus) == SHARDS:
                break
        assert sorted(skus) == list(range(SHARDS))
        orders = [(sku, buyer) for buyer in range(BUYERS_PER_SKU) for sku in skus.values()]
        replies: dict[tuple[str, int], Reply] = {}
        before_join: set[tuple[str, int]] = set()
        joined = trio.Event()
        moved = trio.Event()

        async def reserve(sku: str, buyer: int) -> None:
            reply = await reserve_until_decided(client, sku, f"buyer-{buyer}", f"key-{sku}-{buyer}")
            assert reply.status in (OK, SOLD_OUT), reply
            replies[sku, buyer] = reply
            if not joined.is_set():
                before_join.add((sku, buyer))

        async def join() -> None:
            await trio.to_thread.run_sync(c.start)
            joined.set()
            await until_settled(a.url, NAMES)
            moved.set()

        async with trio.open_nursery() as nursery:
            for position, (sku, buyer) in enumerate(orders):
                if position == len(orders) // 4:
                    nursery.start_soon(join)
                if position == len(orders) * 3 // 4:
                    # The rest goes once the shards have moved: reserves before, during and after.
                    with trio.fail_after(SETTLE_SECONDS + 60):
                        await moved.wait()
                nursery.start_soon(reserve, sku, buyer)
                await trio.sleep(0.005)

        # No one restarted: the first two are the same processes, still running.
        assert (a.process.pid, b.process.pid) == pids
        assert a.process.poll() is None
        assert b.process.poll() is None
        await until_settled(c.url, NAMES)
        view_owners = await shard_owners(c.url)
        moved_shards = [shard for shard, owner in view_owners.items() if owner == "join-c"]
        assert moved_shards
        # Holds acknowledged before the join live on the shards that moved.
        moved_skus = {skus[shard] for shard in moved_shards}
        assert any(replies[order].ok for order in before_join if order[0] in moved_skus)

    assert len(replies) == len(orders)
    async with open_client(c.url, reconnect_attempts=10) as through_c:
        # Every `ok` is there: its key returns the same hold, through the newcomer's gateway.
        for (sku, buyer), first in replies.items():
            again = await reserve_until_decided(through_c, sku, f"buyer-{buyer}", f"key-{sku}-{buyer}")
            if first.ok:
                assert (again.status, again.reservation) == (OK, first.reservation), (sku, buyer)
            else:
                assert again.status == SOLD_OUT, (sku, buyer, again)
        for sku in skus.values():
            oks = [reply for (name, _), reply in replies.items() if name == sku and reply.ok]
            stock = await through_c.stock(sku)
            assert stock.held + stock.sold == len(oks) == STOCK, sku
            assert len({reply.reservation for reply in oks}) == len(oks)


async def until_settled(url: str, names: tuple[str, ...]) -> None:
    await until(lambda: settled(url, names), SETTLE_SECONDS)


async def shard_owners(url: str) -> dict[int, str | None]:
    return {int(shard): owner for shard, owner in (await cluster_view(url))["owners"].items()}
