"""The client for frontends (protocol/client.py) against a real server over loopback.

Its methods answer as the in-process API does; concurrent calls share frames; refusals
and unreachable servers raise ClientError; and when connections drop (a TCP proxy in
between cuts them) or the server restarts on its data directory, every unanswered
reserve goes again with its idempotency key and never makes a second hold.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from wire_helpers import (
    ADMIN_TOKEN,
    FRONTEND_TOKEN,
    BackgroundServer,
    ClientStreams,
    SettableWallClock,
    open_tcp_proxy,
    server_config,
)

from engine.api import open_engine
from engine.config import EngineConfig
from engine.server.config import SkuSettings
from engine.server.runner import RunningServer, open_server
from protocol.client import ClientError, open_client
from protocol.limits import Limits
from protocol.messages import HoldReply, RegisterReply, Reply, Reserve, SkuReply, Stock, StockReply

SKU = "MI-BAND-1"
# Loads through a cut connection end in about a second; a call lost on the way would
# leave its caller waiting for ever, so such a test fails after this long instead.
LOAD_GUARD_SECONDS = 30


@pytest.fixture(autouse=True)
def client_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientStreams]:
    streams = ClientStreams()
    streams.install(monkeypatch)
    yield streams
    streams.release()


async def held(server: RunningServer, sku: str = SKU) -> int:
    reply = await server.engine.stock(sku)
    assert reply.status == "ok", reply
    return reply.held


async def a_sale(api: Any) -> list[Any]:
    """The same story told to the in-process API or to a client: every reply, in order."""
    replies: list[Any] = [
        await api.put_sku(SKU, stock=3, per_buyer_limit=2, hold_seconds=60),
        await api.put_sku("VIP", stock=2, registration_required=True),
        await api.put_sku("BAD", stock=-1),
        await api.register("VIP", ["u1", "u2"]),
        await api.register("NOPE", ["u1"]),
    ]
    first = await api.reserve(SKU, buyer="u1", key="first")
    replies += [
        first,
        await api.reserve(SKU, buyer="u1", key="first"),
        await api.reserve(SKU, buyer="u1", qty=2, key="too-many"),
        await api.reserve(SKU, buyer="u2", qty=2, key="u2"),
        await api.reserve(SKU, buyer="u3", key="u3"),
        await api.reserve(SKU, buyer="u3", qty=0, key="zero"),
        await api.reserve("VIP", buyer="u9", key="u9"),
        await api.reserve("VIP", buyer="u1", key="vip"),
        await api.reserve("NOPE", buyer="u1", key="nope"),
        await api.stock(SKU),
        await api.stock("NOPE"),
        await api.confirm(first.reservation, buyer="u1"),
        await api.cancel(first.reservation, buyer="u1"),
        await api.cancel("0-999", buyer="u1"),
        await api.confirm(first.reservation, buyer="u2"),
        await api.stock(SKU),
    ]
    # A restock naming only the stock: the limit (2) and the hold time (60 s) stay.
    replies.append(await api.put_sku(SKU, stock=5))
    second = await api.reserve(SKU, buyer="u3", key="second")
    replies += [
        second,
        await api.confirm(second.reservation, buyer="u3", order="po-1"),
        await api.confirm(second.reservation, buyer="u3", order="po-1"),
        await api.confirm(second.reservation, buyer="u3", order="po-2"),
        await api.hold(second.reservation, buyer="u3"),
        await api.hold(second.reservation, buyer="u1"),
        await api.register("VIP", ["u1", "u3"]),
        await api.put_sku("VIP", stock=4),
        await api.get_sku("VIP"),
        await api.get_sku("NOPE"),
    ]
    return replies


async def test_every_method_answers_as_the_in_process_api_does(client_streams: ClientStreams) -> None:
    # Both run at the same wall-clock moment, so even expiry times must agree.
    async with open_engine(EngineConfig(shards=4, wall_clock=SettableWallClock())) as engine:
        expected = await a_sale(engine)
    async with (
        open_server(server_config(wall_clock=SettableWallClock())) as server,
        client_streams.open_client(server.url, ADMIN_TOKEN) as client,
    ):
        answered = await a_sale(client)
    assert answered == expected
    assert [reply.status for reply in answered] == [
        *["ok", "ok", "invalid", "ok", "unknown_sku"],
        *["ok", "ok", "limit_exceeded", "ok", "sold_out", "invalid", "not_registered", "ok", "unknown_sku"],
        *["ok", "unknown_sku", "ok", "conflict", "not_found", "not_found", "ok"],
        *["ok", "ok", "ok", "ok", "conflict", "ok", "not_found", "ok", "ok", "ok", "unknown_sku"],
    ]
    kinds = {3: RegisterReply, 4: RegisterReply, 14: StockReply, 15: StockReply, 20: StockReply}
    kinds |= {26: HoldReply, 27: HoldReply, 28: RegisterReply, 30: SkuReply, 31: SkuReply}
    assert [type(reply) for reply in answered] == [kinds.get(index, Reply) for index in range(len(answered))]
    assert (answered[26].state, answered[26].order, answered[26].qty) == ("confirmed", "po-1", 1)
    assert (answered[28].registered, answered[28].already) == (1, 1)
    # A restock that names only the stock keeps registration: the sale stays closed to strangers.
    assert (answered[30].stock, answered[30].registration_required, answered[30].registered) == (4, True, 3)


async def test_ping_and_stats(client_streams: ClientStreams) -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=2),))
    async with open_server(config) as server, client_streams.open_client(server.url, ADMIN_TOKEN) as client:
        assert await client.ping() == Reply("ok")
        assert [(await client.reserve(SKU, buyer=buyer)).status for buyer in ("u1", "u2", "u3")] == [
            "ok",
            "ok",
            "sold_out",
        ]
        stats = await client.stats()
    assert stats["requests"]["reserve"] == {"ok": 2, "sold_out": 1}
    assert stats["requests"]["ping"] == {"ok": 1}
    assert stats["skus"][SKU]["held"] == 2


async def test_execute_decides_commands_in_the_order_given(client_streams: ClientStreams) -> None:
    # As the in-process `Engine.execute` does: the first `stock` buyers get the units.
    stock = 10
    config = server_config(skus=(SkuSettings(SKU, stock=stock * 20),))
    async with open_server(config) as server, client_streams.open_client(server.url, FRONTEND_TOKEN) as client:
        for round_number in range(20):
            await server.engine.put_sku(f"ROUND-{round_number}", stock=stock)
            commands = [Reserve(f"ROUND-{round_number}", f"u{index}") for index in range(5 * stock)]
            replies = await client.execute([*commands, Stock(f"ROUND-{round_number}")])
            statuses = [reply.status for reply in replies[:-1]]
            assert statuses == ["ok"] * stock + ["sold_out"] * 4 * stock, f"round {round_number}"
            assert type(replies[-1]) is StockReply
            assert replies[-1].held == stock


async def test_a_frontend_token_cannot_run_admin_ops(client_streams: ClientStreams) -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=2),))
    async with open_server(config) as server, client_streams.open_client(server.url, FRONTEND_TOKEN) as client:
        forbidden = await client.put_sku(SKU, stock=100)
        assert (forbidden.status, "admin" in (forbidden.error or "")) == ("forbidden", True)
        assert (await client.register(SKU, ["u1"])).status == "forbidden"
        with pytest.raises(ClientError, match="forbidden"):
            await client.stats()
        assert (await client.stock(SKU)).stock == 2


async def test_concurrent_calls_travel_together_in_few_frames(client_streams: ClientStreams) -> None:
    calls = 500
    config = server_config(skus=(SkuSettings(SKU, stock=calls),))
    replies: dict[str, Reply] = {}
    async with open_server(config) as server, client_streams.open_client(server.url, FRONTEND_TOKEN) as client:
        frames_before = server.metrics.frames_received
        await run_reserves(client, [f"u{index}" for index in range(calls)], replies)
        frames = server.metrics.frames_received - frames_before
    assert_one_hold_per_call(replies, calls, calls)
    # Calls made together go together, up to 100 a frame: far fewer frames than calls.
    assert calls // 100 <= frames <= calls // 10, frames


async def test_execute_sends_its_commands_in_few_frames(client_streams: ClientStreams) -> None:
    calls = 500
    config = server_config(skus=(SkuSettings(SKU, stock=calls),))
    async with open_server(config) as server, client_streams.open_client(server.url, FRONTEND_TOKEN) as client:
        frames_before = server.metrics.frames_received
        replies = await client.execute([Reserve(SKU, f"u{index}") for index in range(calls)])
        frames = server.metrics.frames_received - frames_before
    assert [reply.status for reply in replies] == ["ok"] * calls
    assert len({reply.reservation for reply in replies}) == calls
    assert calls // 100 <= frames <= calls // 10, f"{calls} commands of one execute went in {frames} frames"


async def test_a_reserve_without_a_key_gets_its_own_and_one_with_a_key_is_idempotent(
    client_streams: ClientStreams,
) -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=10, per_buyer_limit=3),))
    async with open_server(config) as server, client_streams.open_client(server.url, FRONTEND_TOKEN) as client:
        first = await client.reserve(SKU, buyer="u1")
        second = await client.reserve(SKU, buyer="u1")
        assert first.status == second.status == "ok"
        assert first.reservation != second.reservation
        keyed = [await client.reserve(SKU, buyer="u1", key="mine") for _ in range(3)]
        assert {reply.reservation for reply in keyed} == {keyed[0].reservation}
        assert await held(server) == 3


@pytest.mark.parametrize(("token", "path"), [("not-a-token", "/v1"), (None, "/v1"), (ADMIN_TOKEN, "/v2")])
async def test_a_refused_connection_raises_client_error(
    client_streams: ClientStreams, token: str | None, path: str
) -> None:
    async with open_server(server_config()) as server:
        url = server.url.removesuffix("/v1") + path
        with pytest.raises(ClientError, match=r"401|404"):
            async with client_streams.open_client(url, token):
                pass


async def test_an_unreachable_server_raises_client_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on `port` now: every attempt is refused.
    with pytest.raises(ClientError, match="cannot connect"):
        async with open_client(f"ws://127.0.0.1:{port}/v1", FRONTEND_TOKEN, reconnect_attempts=2):
            pass


async def test_a_peer_that_drops_the_connection_before_the_handshake_is_not_waited_on_forever() -> None:
    # A load balancer in front of a restarting server accepts TCP and closes it at once.
    async def accept_and_close(stream: trio.SocketStream) -> None:
        await stream.aclose()

    outcome: list[str] = []

    async def connect(port: int) -> None:
        try:
            async with open_client(f"ws://127.0.0.1:{port}/v1", FRONTEND_TOKEN, reconnect_attempts=2):
                outcome.append("connected")
        except* ClientError:  # bare or in a group: how it is raised is another test's subject
            outcome.append("client error")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, accept_and_close, 0)
        nursery.start_soon(connect, listeners[0].socket.getsockname()[1])
        # The client pauses at most 0.1 s between its attempts; idle far longer means it waits for nothing.
        await trio.testing.wait_all_tasks_blocked(cushion=0.5)
        nursery.cancel_scope.cancel()
    assert outcome == ["client error"], "the client waits forever for a handshake that will never come"


async def test_calls_after_the_server_is_gone_raise_client_error(client_streams: ClientStreams) -> None:
    async with trio.open_nursery() as nursery:
        background = BackgroundServer(server_config(skus=(SkuSettings(SKU, stock=5),)))
        server = await nursery.start(background.run)
        async with client_streams.open_client(server.url, FRONTEND_TOKEN, reconnect_attempts=1) as client:
            assert (await client.reserve(SKU, buyer="u1")).status == "ok"
            await background.stop()
            with pytest.raises(ClientError):
                await client.reserve(SKU, buyer="u2")


async def test_leaving_the_client_closes_its_connection_at_once(client_streams: ClientStreams) -> None:
    async with open_server(server_config()) as server:
        left = trio.Event()

        async def use_a_client() -> None:
            async with open_client(server.url, FRONTEND_TOKEN) as client:
                assert (await client.ping()).status == "ok"
                assert server.metrics.connections_open == 1
            left.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(use_a_client)
            # Nothing is left to wait for once the client is done: idle this long means stuck.
            await trio.testing.wait_all_tasks_blocked(cushion=0.5)
            nursery.cancel_scope.cancel()
        (stream,) = client_streams.opened
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert left.is_set(), "leaving the client waits on a close handshake that cannot finish"
        assert stream.socket.fileno() == -1, "the client left its socket open"
        assert server.metrics.connections_open == 0, "the server still sees the client's connection"


async def test_calls_over_the_servers_batch_bound_are_answered_not_left_waiting(client_streams: ClientStreams) -> None:
    # The server takes batches of at most 10; the client sends up to 100 calls a frame.
    config = server_config(skus=(SkuSettings(SKU, stock=100),), limits=Limits(batch_requests_max=10))
    outcomes: list[str] = []

    async def reserve(client: Any, buyer: str) -> None:
        try:
            outcomes.append((await client.reserve(SKU, buyer=buyer)).status)
        except ClientError:
            outcomes.append("client error")

    async with (
        open_server(config) as server,
        client_streams.open_client(server.url, FRONTEND_TOKEN) as client,
        trio.open_nursery() as nursery,
    ):
        for index in range(50):
            nursery.start_soon(reserve, client, f"u{index}")
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        waiting = 50 - len(outcomes)
        nursery.cancel_scope.cancel()
    assert waiting == 0, f"{waiting} calls still wait for a reply the server will never send"


# ------------------------------------------------------------ reconnect


class Progress:
    """Wakes whoever waits for the next reply to come back."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


