"""The gateway against peers that do not play along, over real loopback sockets.

Half-open connections (a connect and a hang-up, a connection that sends nothing, a plain
HTTP GET) free their descriptor at once or after `handshake_seconds_max`, and never more
than `handshakes_max` of them are held; a handshake during shutdown is answered 503;
two Authorization headers are refused with 400; a frame that breaks RFC 6455 is
answered with close code 1002; bytes in flight stay within the server's bound while
every connection keeps moving; /metrics listens on loopback unless asked, and beyond it
asks for an admin token.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing
from wire_helpers import (
    ADMIN_TOKEN,
    FRONTEND_TOKEN,
    OPCODE_BINARY,
    OPCODE_CONTINUATION,
    OPCODE_PING,
    ClientStreams,
    NonReadingPeer,
    RawPeer,
    bearer,
    descriptors_open_here,
    exchange,
    frame_bytes,
    http_get,
    listening_addresses,
    open_raw,
    pack,
    port_of,
    receive,
    reserve_map,
    send,
    server_config,
    serving_gated,
    wire_counts,
)

from engine.server.config import SkuSettings
from engine.server.runner import open_server
from protocol.limits import Limits

SKU = "MI-BAND-1"
# A guard against a hang, well below trio-websocket's own 60 s handshake timeout, so that
# a server that waits for it fails here.
GUARD_SECONDS = 20


@pytest.fixture(autouse=True)
def client_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientStreams]:
    streams = ClientStreams()
    streams.install(monkeypatch)
    yield streams
    streams.release()


async def wait_for_descriptors(count: int) -> None:
    """Until this process (the test and the server in it) has `count` descriptors open."""
    with trio.fail_after(GUARD_SECONDS):
        while descriptors_open_here() > count:
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)


# ------------------------------------------------------------ half-open connections


async def test_a_peer_that_connects_and_hangs_up_frees_its_descriptor_at_once() -> None:
    async with open_server(server_config()) as server:
        port = port_of(server.url)
        await trio.testing.wait_all_tasks_blocked()
        before = descriptors_open_here()
        for _ in range(50):
            peer = await RawPeer.connect(port)
            await peer.aclose()
        await wait_for_descriptors(before)
        async with open_raw(server.url) as websocket:
            assert await exchange(websocket, {"id": 1, "op": "ping"}) == {"id": 1, "status": "ok"}
        assert server.gateway.statistics().handshakes == 0


async def test_a_peer_that_sends_nothing_is_dropped_after_handshake_seconds_max() -> None:
    # With the default handshake_seconds_max (5 s), well within the guard.
    async with open_server(server_config()) as server:
        peer = await RawPeer.connect(port_of(server.url))
        with trio.fail_after(GUARD_SECONDS):
            await peer.wait_for_hang_up()
        await peer.aclose()
        assert server.gateway.statistics().sockets == 0
        assert server.metrics.connections_refused == 1


async def test_a_plain_http_get_is_answered_400_and_its_descriptor_freed_at_once() -> None:
    # What a load balancer's health check sends.
    async with open_server(server_config()) as server:
        await trio.testing.wait_all_tasks_blocked()
        before = descriptors_open_here()
        peer = await RawPeer.connect(port_of(server.url))
        await peer.stream.send_all(b"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _ = await peer.http_response()
        assert status == 400
        with trio.fail_after(GUARD_SECONDS):
            await peer.wait_for_hang_up()
        await peer.aclose()
        await wait_for_descriptors(before)


async def test_handshakes_beyond_handshakes_max_wait_in_the_listen_queue_and_a_client_gets_in_after_them() -> None:
    limits = Limits(handshakes_max=4, handshake_seconds_max=1)
    async with open_server(server_config(limits=limits)) as server:
        port = port_of(server.url)
        await trio.testing.wait_all_tasks_blocked()
        before = descriptors_open_here()
        idle = [await RawPeer.connect(port) for _ in range(12)]
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        # Twelve descriptors here, and four on the server's side: the rest are in the
        # kernel's queue, and cost the server nothing.
        assert descriptors_open_here() == before + 12 + 4
        assert server.gateway.statistics().handshakes == 4
        # Each group of four is dropped after its second; then the client's turn comes.
        with trio.fail_after(GUARD_SECONDS):
            async with open_raw(server.url) as websocket:
                assert await exchange(websocket, {"id": 1, "op": "ping"}) == {"id": 1, "status": "ok"}
        for peer in idle:
            await peer.aclose()


async def test_a_refused_peer_keeps_its_handshake_slot_until_it_hangs_up() -> None:
    # Refusals are handshakes that never finished: a crowd of them counts against handshakes_max.
    async with open_server(server_config(limits=Limits(handshakes_max=1))) as server:
        refused = await RawPeer.connect(port_of(server.url))
        assert await refused.upgrade(headers=bearer("not-a-token")) == 401
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert server.gateway.statistics().handshakes == 1
        waiting = await RawPeer.connect(port_of(server.url))  # in the listen queue meanwhile
        await refused.wait_for_hang_up()  # the server's FIN once its answer is out
        await refused.aclose()
        assert await waiting.upgrade(headers=bearer(FRONTEND_TOKEN)) == 101
        await waiting.aclose()


# ------------------------------------------------------------ shutdown


async def test_a_handshake_during_shutdown_is_answered_503_until_the_requests_in_flight_are_answered(
    client_streams: ClientStreams,
) -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=10),))
    async with serving_gated(config) as (url, gated, engine, gateway), open_raw(url) as websocket:
        await send(websocket, reserve_map(1, SKU, "u1"))
        await trio.testing.wait_all_tasks_blocked()
        assert gated.commands_handed == 1  # in flight, held at the gate
        gateway.shutdown()
        await trio.testing.wait_all_tasks_blocked()
        refused = await client_streams.refusal(url, bearer(FRONTEND_TOKEN))
        assert refused.status_code == 503
        assert refused.body == b"server shutting down\n"
        gated.gate.set()
        reply = await receive(websocket)
        assert (reply["id"], reply["status"]) == (1, "ok")
        assert (await engine.stock(SKU)).held == 1


# ------------------------------------------------------------ headers


@pytest.mark.parametrize(
    "tokens", [(FRONTEND_TOKEN, ADMIN_TOKEN), (ADMIN_TOKEN, FRONTEND_TOKEN), (ADMIN_TOKEN, ADMIN_TOKEN)]
)
async def test_two_authorization_headers_are_refused_with_400(
    client_streams: ClientStreams, tokens: tuple[str, str]
) -> None:
    async with open_server(server_config()) as server:
        refused = await client_streams.refusal(server.url, bearer(tokens[0]) + bearer(tokens[1]))
        assert refused.status_code == 400
        assert server.metrics.connections_total == 0


# ------------------------------------------------------------ websocket protocol errors

PING = pack({"id": 1, "op": "ping"})
BROKEN_FRAMES = {
    "an RSV1 bit without an extension": frame_bytes(OPCODE_BINARY, PING, rsv1=True),
    "an unmasked client frame": frame_bytes(OPCODE_BINARY, PING, masked=False),
    "a reserved data opcode": frame_bytes(0x3, PING),
    "a reserved control opcode": frame_bytes(0xB, b""),
    "a continuation with nothing to continue": frame_bytes(OPCODE_CONTINUATION, PING),
    "a fragmented control frame": frame_bytes(OPCODE_PING, b"x", fin=False),
    "a control frame over 125 bytes": frame_bytes(OPCODE_PING, b"x" * 126),
}


@pytest.mark.parametrize("frame", BROKEN_FRAMES.values(), ids=BROKEN_FRAMES.keys())
async def test_a_frame_that_breaks_the_websocket_rules_is_answered_with_close_1002(frame: bytes) -> None:
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=10),))) as server,
        open_raw(server.url) as bystander,
    ):
        peer = await RawPeer.connect(port_of(server.url))
        assert await peer.upgrade(headers=bearer(FRONTEND_TOKEN)) == 101
        await peer.stream.send_all(frame)
        with trio.fail_after(GUARD_SECONDS):
            assert await peer.close_code() == 1002
            await peer.wait_for_hang_up()
        await peer.aclose()
        assert (await exchange(bystander, reserve_map(1, SKU, "u1")))["status"] == "ok"
        assert await wire_counts(server.url, SKU) == (10, 9, 1, 0)


# ------------------------------------------------------------ bytes in flight


async def test_bytes_in_flight_stay_within_the_server_bound_and_every_connection_keeps_moving() -> None:
    # Eight peers that never read could pin 8 x 2 MiB; the server holds about 4 MiB for
    # them all, plus at most one frame per connection taken while it had none in flight.
    frame = 256 * 1024
    limits = Limits(inflight_bytes_max=2 * 1024 * 1024, server_inflight_bytes_max=4 * 1024 * 1024)
    async with open_server(server_config(skus=(SkuSettings(SKU, stock=10),), limits=limits)) as server:
        port = port_of(server.url)
        hogs = [NonReadingPeer(port, frame_bytes=frame) for _ in range(8)]
        try:
            async with trio.open_nursery() as nursery:
                for hog in hogs:
                    nursery.start_soon(hog.run)
                # Until nothing moves: every hog's sends wait on a window the server keeps shut.
                await trio.testing.wait_all_tasks_blocked(cushion=0.3)
                statistics = server.gateway.statistics()
                assert statistics.inflight_bytes <= limits.server_inflight_bytes_max + len(hogs) * frame
                assert statistics.inflight_bytes_waiting >= 1  # readers wait for the server's room
                # They took what the bound allows, and want more.
                assert statistics.inflight_bytes >= limits.server_inflight_bytes_max - frame
                # A connection that reads is still answered, one frame at a time.
                async with open_raw(server.url) as websocket:
                    assert (await exchange(websocket, reserve_map(1, SKU, "u1")))["status"] == "ok"
                nursery.cancel_scope.cancel()
        finally:
            for hog in hogs:
                await hog.aclose()
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        statistics = server.gateway.statistics()
        assert (statistics.connections, statistics.inflight_bytes, statistics.inflight_bytes_waiting) == (0, 0, 0)


# ------------------------------------------------------------ /metrics


async def test_metrics_listen_on_loopback_even_when_the_websocket_listens_everywhere() -> None:
    config = server_config(host="0.0.0.0", metrics_port=0)
    async with open_server(config) as server:
        assert server.metrics_port is not None
        assert listening_addresses(server.metrics_port) == {"127.0.0.1"}
        assert listening_addresses(port_of(server.url)) == {"0.0.0.0"}
        status, body = await http_get(server.metrics_port, "/metrics")
        assert status == 200
        assert b"soldout_sku_held_units" in body


async def test_metrics_beyond_loopback_ask_for_an_admin_token() -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=3),), metrics_port=0, metrics_host="0.0.0.0")
    async with open_server(config) as server:
        port = server.metrics_port
        assert port is not None
        assert listening_addresses(port) == {"0.0.0.0"}
        for headers in ([], bearer("wrong"), bearer(FRONTEND_TOKEN), [(b"Authorization", ADMIN_TOKEN.encode())]):
            status, body = await http_get(port, "/metrics", headers)
            assert status == 401, headers
            assert b"soldout_" not in body
        status, _ = await http_get(port, "/metrics", bearer(FRONTEND_TOKEN) + bearer(ADMIN_TOKEN))
        assert status == 400
        status, body = await http_get(port, "/metrics", bearer(ADMIN_TOKEN))
        assert status == 200
        assert b"soldout_sku_stock_units" in body


async def test_metrics_answer_only_their_path_and_only_get_and_head() -> None:
    async with open_server(server_config(metrics_port=0)) as server:
        port = server.metrics_port
        assert port is not None
        assert (await http_get(port, "/healthz"))[0] == 200
        assert (await http_get(port, "/nothing"))[0] == 404
        assert (await http_get(port, "/"))[0] == 404
        assert (await http_get(port, "/metrics", method="POST"))[0] == 405
        assert await http_get(port, "/metrics", method="HEAD") == (200, b"")
        status, body = await http_get(port, "/metrics?name=soldout_requests")
        assert status == 200
        assert b"soldout_requests" in body
        # Not HTTP at all: a 400, and the endpoint goes on.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"\x00\x01 nonsense\r\n\r\n")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 400")
        assert (await http_get(port, "/metrics"))[0] == 200
