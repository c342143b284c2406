"""Two `soldout serve` nodes of a cluster, real processes on loopback over the real
three-server JetStream cluster: the shards split between them, and after kill -9 of the
node owning a hot SKU's shard, while a client streams reserves with keys through the
other, the survivor owns the shard within 10 s and every acknowledged hold is there."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import trio
from cluster_nodes import RETRY_SECONDS, SHARDS, NodeProcess, cluster_view, until
from nats_cluster import NatsCluster

from protocol.client import open_client

FAILOVER_SECONDS_MAX = 10.0


def test_kill_9_of_a_hot_skus_owner_loses_no_acknowledged_hold(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    a = NodeProcess(tmp_path, "proc-a", nats_cluster.urls)
    b = NodeProcess(tmp_path, "proc-b", nats_cluster.urls)
    try:
        a.start()
        b.start()
        trio.run(failover_keeps_every_hold, a, b)
    finally:
        a.stop(signal.SIGKILL)
        b.stop()


async def failover_keeps_every_hold(a: NodeProcess, b: NodeProcess) -> None:
    async def split() -> bool:
        # Settled: each owns its fair share, so no hand-off moves the hot shard later.
        view = await cluster_view(b.url)
        owners = list(view["owners"].values())
        return owners.count("proc-a") == owners.count("proc-b") == SHARDS // 2

    await until(split, 30)
    view = await cluster_view(b.url)
    async with open_client(b.url, reconnect_attempts=10) as client:
        # A hot SKU on a shard that proc-a owns, reached through proc-b.
        candidates = [f"HOT-{number}" for number in range(40)]
        for sku in candidates:
            assert (await client.put_sku(sku, stock=1000, per_buyer_limit=1)).ok
        hot = None
        for sku in candidates:
            if view["owners"][str((await client.get_sku(sku)).shard)] == "proc-a":
                hot = sku
                break
        assert hot is not None
        shard = (await client.get_sku(hot)).shard
        acknowledged: dict[str, str] = {}
        killed_at: float | None = None
        retried = 0

        async def reserve(buyer: int) -> None:
            key = f"key-{buyer}"
            with trio.fail_after(RETRY_SECONDS):
                while True:
                    reply = await client.reserve(hot, buyer=f"buyer-{buyer}", key=key)
                    if reply.status != "unavailable":
                        break
                    nonlocal retried
                    retried += 1
                    await trio.sleep(0.2)  # the shard has no owner for a moment: retry with the key
            assert reply.status == "ok", reply
            acknowledged[key] = reply.reservation  # type: ignore[assignment]

        async with trio.open_nursery() as nursery:
            for buyer in range(300):
                nursery.start_soon(reserve, buyer)
                if buyer == 150:
                    assert (await cluster_view(b.url))["owners"][str(shard)] == "proc-a"
                    a.stop(signal.SIGKILL)  # the owner dies mid-stream
                    killed_at = trio.current_time()
                await trio.sleep(0.005)
        assert killed_at is not None
        # Some reserves met the shard without an owner, and were retried with their keys
        # (by the client itself, and past its own tries by this test).
        assert client.unavailable_retries + retried > 0

        async def survivor_owns_it() -> bool:
            return (await cluster_view(b.url))["owners"][str(shard)] == "proc-b"

        await until(survivor_owns_it, FAILOVER_SECONDS_MAX)
        # Every acknowledged hold is there: a retry with its key returns it, and nothing more was held.
        assert len(acknowledged) == 300
        for buyer in range(300):
            key = f"key-{buyer}"
            again = await client.reserve(hot, buyer=f"buyer-{buyer}", key=key)
            assert (again.status, again.reservation) == ("ok", acknowledged[key])
        stock = await client.stock(hot)
        assert stock.held + stock.sold == 300
        assert stock.held + stock.sold <= stock.stock
        assert len(set(acknowledged.values())) == 300


def test_a_paused_owner_answers_nothing_new_as_ok_once_replaced_and_steps_down(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    a = NodeProcess(tmp_path, "zombie-a", nats_cluster.urls)
    b = NodeProcess(tmp_path, "zombie-b", nats_cluster.urls)
    try:
        a.start()
        b.start()
        trio.run(a_zombie_is_fenced, a, b)
    finally:
        a.stop(signal.SIGKILL)
        b.stop()


async def a_zombie_is_fenced(a: NodeProcess, b: NodeProcess) -> None:
    assert a.process is not None

    async def split() -> bool:
        owners = list((await cluster_view(b.url))["owners"].values())
        return owners.count("zombie-a") == owners.count("zombie-b") == SHARDS // 2

    await until(split, 30)
    view = await cluster_view(b.url)
    async with open_client(a.url, reconnect_attempts=3) as through_a, open_client(b.url) as through_b:
        candidates = [f"ZOMBIE-{number}" for number in range(40)]
        for sku in candidates:
            assert (await through_b.put_sku(sku, stock=1000, per_buyer_limit=1)).ok
        shards = {sku: (await through_b.get_sku(sku)).shard for sku in candidates}
        hot = next(sku for sku in candidates if view["owners"][str(shards[sku])] == "zombie-a")
        answers: dict[str, Any] = {}

        async def reserve(buyer: int) -> None:
            key = f"z-key-{buyer}"
            with trio.move_on_after(RETRY_SECONDS):
                answers[key] = await through_a.reserve(hot, buyer=f"buyer-{buyer}", key=key)

        async with trio.open_nursery() as nursery:
            for buyer in range(100):
                nursery.start_soon(reserve, buyer)
                if buyer == 50:
                    a.process.send_signal(signal.SIGSTOP)  # paused past its lease, holding requests

                    async def replaced() -> bool:
                        return (await cluster_view(b.url))["owners"][str(shards[hot])] == "zombie-b"

                    await until(replaced, 30)
                    # The new owner serves the shard while the old one is paused.
                    assert (await through_b.reserve(hot, buyer="during", key="during")).ok
                    a.process.send_signal(signal.SIGCONT)
                await trio.sleep(0.005)

        async def stepped_down() -> bool:
            return (await cluster_view(a.url))["owners"][str(shards[hot])] == "zombie-b"

        await until(stepped_down, 30)
        # Every `ok` the paused node gave is in the journal the new owner serves: its key returns it.
        oks = {key: reply for key, reply in answers.items() if reply.status == "ok"}
        assert oks  # those before the pause at least
        assert all(reply.status in ("ok", "unavailable", "busy") for reply in answers.values())
        for key, reply in oks.items():
            buyer = f"buyer-{key.removeprefix('z-key-')}"
            again = await through_b.reserve(hot, buyer=buyer, key=key)
            assert (again.status, again.reservation) == ("ok", reply.reservation)
        stock = await through_b.stock(hot)
        assert stock.held + stock.sold <= stock.stock


def test_kill_9_of_the_journal_streams_leader_under_load_loses_nothing_acknowledged(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    a = NodeProcess(tmp_path, "leader-a", nats_cluster.urls)
    try:
        a.start()
        trio.run(journal_leader_dies_under_load, a, nats_cluster)
    finally:
        a.stop(signal.SIGKILL)
        for index, server in enumerate(nats_cluster.servers):
            if not server.running:
                nats_cluster.restart_server(index)


async def journal_leader_dies_under_load(a: NodeProcess, nats_cluster: NatsCluster) -> None:
    async def serving_all() -> bool:
        owners = (await cluster_view(a.url))["owners"].values()
        return all(owner == "leader-a" for owner in owners)

    await until(serving_all, 30)
    acknowledged: dict[str, str] = {}
    async with open_client(a.url, reconnect_attempts=10) as client:
        assert (await client.put_sku("LEADER-HOT", stock=1000, per_buyer_limit=1)).ok
        leader = await trio.to_thread.run_sync(nats_cluster.wait_stream_leader, "soldout_journal")

        async def reserve(buyer: int) -> None:
            key = f"l-key-{buyer}"
            with trio.fail_after(RETRY_SECONDS * 2):
                while True:
                    reply = await client.reserve("LEADER-HOT", buyer=f"buyer-{buyer}", key=key)
                    if reply.status != "unavailable":
                        break
                    await trio.sleep(0.2)
            assert reply.status == "ok", reply
            acknowledged[key] = reply.reservation  # type: ignore[assignment]

        async with trio.open_nursery() as nursery:
            for buyer in range(200):
                nursery.start_soon(reserve, buyer)
                if buyer == 100:
                    # The stream's leader dies mid-stream; the other two elect a new one.
                    await trio.to_thread.run_sync(nats_cluster.kill_server, nats_cluster.index_of(leader))
                await trio.sleep(0.005)
        assert len(acknowledged) == 200
        # Nothing acknowledged is lost: each key returns its hold, and nothing more is held.
        for buyer in range(200):
            key = f"l-key-{buyer}"
            again = await client.reserve("LEADER-HOT", buyer=f"buyer-{buyer}", key=key)
            assert (again.status, again.reservation) == ("ok", acknowledged[key])
        stock = await client.stock("LEADER-HOT")
        assert stock.held == 200