async def run_reserves(
    client: Any, buyers: list[str], replies: dict[str, Reply], progress: Progress | None = None
) -> None:
    async def one(buyer: str) -> None:
        replies[buyer] = await client.reserve(SKU, buyer=buyer)
        if progress is not None:
            progress.note()

    async with trio.open_nursery() as nursery:
        for buyer in buyers:
            nursery.start_soon(one, buyer)


def assert_one_hold_per_call(replies: dict[str, Reply], calls: int, holds: int) -> None:
    assert len(replies) == calls
    assert [buyer for buyer, reply in replies.items() if reply.status != "ok"] == []
    assert len({reply.reservation for reply in replies.values()}) == calls
    assert holds == calls, f"{holds} holds for {calls} reserves that each said ok once"


async def test_reserves_decided_but_unanswered_are_retried_with_their_keys(client_streams: ClientStreams) -> None:
    calls = 1000
    # A buyer may hold two units: a reserve made twice would show as a second hold.
    config = server_config(skus=(SkuSettings(SKU, stock=10 * calls, per_buyer_limit=2),))
    replies: dict[str, Reply] = {}
    async with (
        open_server(config) as server,
        open_tcp_proxy(server.port) as proxy,
        client_streams.open_client(proxy.url, FRONTEND_TOKEN) as client,
    ):
        assert (await client.ping()).status == "ok"
        proxy.drop_replies = True
        with trio.fail_after(LOAD_GUARD_SECONDS):  # a guard against a lost call, not a measurement
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_reserves, client, [f"u{index}" for index in range(calls)], replies)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                # Every reserve reached the server and holds a unit; no reply reached the client.
                assert await held(server) == calls
                assert replies == {}
                assert proxy.cut() == 1
                proxy.drop_replies = False
        assert client.reconnects == 1
        assert_one_hold_per_call(replies, calls, await held(server))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_connections_cut_under_load_never_make_a_second_hold(client_streams: ClientStreams, seed: int) -> None:
    generator = random.Random(seed)
    calls = 3000
    workers = 10
    config = server_config(skus=(SkuSettings(SKU, stock=10 * calls, per_buyer_limit=2),))
    cut_after = sorted(generator.sample(range(100, calls - 300), 4))
    replies: dict[str, Reply] = {}
    progress = Progress()
    cuts = 0
    async with (
        open_server(config) as server,
        open_tcp_proxy(server.port) as proxy,
        client_streams.open_client(proxy.url, FRONTEND_TOKEN) as client,
    ):

        async def worker(number: int) -> None:
            buyers = [f"w{number}-{index}" for index in range(calls // workers)]
            for start in range(0, len(buyers), 50):
                await run_reserves(client, buyers[start : start + 50], replies, progress)

        async def cutter() -> None:
            # Each cut falls on a connection that is up: after `after` replies, and once the
            # client is back from the cut before (a cut during a handshake is another test).
            nonlocal cuts
            for after in cut_after:
                while len(replies) < after or client.reconnects < cuts:
                    await progress.changed()
                cuts += proxy.cut()

        with trio.fail_after(LOAD_GUARD_SECONDS):  # a guard against a lost call, not a measurement
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cutter)
                async with trio.open_nursery() as load:
                    for number in range(workers):
                        load.start_soon(worker, number)
                nursery.cancel_scope.cancel()
        holds = await held(server)
    assert cuts >= 1, f"seed={seed}"
    assert client.reconnects == cuts, f"seed={seed}"
    assert_one_hold_per_call(replies, calls, holds)


async def test_a_server_restarting_on_its_data_dir_finds_the_retried_reserves_held(
    client_streams: ClientStreams, tmp_path: Any
) -> None:
    calls = 500
    config = server_config(
        skus=(SkuSettings(SKU, stock=10 * calls, per_buyer_limit=2),), data_dir=str(tmp_path / "data")
    )
    replies: dict[str, Reply] = {}
    async with trio.open_nursery() as servers:
        first = BackgroundServer(config)
        server = await servers.start(first.run)
        with trio.fail_after(LOAD_GUARD_SECONDS):  # a guard against a lost call, not a measurement
            async with (
                open_tcp_proxy(server.port) as proxy,
                client_streams.open_client(proxy.url, FRONTEND_TOKEN) as client,
                trio.open_nursery() as nursery,
            ):
                assert (await client.ping()).status == "ok"
                proxy.drop_replies = True
                nursery.start_soon(run_reserves, client, [f"u{index}" for index in range(calls)], replies)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert await held(server) == calls
                # The connection drops and the server restarts; the next connection waits in the proxy.
                proxy.pause()
                proxy.cut()
                proxy.drop_replies = False
                await first.stop()
                second = BackgroundServer(config)
                restarted = await servers.start(second.run)
                proxy.resume(restarted.port)
        assert client.reconnects == 1
        assert_one_hold_per_call(replies, calls, await held(restarted))
        await second.stop()


async def test_a_send_that_fails_ends_the_watched_stream_at_once() -> None:
    """The bug: only a failed receive set `ended`, so a handshake whose upgrade request
    could not be sent waited out the whole connect timeout."""
    from protocol.client import _EndWatchingStream

    ours, theirs = trio.testing.memory_stream_pair()
    watched = _EndWatchingStream(ours)
    await theirs.aclose()
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await watched.send_all(b"GET /v1 HTTP/1.1\r\n\r\n")
    assert watched.ended.is_set()
