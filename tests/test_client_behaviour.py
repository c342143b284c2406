"""The trio client (`protocol.client`) and the asyncio client (`protocol.aio`) behave alike.

Every test here is written once and runs for both clients, against a real `soldout
serve` process on loopback (or, for what a real server will not do on demand — answer
frames out of order, hold replies back — a scripted websocket peer): every op and
status, concurrent calls batched into frames, pipelined frames matched by id whatever
order they are answered in, refusals and unreachable servers as ClientError, a
cancelled call never answered into another, and reserves retried across a kill -9 and
restart of a durable server returning their first holds.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_flavours import FLAVOURS, Flavour, ScriptedPeer, ServerProcess, free_port, requests_in, serve
from test_client import a_sale
from wire_helpers import ADMIN_TOKEN, FRONTEND_TOKEN

from protocol.client_core import ClientError
from protocol.messages import HoldReply, RegisterReply, Reply, Reserve, SkuReply, Stock, StockReply

SKU = "MI-BAND-1"


@pytest.fixture(params=FLAVOURS, ids=str)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from serve(tmp_path)


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    scripted = ScriptedPeer()
    yield scripted
    scripted.close()


# ------------------------------------------------------------ every op and status


async def tell_a_sale(flavour: Flavour, url: str) -> list[Any]:
    async with flavour.open_client(url, ADMIN_TOKEN) as client:
        return await a_sale(client)


def test_every_op_answers_with_its_status_and_reply_type(flavour: Flavour, server: ServerProcess) -> None:
    answered = flavour.run(tell_a_sale, server.url)
    assert [reply.status for reply in answered] == [
        *["ok", "ok", "invalid", "ok", "unknown_sku"],
        *["ok", "ok", "limit_exceeded", "ok", "sold_out", "invalid", "not_registered", "ok", "unknown_sku"],
        *["ok", "unknown_sku", "ok", "conflict", "not_found", "not_found", "ok"],
        *["ok", "ok", "ok", "ok", "conflict", "ok", "not_found", "ok", "ok", "ok", "unknown_sku"],
    ]
    kinds = {3: RegisterReply, 4: RegisterReply, 14: StockReply, 15: StockReply, 20: StockReply}
    kinds |= {26: HoldReply, 27: HoldReply, 28: RegisterReply, 30: SkuReply, 31: SkuReply}
    assert [type(reply) for reply in answered] == [kinds.get(index, Reply) for index in range(len(answered))]
    # The retried key returned the first hold; the hold read back is the confirmed one.
    assert answered[5].reservation == answered[6].reservation
    assert (answered[26].state, answered[26].order, answered[26].qty) == ("confirmed", "po-1", 1)
    assert (answered[28].registered, answered[28].already) == (1, 1)
    assert (answered[30].stock, answered[30].registration_required, answered[30].registered) == (4, True, 3)


async def ping_stats_and_roles(flavour: Flavour, url: str) -> None:
    async with flavour.open_client(url, ADMIN_TOKEN) as admin, flavour.open_client(url, FRONTEND_TOKEN) as front:
        assert await admin.ping() == Reply("ok")
        assert await front.ping() == Reply("ok")
        assert (await admin.put_sku(SKU, stock=2)).status == "ok"
        assert [(await front.reserve(SKU, buyer=buyer)).status for buyer in ("u1", "u2", "u3")] == [
            "ok",
            "ok",
            "sold_out",
        ]
        forbidden = await front.put_sku(SKU, stock=100)
        assert (forbidden.status, "admin" in (forbidden.error or "")) == ("forbidden", True)
        with pytest.raises(ClientError, match="forbidden"):
            await front.stats()
        stats = await admin.stats()
    assert stats["requests"]["reserve"] == {"ok": 2, "sold_out": 1}
    assert stats["skus"][SKU]["held"] == 2


def test_ping_stats_and_the_admin_role(flavour: Flavour, server: ServerProcess) -> None:
    flavour.run(ping_stats_and_roles, server.url)


# ------------------------------------------------------------ batching and pipelining


async def concurrent_reserves(flavour: Flavour, url: str, calls: int) -> tuple[list[Reply], list[Any], int, int]:
    async with flavour.open_client(url, ADMIN_TOKEN) as client:
        await client.put_sku(SKU, stock=calls)
        await client.put_sku("ROUND", stock=10)
        before = (await client.stats())["frames_received"]
        replies = await flavour.gather(*(lambda i=i: client.reserve(SKU, buyer=f"u{i}") for i in range(calls)))
        middle = (await client.stats())["frames_received"]
        executed = await client.execute([*(Reserve("ROUND", f"u{i}") for i in range(50)), Stock("ROUND")])
        after = (await client.stats())["frames_received"]
    # Each stats call is a frame of its own.
    return replies, executed, middle - before - 1, after - middle - 1


def test_concurrent_calls_and_execute_travel_together_in_few_frames(flavour: Flavour, server: ServerProcess) -> None:
    calls = 500
    replies, executed, frames, execute_frames = flavour.run(concurrent_reserves, server.url, calls)
    assert [reply.status for reply in replies] == ["ok"] * calls
    assert len({reply.reservation for reply in replies}) == calls
    # Calls made together go together, up to 100 a frame: far fewer frames than calls.
    assert calls // 100 <= frames <= calls // 10, frames
    # `execute` keeps its order: the first ten buyers get the ten units.
    assert [reply.status for reply in executed[:-1]] == ["ok"] * 10 + ["sold_out"] * 40
    assert (type(executed[-1]), executed[-1].held) == (StockReply, 10)
    assert 1 <= execute_frames <= 2, execute_frames


async def pipelined_calls(flavour: Flavour, peer: ScriptedPeer) -> list[Reply]:
    async with flavour.open_client(peer.url, FRONTEND_TOKEN, batch_requests_max=1) as client:

        async def answer_backwards() -> None:
            # Three frames arrive before any is answered: the calls are pipelined.
            frames = await flavour.to_thread(peer.wait_for_frames, 3)
            for request in reversed(requests_in(frames)):
                peer.reply({"id": request["id"], "status": "ok", "reservation": f"hold-of-{request['buyer']}"})

        *replies, _ = await flavour.gather(
            *(lambda buyer=buyer: client.reserve(SKU, buyer=buyer) for buyer in ("u1", "u2", "u3")),
            answer_backwards,
        )
        return replies


def test_pipelined_frames_answered_out_of_order_are_matched_by_id(flavour: Flavour, peer: ScriptedPeer) -> None:
    replies = flavour.run(pipelined_calls, peer)
    assert [reply.reservation for reply in replies] == ["hold-of-u1", "hold-of-u2", "hold-of-u3"]
    requests = requests_in(peer.frames)
    assert [type(frame) for frame in peer.frames] == [dict, dict, dict]
    # Every reserve carried a key of its own, made by the client, and a fresh id.
    assert len({request["key"] for request in requests}) == len({request["id"] for request in requests}) == 3


# ------------------------------------------------------------ unavailable


async def reserve_through_unavailable(flavour: Flavour, peer: ScriptedPeer, statuses: list[str]) -> tuple[Reply, int]:
    """A reserve the peer answers with each of `statuses` in turn, as the client sends it again."""
    async with flavour.open_client(peer.url, FRONTEND_TOKEN) as client:

        async def answer() -> None:
            for attempt, status in enumerate(statuses):
                frames = await flavour.to_thread(peer.wait_for_frames, attempt + 1)
                (request,) = requests_in(frames[attempt:])
                peer.reply({"id": request["id"], "status": status, "reservation": "first-hold"})

        reply, _ = await flavour.gather(lambda: client.reserve(SKU, buyer="u1"), answer)
        return reply, client.unavailable_retries


def test_a_reserve_answered_unavailable_is_sent_again_with_its_key_until_answered(
    flavour: Flavour, peer: ScriptedPeer
) -> None:
    reply, retries = flavour.run(reserve_through_unavailable, peer, ["unavailable"] * 3 + ["ok"])
    assert (reply.status, reply.reservation) == ("ok", "first-hold")
    assert retries == 3
    requests = requests_in(peer.frames)
    assert len(requests) == 4
    assert len({request["key"] for request in requests}) == 1  # one key: a decided reserve returns its hold
    assert len({request["id"] for request in requests}) == 4


def test_a_reserve_still_unavailable_after_the_last_retry_returns_unavailable(
    flavour: Flavour, peer: ScriptedPeer
) -> None:
    reply, retries = flavour.run(reserve_through_unavailable, peer, ["unavailable"] * 11)
    assert reply.status == "unavailable"
    assert retries == 10
    assert len(requests_in(peer.frames)) == 11


# ------------------------------------------------------------ cancellation


async def cancelled_calls(flavour: Flavour, peer: ScriptedPeer) -> tuple[Any, Any, Reply, Reply]:
    async with flavour.open_client(peer.url, FRONTEND_TOKEN) as client:
        sent = threading.Event()

        async def reserve(buyer: str) -> Reply:
            return await client.reserve(SKU, buyer=buyer)  # type: ignore[no-any-return]

        def frames_reached(count: int) -> None:
            peer.wait_for_frames(count)
            sent.set()

        # "late" is cancelled once the peer has it; its reply comes afterwards.
        thread = threading.Thread(target=frames_reached, args=(1,))
        thread.start()
        late_error = await flavour.cancel_after(lambda: reserve("late"), sent)
        thread.join()
        # "never" is cancelled too, and never answered at all.
        sent.clear()
        thread = threading.Thread(target=frames_reached, args=(2,))
        thread.start()
        never_error = await flavour.cancel_after(lambda: reserve("never"), sent)
        thread.join()

        async def answer() -> None:
            frames = await flavour.to_thread(peer.wait_for_frames, 3)
            late, _, now = requests_in(frames)
            # The cancelled call's reply first, then the live call's: each goes by its id.
            peer.reply({"id": late["id"], "status": "ok", "reservation": "hold-of-late"})
            peer.reply({"id": now["id"], "status": "ok", "reservation": "hold-of-now"})

        now, _ = await flavour.gather(lambda: reserve("now"), answer)

        async def answer_after_the_drop() -> None:
            peer.drop()
            frames = await flavour.to_thread(peer.wait_for_frames, 4)
            assert len(requests_in(frames[3:])) == 1, frames
            (request,) = requests_in(frames[3:])
            peer.reply({"id": request["id"], "status": "ok", "reservation": f"hold-of-{request['buyer']}"})

        after, _ = await flavour.gather(lambda: reserve("after"), answer_after_the_drop)
        return late_error, never_error, now, after


def test_a_cancelled_call_is_never_answered_into_another_nor_sent_again(flavour: Flavour, peer: ScriptedPeer) -> None:
    late_error, never_error, now, after = flavour.run(cancelled_calls, peer)
    assert isinstance(late_error, flavour.cancelled), late_error
    assert isinstance(never_error, flavour.cancelled), never_error
    assert now.reservation == "hold-of-now"
    assert after.reservation == "hold-of-after"
    # After the connection dropped, the next connection carried only the new call: the
    # cancelled ones, answered or not, were not sent again.
    assert peer.connections == 2
    assert [request["buyer"] for request in requests_in(peer.frames)] == ["late", "never", "now", "after"]


# ------------------------------------------------------------ refusals


async def open_and_ping(flavour: Flavour, url: str, token: str | None, **options: Any) -> None:
    async with flavour.open_client(url, token, **options) as client:
        await client.ping()


@pytest.mark.parametrize(
    ("token", "path", "status"), [("not-a-token", "/v1", 401), (None, "/v1", 401), (ADMIN_TOKEN, "/v2", 404)]
)
def test_a_refused_connection_raises_client_error_naming_the_status(
    flavour: Flavour, server: ServerProcess, token: str | None, path: str, status: int
) -> None:
    url = server.url.removesuffix("/v1") + path
    with pytest.raises(ClientError, match=f"refused the connection: HTTP {status}"):
        flavour.run(open_and_ping, url, token)


async def second_connection(flavour: Flavour, url: str) -> None:
    async with flavour.open_client(url, FRONTEND_TOKEN) as first:
        assert (await first.ping()).status == "ok"
        with pytest.raises(ClientError, match="refused the connection: HTTP 503"):
            await open_and_ping(flavour, url, FRONTEND_TOKEN)
        assert (await first.ping()).status == "ok"


def test_a_full_server_refuses_with_503_as_client_error(flavour: Flavour, tmp_path: Path) -> None:
    for running in serve(tmp_path, limits="connections_max = 1"):
        flavour.run(second_connection, running.url)


def test_an_unreachable_server_raises_client_error(flavour: Flavour) -> None:
    with pytest.raises(ClientError, match="cannot connect"):
        flavour.run(
            functools.partial(open_and_ping, reconnect_attempts=2), f"ws://127.0.0.1:{free_port()}/v1", FRONTEND_TOKEN
        )


async def calls_after_the_server_is_gone(flavour: Flavour, server: ServerProcess) -> None:
    async with flavour.open_client(server.url, ADMIN_TOKEN, reconnect_attempts=2) as client:
        assert (await client.ping()).status == "ok"
        server.kill()
        with pytest.raises(ClientError):
            await client.ping()
        with pytest.raises(ClientError):
            await client.ping()


def test_calls_after_the_server_is_gone_raise_client_error(flavour: Flavour, server: ServerProcess) -> None:
    flavour.run(calls_after_the_server_is_gone, server)


# ------------------------------------------------------------ kill -9 and restart


async def reserves_across_a_crash(flavour: Flavour, server: ServerProcess, calls: int) -> dict[str, Any]:
    pid = server.process.pid if server.process is not None else 0
    killed = threading.Event()
    # Frames of 10: when the first reply arrives, most calls are still in flight, sent or not.
    async with flavour.open_client(server.url, ADMIN_TOKEN, reconnect_attempts=100, batch_requests_max=10) as client:
        assert (await client.put_sku(SKU, stock=10 * calls, per_buyer_limit=2)).status == "ok"

        async def reserve(index: int) -> Reply:
            reply = await client.reserve(SKU, buyer=f"u{index}", key=f"key-{index}")
            if not killed.is_set():
                # The first reply to arrive: the server dies now, with the rest in flight.
                os.kill(pid, signal.SIGKILL)
                killed.set()
            return reply  # type: ignore[no-any-return]

        async def restart() -> None:
            await flavour.to_thread(killed.wait, 60)
            server.kill()  # reaps it
            await flavour.to_thread(server.start)

        *first, _ = await flavour.gather(*(lambda i=i: reserve(i) for i in range(calls)), restart)
        again = await client.execute([Reserve(SKU, f"u{index}", 1, f"key-{index}") for index in range(calls)])
        stock = await client.stock(SKU)
        reconnects, resent = client.reconnects, client.resent
    return {"first": first, "again": again, "held": stock.held, "reconnects": reconnects, "resent": resent}


def test_reserves_retried_across_kill_9_and_restart_return_their_first_holds(flavour: Flavour, tmp_path: Path) -> None:
    calls = 1000
    for running in serve(tmp_path, data_dir=True):
        outcome = flavour.run(reserves_across_a_crash, running, calls)
    first, again = outcome["first"], outcome["again"]
    assert outcome["reconnects"] >= 1
    assert outcome["resent"] > 0  # calls sent and unanswered when the server died went again
    assert [reply.status for reply in first] == ["ok"] * calls
    # One hold per reserve: a buyer may hold two, so a reserve decided twice would show.
    assert len({reply.reservation for reply in first}) == calls
    assert outcome["held"] == calls
    # Asked again with the same keys, each returns the hold it got the first time.
    assert [reply.reservation for reply in again] == [reply.reservation for reply in first]
