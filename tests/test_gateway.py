"""The gateway end to end over real loopback sockets: raw msgpack frames in and out.

Every op and status, the handshake (tokens, roles, path), batch frames, pipelining,
every bound of `[limits]`, hostile input (after which the server still serves other
connections and no state has changed), a flash crowd, and the metrics endpoint.
Hold expiry and sale windows follow a wall clock the test sets; no test measures time.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected, WebSocketConnection
from wire_helpers import (
    ADMIN_TOKEN,
    FRONTEND_TOKEN,
    ClientStreams,
    SettableWallClock,
    bearer,
    close_code_after,
    exchange,
    exchange_bytes,
    fetch_text,
    open_raw,
    pack,
    receive,
    reserve_map,
    send,
    server_config,
    serving_gated,
    wire_counts,
)

from engine.api import Engine, open_engine
from engine.server.config import ConfigError, SkuSettings
from engine.server.gateway import ADMIN, Connection, Gateway
from engine.server.runner import RunningServer, open_server, put_configured_skus
from protocol.limits import OUTBOX_FRAMES_MAX, Limits

SKU = "MI-BAND-1"


@pytest.fixture(autouse=True)
def client_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientStreams]:
    streams = ClientStreams()
    streams.install(monkeypatch)
    yield streams
    streams.release()


async def engine_counts(engine: Engine, sku: str = SKU) -> tuple[int, int, int, int]:
    reply = await engine.stock(sku)
    assert reply.status == "ok", reply
    return reply.stock, reply.available, reply.held, reply.sold


async def assert_still_open_server(
    server: RunningServer, bystander: WebSocketConnection, expected: tuple[int, int, int, int], sku: str = SKU
) -> None:
    """A connection opened before the trouble, and a new one, are served; the counts are as before."""
    assert await exchange(bystander, {"id": 7, "op": "ping"}) == {"id": 7, "status": "ok"}
    reply = await exchange(bystander, {"id": 8, "op": "stock", "sku": sku})
    assert (reply["stock"], reply["available"], reply["held"], reply["sold"]) == expected
    assert await wire_counts(server.url, sku) == expected
    assert await engine_counts(server.engine, sku) == expected


# ------------------------------------------------------------ every op and status


async def test_every_frontend_op_and_status_over_the_wire() -> None:
    clock = SettableWallClock()
    now = clock()
    skus = (
        SkuSettings(SKU, stock=2, per_buyer_limit=1, hold_seconds=60),
        SkuSettings("LATER", stock=5, opens_at=now + 3600),
        SkuSettings("OVER", stock=5, closes_at=now - 1),
        SkuSettings("VIP", stock=5, registration_required=True),
    )
    async with open_server(server_config(skus=skus, wall_clock=clock)) as server, open_raw(server.url) as websocket:
        assert await exchange(websocket, {"id": 1, "op": "ping"}) == {"id": 1, "status": "ok"}

        first = await exchange(websocket, reserve_map(2, SKU, "u1", key="k-u1"))
        assert set(first) == {"id", "status", "reservation", "expires_at", "remaining"}
        assert first["id"] == 2
        assert first["status"] == "ok"
        assert isinstance(first["reservation"], str)
        assert first["expires_at"] == now + 60
        assert isinstance(first["expires_at"], float)
        assert first["remaining"] == 1

        # The same key gives back the same hold, and takes no second unit.
        again = await exchange(websocket, reserve_map(3, SKU, "u1", key="k-u1"))
        assert again == {**first, "id": 3}
        assert (await exchange(websocket, reserve_map(4, SKU, "u1")))["status"] == "limit_exceeded"
        second = await exchange(websocket, reserve_map(5, SKU, "u2"))
        assert (second["status"], second["remaining"]) == ("ok", 0)
        assert await exchange(websocket, reserve_map(6, SKU, "u3")) == {"id": 6, "status": "sold_out"}
        assert await exchange(websocket, reserve_map(7, "LATER", "u1")) == {"id": 7, "status": "not_open"}
        assert await exchange(websocket, reserve_map(8, "OVER", "u1")) == {"id": 8, "status": "closed"}
        assert await exchange(websocket, reserve_map(9, "NOPE", "u1")) == {"id": 9, "status": "unknown_sku"}
        assert await exchange(websocket, reserve_map(10, "VIP", "u1")) == {"id": 10, "status": "not_registered"}
        invalid = await exchange(websocket, reserve_map(11, SKU, "u4", qty=0))
        assert (invalid["id"], invalid["status"]) == (11, "invalid")
        assert "qty" in invalid["error"]

        assert await exchange(websocket, {"id": 12, "op": "stock", "sku": SKU}) == {
            "id": 12,
            "status": "ok",
            "stock": 2,
            "available": 0,
            "held": 2,
            "sold": 0,
        }
        assert await exchange(websocket, {"id": 13, "op": "stock", "sku": "NOPE"}) == {
            "id": 13,
            "status": "unknown_sku",
        }
        assert (await exchange(websocket, {"id": 14, "op": "stock", "sku": 5}))["status"] == "invalid"

        reservation = first["reservation"]
        confirm = {"id": 15, "op": "confirm", "reservation": reservation, "buyer": "u1"}
        assert await exchange(websocket, confirm) == {"id": 15, "status": "ok"}
        cancel = {"id": 16, "op": "cancel", "reservation": reservation, "buyer": "u1"}
        assert await exchange(websocket, cancel) == {"id": 16, "status": "conflict"}
        assert await exchange(websocket, {**confirm, "id": 17}) == {"id": 17, "status": "ok"}
        wrong_buyer = {"id": 18, "op": "confirm", "reservation": reservation, "buyer": "u2"}
        assert await exchange(websocket, wrong_buyer) == {"id": 18, "status": "not_found"}
        unknown = {"id": 19, "op": "cancel", "reservation": "3-999999", "buyer": "u1"}
        assert await exchange(websocket, unknown) == {"id": 19, "status": "not_found"}
        cancel_second = {"id": 20, "op": "cancel", "reservation": second["reservation"], "buyer": "u2"}
        assert await exchange(websocket, cancel_second) == {"id": 20, "status": "ok"}
        assert await engine_counts(server.engine) == (2, 1, 0, 1)

        third = await exchange(websocket, reserve_map(21, SKU, "u5"))
        assert third["status"] == "ok"
        clock.advance(61)
        late = {"id": 22, "op": "confirm", "reservation": third["reservation"], "buyer": "u5"}
        assert await exchange(websocket, late) == {"id": 22, "status": "expired"}
        assert await engine_counts(server.engine) == (2, 1, 0, 1)


async def test_admin_ops_answer_status_only_and_stats_answers_figures() -> None:
    async with (
        open_server(server_config(skus=(SkuSettings("VIP", stock=3, registration_required=True),))) as server,
        open_raw(server.url, ADMIN_TOKEN) as websocket,
    ):
        put = {
            "id": 1,
            "op": "put_sku",
            "sku": "NEW",
            "stock": 7,
            "per_buyer_limit": 2,
            "hold_seconds": 30,
            "opens_at": None,
            "closes_at": None,
            "registration_required": False,
        }
        assert await exchange(websocket, put) == {"id": 1, "status": "ok"}
        assert await engine_counts(server.engine, "NEW") == (7, 7, 0, 0)
        # Optional fields of put_sku may be left out.
        assert await exchange(websocket, {"id": 2, "op": "put_sku", "sku": "NEW", "stock": 9}) == {
            "id": 2,
            "status": "ok",
        }
        assert await engine_counts(server.engine, "NEW") == (9, 9, 0, 0)
        bad_stock = await exchange(websocket, {"id": 3, "op": "put_sku", "sku": "NEW", "stock": -1})
        assert (bad_stock["status"], "stock" in bad_stock["error"]) == ("invalid", True)

        register = {"id": 4, "op": "register", "sku": "VIP", "buyers": ["u1", "u2"]}
        assert await exchange(websocket, register) == {"id": 4, "status": "ok", "registered": 2, "already": 0}
        assert (await exchange(websocket, reserve_map(5, "VIP", "u1")))["status"] == "ok"
        assert (await exchange(websocket, reserve_map(6, "VIP", "u3")))["status"] == "not_registered"
        unknown = {"id": 7, "op": "register", "sku": "NOPE", "buyers": ["u1"]}
        assert await exchange(websocket, unknown) == {"id": 7, "status": "unknown_sku"}

        stats = await exchange(websocket, {"id": 8, "op": "stats"})
        assert set(stats) == {"id", "status", "stats"}
        assert (stats["id"], stats["status"]) == (8, "ok")
        figures = stats["stats"]
        assert figures["requests"]["reserve"] == {"ok": 1, "not_registered": 1}
        assert figures["requests"]["put_sku"] == {"ok": 2, "invalid": 1}
        assert figures["skus"]["VIP"] == {"stock": 3, "available": 2, "held": 1, "sold": 0}
        assert figures["connections_open"] == 1
        assert figures["frames_received"] == 8


async def test_the_examples_of_the_spec_byte_for_byte() -> None:
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=10),))) as server,
        open_raw(server.url) as websocket,
    ):
        await websocket.send_message(bytes.fromhex("82 a2 69 64 01 a2 6f 70 a4 70 69 6e 67"))
        assert await websocket.get_message() == bytes.fromhex("82 a2 69 64 01 a6 73 74 61 74 75 73 a2 6f 6b")

        unreadable = await exchange_bytes(websocket, b"\xc1")
        assert (unreadable["id"], unreadable["status"]) == (None, "invalid")

        replies = await exchange(
            websocket,
            [
                {"id": 9, "op": "ping"},
                {"op": "ping"},
                {"id": 11, "op": "reserve", "sku": SKU, "buyer": "u-1004", "qty": 1, "colour": "red"},
            ],
        )
        assert [(reply["id"], reply["status"]) for reply in replies] == [(9, "ok"), (None, "invalid"), (11, "invalid")]
        assert "id" in replies[1]["error"]
        assert "colour" in replies[2]["error"]

        # A key that repeats within a map: its last value is the one used.
        entries = ["id", 12, "op", "reserve", "sku", SKU, "buyer", "u1", "qty", 0, "qty", 1]
        repeated = b"\x86" + b"".join(pack(part) for part in entries)  # six entries, qty twice
        reply = await exchange_bytes(websocket, repeated)
        assert (reply["id"], reply["status"]) == (12, "ok"), reply
        assert await engine_counts(server.engine) == (10, 9, 1, 0)


# ------------------------------------------------------------ the handshake


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="no-token"),
        pytest.param([(b"Authorization", b"Bearer not-a-token")], id="unknown-token"),
        pytest.param([(b"Authorization", b"Bearer")], id="empty-token"),
        pytest.param([(b"Authorization", FRONTEND_TOKEN.encode())], id="no-scheme"),
        pytest.param([(b"Authorization", f"Basic {FRONTEND_TOKEN}".encode())], id="basic-scheme"),
        pytest.param([(b"Authorization", f"Bearer {FRONTEND_TOKEN}x".encode())], id="token-prefix"),
    ],
)
async def test_a_missing_or_unknown_token_is_refused_with_401(
    client_streams: ClientStreams, headers: list[tuple[bytes, bytes]]
) -> None:
    async with open_server(server_config(skus=(SkuSettings(SKU, stock=5),))) as server:
        refused = await client_streams.refusal(server.url, headers)
        assert refused.status_code == 401
        assert (b"www-authenticate", b'Bearer realm="soldout"') in refused.headers
        assert server.metrics.connections_refused == 1
        assert server.metrics.connections_total == 0


@pytest.mark.parametrize("path", ["/", "/v2", "/v1/", "/V1", "/v1/reserve"])
async def test_a_wrong_path_is_refused(client_streams: ClientStreams, path: str) -> None:
    async with open_server(server_config()) as server:
        base = server.url.removesuffix("/v1")
        refused = await client_streams.refusal(base + path, bearer(ADMIN_TOKEN))
        assert refused.status_code == 404


async def test_the_server_closes_a_connection_it_refused(client_streams: ClientStreams) -> None:
    # A peer that keeps its socket open after a refusal must not hold a server task and
    # socket for as long as it likes: refused connections count against no bound.
    async with open_server(server_config()) as server:
        with pytest.raises(ConnectionRejected):
            async with open_raw(server.url, "not-a-token"):
                pass
        (stream,) = client_streams.opened
        closed_by_server = trio.Event()

        async def read_to_the_end() -> None:
            while await stream.receive_some(4096):
                pass
            closed_by_server.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_to_the_end)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            nursery.cancel_scope.cancel()
        await stream.aclose()
        assert closed_by_server.is_set(), "the server still holds the refused connection open"


async def test_a_query_string_after_v1_is_accepted() -> None:
    async with open_server(server_config()) as server, open_raw(server.url + "?client=frontend-7") as websocket:
        assert await exchange(websocket, {"id": 1, "op": "ping"}) == {"id": 1, "status": "ok"}


# ------------------------------------------------------------ roles


async def test_admin_ops_on_a_frontend_token_are_forbidden_and_change_nothing() -> None:
    skus = (SkuSettings(SKU, stock=5), SkuSettings("VIP", stock=5, registration_required=True))
    async with open_server(server_config(skus=skus)) as server, open_raw(server.url, FRONTEND_TOKEN) as websocket:
        forbidden = [
            {"id": 1, "op": "put_sku", "sku": SKU, "stock": 500},
            {"id": 2, "op": "put_sku", "sku": "SNEAKY", "stock": 500},
            {"id": 3, "op": "register", "sku": "VIP", "buyers": ["u1"]},
            {"id": 4, "op": "stats"},
        ]
        for request in forbidden:
            reply = await exchange(websocket, request)
            assert (reply["id"], reply["status"]) == (request["id"], "forbidden"), reply
            assert request["op"] in reply["error"]
        # The same ops in a batch are forbidden one by one; the frontend ops beside them run.
        replies = await exchange(websocket, [*forbidden, reserve_map(5, SKU, "u9")])
        assert [reply["status"] for reply in replies] == ["forbidden"] * 4 + ["ok"]

        assert await engine_counts(server.engine) == (5, 4, 1, 0)
        assert (await server.engine.stock("SNEAKY")).status == "unknown_sku"
        assert (await exchange(websocket, reserve_map(6, "VIP", "u1")))["status"] == "not_registered"


async def test_an_admin_token_can_run_every_op() -> None:
    async with open_server(server_config()) as server, open_raw(server.url, ADMIN_TOKEN) as websocket:
        put = {"id": 1, "op": "put_sku", "sku": SKU, "stock": 3, "registration_required": True}
        assert (await exchange(websocket, put))["status"] == "ok"
        register = {"id": 2, "op": "register", "sku": SKU, "buyers": ["u1"]}
        assert (await exchange(websocket, register))["status"] == "ok"
        hold = await exchange(websocket, reserve_map(3, SKU, "u1"))
        assert hold["status"] == "ok"
        confirm = {"id": 4, "op": "confirm", "reservation": hold["reservation"], "buyer": "u1"}
        assert (await exchange(websocket, confirm))["status"] == "ok"
        assert (await exchange(websocket, {"id": 5, "op": "stock", "sku": SKU}))["sold"] == 1
        assert (await exchange(websocket, {"id": 6, "op": "stats"}))["status"] == "ok"
        assert (await exchange(websocket, {"id": 7, "op": "ping"}))["status"] == "ok"


@pytest.mark.parametrize("token", [None, "anything-at-all"])
async def test_with_no_tokens_every_connection_has_both_roles(token: str | None) -> None:
    async with open_server(server_config(tokens=False)) as server, open_raw(server.url, token) as websocket:
        put = {"id": 1, "op": "put_sku", "sku": SKU, "stock": 3}
        assert await exchange(websocket, put) == {"id": 1, "status": "ok"}
        assert (await exchange(websocket, reserve_map(2, SKU, "u1")))["status"] == "ok"
        assert (await exchange(websocket, {"id": 3, "op": "stats"}))["status"] == "ok"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
async def test_no_tokens_and_a_non_loopback_host_is_refused_at_start(host: str) -> None:
    with pytest.raises(ConfigError, match="host"):
        async with open_server(server_config(tokens=False, host=host)):
            pass


# ------------------------------------------------------------ batches and pipelining


async def test_a_batch_frame_is_answered_by_one_array_in_request_order() -> None:
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=2), SkuSettings("OTHER", stock=1)))) as server,
        open_raw(server.url) as websocket,
    ):
        batch = [
            {"id": 40, "op": "ping"},
            reserve_map(10, SKU, "u1"),
            reserve_map(30, "OTHER", "u1"),
            {"id": 20, "op": "stock", "sku": SKU},
            {"id": 5, "op": "reserve", "sku": SKU},
            {"id": 6, "op": "stats"},
            reserve_map(10, "OTHER", "u2"),
            {"op": "ping"},
            reserve_map(-3, SKU, "u2"),
        ]
        replies = await exchange(websocket, batch)
        assert isinstance(replies, list)
        assert [reply["id"] for reply in replies] == [40, 10, 30, 20, 5, 6, 10, None, -3]
        assert [reply["status"] for reply in replies] == [
            "ok",
            "ok",
            "ok",
            "ok",
            "invalid",
            "forbidden",
            "sold_out",
            "invalid",
            "ok",
        ]
        # Requests of one frame keep their order: the stock saw the first reserve, not the last.
        assert replies[3]["held"] == 1
        assert replies[1]["remaining"] == 1
        assert replies[8]["remaining"] == 0
        # A batch of one is still a batch: an array comes back.
        assert await exchange(websocket, [{"id": 1, "op": "ping"}]) == [{"id": 1, "status": "ok"}]


async def test_many_frames_in_flight_are_each_answered_once_matched_by_id() -> None:
    skus = [SkuSettings(f"SKU-{index}", stock=1000, per_buyer_limit=1000) for index in range(8)]
    frames = 400
    async with open_server(server_config(skus=skus, shards=4)) as server, open_raw(server.url) as websocket:
        expected: dict[int, tuple[str, str]] = {}
        for request_id in range(1, frames + 1):
            sku = f"SKU-{request_id % 8}"
            if request_id % 3 == 0:
                request = {"id": request_id, "op": "stock", "sku": sku}
            else:
                request = reserve_map(request_id, sku, f"u{request_id}")
            expected[request_id] = (request["op"], sku)
            await send(websocket, request)
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(frames):
            reply = await receive(websocket)
            assert reply["id"] not in seen, f"id {reply['id']} answered twice"
            seen[reply["id"]] = reply
        assert set(seen) == set(expected)
        for request_id, reply in seen.items():
            op, _ = expected[request_id]
            assert reply["status"] == "ok", reply
            assert ("reservation" in reply) == (op == "reserve")
            assert ("stock" in reply) == (op == "stock")
        reserves = sum(1 for op, _ in expected.values() if op == "reserve")
        assert server.engine.statistics().holds == reserves
        reservations = [reply["reservation"] for reply in seen.values() if "reservation" in reply]
        assert len(set(reservations)) == reserves


# ------------------------------------------------------------ bounds


async def test_a_frame_at_the_size_limit_is_answered_and_one_byte_more_closes_with_1009() -> None:
    limit = 4096
    config = server_config(skus=(SkuSettings(SKU, stock=5),), limits=Limits(frame_bytes_max=limit))
    async with open_server(config) as server, open_raw(server.url) as bystander:
        before = await engine_counts(server.engine)

        def reserve_of_size(size: int) -> bytes:
            base = reserve_map(1, SKU, "u1", key="k" * 1000)  # a key this long has a 3-byte header
            payload = pack({**base, "key": "k" * (1000 + size - len(pack(base)))})
            assert len(payload) == size
            return payload

        async with open_raw(server.url) as websocket:
            reply = await exchange_bytes(websocket, reserve_of_size(limit))
            assert (reply["status"], "key" in reply["error"]) == ("invalid", True)
            assert await close_code_after(websocket, reserve_of_size(limit + 1)) == 1009
        await assert_still_open_server(server, bystander, before)


async def test_a_frame_over_the_default_limit_closes_with_1009() -> None:
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=5),))) as server,
        open_raw(server.url) as bystander,
        open_raw(server.url) as websocket,
    ):
        before = await engine_counts(server.engine)
        payload = pack(reserve_map(1, SKU, "u" * (Limits().frame_bytes_max + 1)))
        assert await close_code_after(websocket, payload) == 1009
        await assert_still_open_server(server, bystander, before)


async def test_a_batch_over_the_bound_gets_one_invalid_reply_and_the_connection_stays_open() -> None:
    bound = 10
    config = server_config(skus=(SkuSettings(SKU, stock=100),), limits=Limits(batch_requests_max=bound))
    async with open_server(config) as server, open_raw(server.url) as websocket:
        replies = await exchange(websocket, [reserve_map(index, SKU, f"u{index}") for index in range(bound)])
        assert [reply["status"] for reply in replies] == ["ok"] * bound

        too_long = [reserve_map(index, SKU, f"v{index}") for index in range(bound + 1)]
        reply = await exchange(websocket, too_long)
        assert set(reply) == {"id", "status", "error"}
        assert (reply["id"], reply["status"]) == (None, "invalid")
        assert str(bound) in reply["error"]
        # An array header that claims far more than it holds is refused the same way.
        lying = b"\xdd" + (2**31).to_bytes(4, "big") + pack({"id": 1, "op": "ping"})
        assert (await exchange_bytes(websocket, lying))["id"] is None

        assert await exchange(websocket, {"id": 99, "op": "ping"}) == {"id": 99, "status": "ok"}
        assert await engine_counts(server.engine) == (100, 100 - bound, bound, 0)


async def test_over_the_inflight_bound_requests_are_answered_busy_and_change_nothing() -> None:
    config = server_config(
        skus=(SkuSettings(SKU, stock=100),), limits=Limits(inflight_requests_max=10, batch_requests_max=10)
    )
    async with serving_gated(config) as (url, gated, engine, _), open_raw(url) as websocket:
        await send(websocket, [reserve_map(index, SKU, f"a{index}") for index in range(6)])
        await send(websocket, [reserve_map(10 + index, SKU, f"b{index}") for index in range(4)])
        # Ten requests wait at the gate: the connection is at its bound.
        await send(websocket, reserve_map(20, SKU, "c0"))
        await send(websocket, [reserve_map(30 + index, SKU, f"d{index}") for index in range(3)])
        await send(websocket, {"id": 40, "op": "ping"})

        single = await receive(websocket)
        assert (single["id"], single["status"]) == (20, "busy")
        assert "in flight" in single["error"]
        batch = await receive(websocket)
        assert [(reply["id"], reply["status"]) for reply in batch] == [(30, "busy"), (31, "busy"), (32, "busy")]
        assert await receive(websocket) == {"id": 40, "status": "busy", "error": single["error"]}
        assert gated.commands_handed == 10
        assert await engine_counts(engine) == (100, 100, 0, 0)

        gated.gate.set()
        answered = [await receive(websocket), await receive(websocket)]
        statuses = sorted(reply["status"] for frame in answered for reply in frame)
        assert statuses == ["ok"] * 10
        assert await engine_counts(engine) == (100, 90, 10, 0)
        # The busy ones left no trace: c0 and d0 now get their first hold.
        assert (await exchange(websocket, reserve_map(50, SKU, "c0", key="c0")))["status"] == "ok"
        assert [reply["status"] for reply in await exchange(websocket, [reserve_map(51, SKU, "d0")])] == ["ok"]
        assert await engine_counts(engine) == (100, 88, 12, 0)


class NeverReadingPeer:
    """A websocket whose peer sends `frames` and never reads a reply.

    Each frame arrives once the server has done all it can with the ones before, as
    frames from a peer on a network do.
    """

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.replies_taken = 0
        self.all_sent = trio.Event()

    async def get_message(self) -> bytes:
        await trio.testing.wait_all_tasks_blocked()
        if not self.frames:
            self.all_sent.set()
            await trio.sleep_forever()
        return self.frames.pop(0)

    async def send_message(self, payload: bytes) -> None:
        self.replies_taken += 1
        await trio.sleep_forever()  # the peer's receive window stays shut

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_peer_that_never_reads_gets_a_bounded_number_of_requests_decided() -> None:
    # "Over the in-flight bound: busy replies, no queue growth." A peer that sends and
    # never reads must not get more decided than the bound and the outbox can hold;
    # the rest wait unread (or are answered busy), and memory stays flat.
    frame_requests = 10
    frames = 300
    limits = Limits(inflight_requests_max=frame_requests, batch_requests_max=frame_requests)
    config = server_config(skus=(SkuSettings(SKU, stock=frames * frame_requests),), limits=limits)
    payloads = [
        pack([reserve_map(index, SKU, f"u{frame}-{index}") for index in range(frame_requests)])
        for frame in range(frames)
    ]
    async with open_engine(config.engine) as engine:
        await put_configured_skus(engine, config)
        gateway = Gateway(engine, config)
        peer = NeverReadingPeer(payloads)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(gateway, peer, ADMIN).run)  # type: ignore[arg-type]
            # Until nothing moves: either every frame was read, or the reader stopped
            # reading (backpressure) because the outbox is full. The peer's own wait
            # has no cushion, so it goes first whenever the reader asks for a frame.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            nursery.cancel_scope.cancel()
        held = (await engine.stock(SKU)).held
    bound = limits.inflight_requests_max + (OUTBOX_FRAMES_MAX + 1) * frame_requests
    assert peer.replies_taken == 1
    assert held <= bound, f"{held} requests decided for a peer that read nothing (bound {bound})"


async def test_names_over_string_bytes_max_are_invalid_and_exactly_at_it_are_not() -> None:
    limit = Limits().string_bytes_max
    long_ascii = "x" * (limit + 1)
    long_utf8 = "é" * (limit // 2 + 1)  # fewer characters than the limit, more bytes
    exact_utf8 = "é" * (limit // 2)
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=50, per_buyer_limit=50),))) as server,
        open_raw(server.url, ADMIN_TOKEN) as websocket,
    ):
        hold = await exchange(websocket, reserve_map(1, SKU, "u1"))
        before = await engine_counts(server.engine)
        for long_name in (long_ascii, long_utf8):
            requests = [
                reserve_map(2, long_name, "u1"),
                reserve_map(3, SKU, long_name),
                reserve_map(4, SKU, "u1", key=long_name),
                {"id": 5, "op": "confirm", "reservation": long_name, "buyer": "u1"},
                {"id": 6, "op": "confirm", "reservation": hold["reservation"], "buyer": long_name},
                {"id": 7, "op": "cancel", "reservation": long_name, "buyer": "u1"},
                {"id": 8, "op": "cancel", "reservation": hold["reservation"], "buyer": long_name},
                {"id": 9, "op": "stock", "sku": long_name},
                {"id": 10, "op": "put_sku", "sku": long_name, "stock": 5},
                {"id": 11, "op": "register", "sku": long_name, "buyers": ["u1"]},
                {"id": 12, "op": "register", "sku": SKU, "buyers": ["u2", long_name]},
            ]
            for request in requests:
                reply = await exchange(websocket, request)
                assert (reply["id"], reply["status"]) == (request["id"], "invalid"), (request["op"], reply)
                assert str(limit) in reply["error"]
        assert await engine_counts(server.engine) == before
        # At the limit, in bytes, a name is fine.
        assert (await exchange(websocket, reserve_map(20, SKU, exact_utf8, key=exact_utf8)))["status"] == "ok"
        assert (await exchange(websocket, reserve_map(21, "s" * limit, "u1")))["status"] == "unknown_sku"
        assert (await exchange(websocket, {"id": 22, "op": "put_sku", "sku": "s" * limit, "stock": 1}))[
            "status"
        ] == "ok"


async def test_connections_over_the_bound_are_refused_with_503(client_streams: ClientStreams) -> None:
    config = server_config(limits=Limits(connections_max=2))
    async with open_server(config) as server:
        async with open_raw(server.url) as first, open_raw(server.url) as second:
            refused = await client_streams.refusal(server.url, bearer(FRONTEND_TOKEN))
            assert refused.status_code == 503
            assert await exchange(first, {"id": 1, "op": "ping"}) == {"id": 1, "status": "ok"}
            assert await exchange(second, {"id": 2, "op": "ping"}) == {"id": 2, "status": "ok"}
        # Once they are gone, their places are free again.
        await trio.testing.wait_all_tasks_blocked()
        async with open_raw(server.url) as first, open_raw(server.url) as second:
            assert await exchange(first, {"id": 3, "op": "ping"}) == {"id": 3, "status": "ok"}
            assert await exchange(second, {"id": 4, "op": "ping"}) == {"id": 4, "status": "ok"}


# ------------------------------------------------------------ garbage


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_bytes_are_answered_invalid_and_change_nothing(seed: int) -> None:
    generator = random.Random(seed)
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=10),))) as server,
        open_raw(server.url) as bystander,
        open_raw(server.url, ADMIN_TOKEN) as websocket,
    ):
        assert (await exchange(bystander, reserve_map(1, SKU, "u1")))["status"] == "ok"
        before = await engine_counts(server.engine)
        for number in range(300):
            payload = generator.randbytes(generator.choice([0, 1, 2, 3, 5, 8, 40, 300, 3000]))
            if number % 4 == 0:  # make some look like a map or an array of maps at first glance
                payload = generator.choice([b"\x81", b"\x82", b"\x91\x82", b"\xde\x00\x03", b"\x93"]) + payload
            reply = await exchange_bytes(websocket, payload)
            replies = reply if isinstance(reply, list) else [reply]
            for one in replies:
                assert one["status"] == "invalid", f"seed={seed} payload={payload.hex()}: {one}"
                assert isinstance(one["error"], str), f"seed={seed}"
        await assert_still_open_server(server, bystander, before)


WRONG_NAMES: list[Any] = [None, True, 0, 7, -1, 1.5, b"bytes", [], ["a"], {}, {"a": 1}, ""]
WRONG_QUANTITIES: list[Any] = [None, True, False, 0, -1, 1001, 2**64 - 1, 1.0, 1.5, "1", b"1", [1], {}]
WRONG_TIMES: list[Any] = [True, -1, -0.5, "1700000000", b"1", [1], {}, float("nan"), float("inf")]


def wrong_type_requests(reservation: str) -> list[tuple[str, dict[str, Any]]]:
    """(what is wrong, request) for a wrong value in every field of every op."""
    cases: list[tuple[str, dict[str, Any]]] = []
    reserve = reserve_map(1, SKU, "u1", key="key-1")
    for name in ("sku", "buyer"):
        cases += [(f"reserve.{name}={value!r}", {**reserve, name: value}) for value in WRONG_NAMES]
    cases += [(f"reserve.key={value!r}", {**reserve, "key": value}) for value in WRONG_NAMES if value is not None]
    cases += [(f"reserve.qty={value!r}", {**reserve, "qty": value}) for value in WRONG_QUANTITIES]
    for op in ("confirm", "cancel"):
        request = {"id": 2, "op": op, "reservation": reservation, "buyer": "u1"}
        for name in ("reservation", "buyer"):
            cases += [(f"{op}.{name}={value!r}", {**request, name: value}) for value in WRONG_NAMES]
    cases += [(f"stock.sku={value!r}", {"id": 3, "op": "stock", "sku": value}) for value in WRONG_NAMES]
    put = {"id": 4, "op": "put_sku", "sku": SKU, "stock": 99, "per_buyer_limit": 5, "hold_seconds": 10}
    cases += [(f"put_sku.sku={value!r}", {**put, "sku": value}) for value in WRONG_NAMES]
    cases += [
        (f"put_sku.stock={value!r}", {**put, "stock": value})
        for value in [None, True, -1, 1.5, "99", [99], 1_000_000_001, 2**64 - 1]
    ]
    cases += [
        (f"put_sku.per_buyer_limit={value!r}", {**put, "per_buyer_limit": value})
        for value in [None, True, 0, -1, 1.5, "5", [5]]
    ]
    cases += [
        (f"put_sku.hold_seconds={value!r}", {**put, "hold_seconds": value})
        for value in [None, 0, 366 * 86400 + 1, *WRONG_TIMES]
    ]
    for name in ("opens_at", "closes_at"):
        cases += [(f"put_sku.{name}={value!r}", {**put, name: value}) for value in WRONG_TIMES]
    cases.append(("put_sku closes before it opens", {**put, "opens_at": 2_000_000_000, "closes_at": 1_000}))
    cases += [
        (f"put_sku.registration_required={value!r}", {**put, "registration_required": value})
        for value in [None, 0, 1, "true", [True]]
    ]
    register = {"id": 5, "op": "register", "sku": SKU, "buyers": ["u8"]}
    cases += [(f"register.sku={value!r}", {**register, "sku": value}) for value in WRONG_NAMES]
    cases += [
        (f"register.buyers={value!r:.40}", {**register, "buyers": value})
        for value in [None, "u8", 8, b"u8", {"u8": 1}, [8], ["u8", None], [""], ["u8"] * 10_001]
    ]
    return cases


def wrong_shape_requests() -> list[tuple[str, dict[Any, Any], bool]]:
    """(what is wrong, request, whether its id comes back) for requests of a wrong shape."""
    cases: list[tuple[str, dict[Any, Any], bool]] = []
    for value in [None, True, 1.5, "1", b"1", [1], {}, 2**63, 2**64 - 1]:
        cases.append((f"id={value!r}", {"id": value, "op": "ping"}, False))
    cases.append(("no id", {"op": "ping"}, False))
    for value in [None, 5, True, b"ping", "PING", "reserve ", "drop_table", ["ping"], {}]:
        cases.append((f"op={value!r}", {"id": 6, "op": value}, True))
    cases.append(("no op", {"id": 6}, True))
    cases.append(("unknown field", {"id": 6, "op": "ping", "extra": 1}, True))
    cases.append(("integer field name", {"id": 6, "op": "ping", 7: 1}, True))
    cases.append(("missing sku", {"id": 6, "op": "reserve", "buyer": "u1", "qty": 1}, True))
    cases.append(("missing qty", {"id": 6, "op": "reserve", "sku": SKU, "buyer": "u1"}, True))
    cases.append(("missing buyer", {"id": 6, "op": "confirm", "reservation": "0-1"}, True))
    cases.append(("missing buyers", {"id": 6, "op": "register", "sku": SKU}, True))
    cases.append(("a new SKU without a stock", {"id": 6, "op": "put_sku", "sku": "NEW-" + SKU}, True))
    return cases


async def test_wrong_types_and_shapes_in_every_field_are_invalid_and_change_nothing() -> None:
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=10, per_buyer_limit=3),))) as server,
        open_raw(server.url) as bystander,
        open_raw(server.url, ADMIN_TOKEN) as websocket,
    ):
        hold = await exchange(bystander, reserve_map(1, SKU, "u1"))
        before = await engine_counts(server.engine)
        for what, request in wrong_type_requests(hold["reservation"]):
            reply = await exchange(websocket, request)
            assert (reply["id"], reply["status"]) == (request["id"], "invalid"), f"{what}: {reply}"
            assert reply["error"], what
        for what, request, id_comes_back in wrong_shape_requests():
            reply = await exchange(websocket, request)
            expected_id = request["id"] if id_comes_back else None
            assert (reply["id"], reply["status"]) == (expected_id, "invalid"), f"{what}: {reply}"
            assert reply["error"], what
        # The SKU's settings are untouched too: the hold is still the only one, the limit still 3.
        await assert_still_open_server(server, bystander, before)
        statuses = [(await exchange(bystander, reserve_map(2, SKU, "u1")))["status"] for _ in range(3)]
        assert statuses == ["ok", "ok", "limit_exceeded"]


async def test_huge_and_deep_payloads_are_invalid_and_change_nothing() -> None:
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=10),))) as server,
        open_raw(server.url) as bystander,
        open_raw(server.url, ADMIN_TOKEN) as websocket,
    ):
        before = await engine_counts(server.engine)
        huge = "h" * 900_000
        nested: Any = 0
        for _ in range(500):
            nested = [nested]
        payloads = [
            pack(reserve_map(1, huge, "u1")),
            pack(reserve_map(2, SKU, huge)),
            pack(reserve_map(3, SKU, "u1", key=huge)),
            pack({"id": 4, "op": "register", "sku": SKU, "buyers": [huge[:300]] * 3000}),
            pack({"id": 5, "op": "ping", **{f"field-{index}": index for index in range(50_000)}}),
            pack({"id": 6, "op": "stock", "sku": SKU, "extra": nested}),
            b"\x91" * 100_000 + b"\x80",
            b"\xdb\xff\xff\xff\xff",  # a string header that claims 4 GiB
            b"\xdf\xff\xff\xff\xff",  # a map header that claims 4 billion entries
            pack({"id": 7, "op": "ping"}) + pack({"id": 8, "op": "ping"}),  # two values in one frame
        ]
        for payload in payloads:
            reply = await exchange_bytes(websocket, payload)
            replies = reply if isinstance(reply, list) else [reply]
            assert [one["status"] for one in replies] == ["invalid"] * len(replies), (payload[:40], reply)
        await assert_still_open_server(server, bystander, before)


async def test_a_text_frame_closes_the_connection_with_1003_and_changes_nothing() -> None:
    async with (
        open_server(server_config(skus=(SkuSettings(SKU, stock=10),))) as server,
        open_raw(server.url) as bystander,
        open_raw(server.url) as websocket,
    ):
        assert (await exchange(bystander, reserve_map(1, SKU, "u1")))["status"] == "ok"
        before = await engine_counts(server.engine)
        text = '{"id": 1, "op": "reserve", "sku": "MI-BAND-1", "buyer": "u2", "qty": 1}'
        assert await close_code_after(websocket, text) == 1003
        await assert_still_open_server(server, bystander, before)


async def test_garbage_on_many_connections_at_once_leaves_the_others_served() -> None:
    async with (
        open_server(
            server_config(skus=(SkuSettings(SKU, stock=1000),), limits=Limits(frame_bytes_max=65536))
        ) as server,
        open_raw(server.url) as bystander,
    ):
        before = await engine_counts(server.engine)
        codes: list[int | None] = []

        async def misbehave(payload: bytes | str) -> None:
            async with open_raw(server.url) as websocket:
                codes.append(await close_code_after(websocket, payload))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(misbehave, "text")
                nursery.start_soon(misbehave, b"\x00" * 65537)
        assert Counter(codes) == {1003: 5, 1009: 5}
        await assert_still_open_server(server, bystander, before)


# ------------------------------------------------------------ a flash crowd


async def test_a_flash_crowd_of_100000_over_8_connections_gets_exactly_the_stock() -> None:
    stock = 10_000
    connections = 8
    buyers = 100_000
    frame_requests = 100
    frames_inflight_max = 16
    async with open_server(server_config(skus=(SkuSettings(SKU, stock=stock, per_buyer_limit=1),))) as server:
        replies: list[dict[str, Any]] = []

        async def crowd(connection: int) -> None:
            mine = range(connection, buyers, connections)
            frames = [
                pack([reserve_map(buyer, SKU, f"buyer-{buyer}") for buyer in mine[start : start + frame_requests]])
                for start in range(0, len(mine), frame_requests)
            ]
            window = trio.Semaphore(frames_inflight_max)
            async with open_raw(server.url) as websocket, trio.open_nursery() as nursery:

                async def write() -> None:
                    for frame in frames:
                        await window.acquire()
                        await websocket.send_message(frame)

                nursery.start_soon(write)
                for _ in frames:
                    replies.extend(msgpack.unpackb(await websocket.get_message()))
                    window.release()

        async with trio.open_nursery() as nursery:
            for connection in range(connections):
                nursery.start_soon(crowd, connection)

        assert len(replies) == buyers
        assert sorted(reply["id"] for reply in replies) == list(range(buyers))
        statuses = Counter(reply["status"] for reply in replies)
        assert statuses == {"ok": stock, "sold_out": buyers - stock}
        held = [reply for reply in replies if reply["status"] == "ok"]
        assert len({reply["reservation"] for reply in held}) == stock
        # One shard decides the SKU one request at a time: every count down to 0 is seen once.
        assert sorted(reply["remaining"] for reply in held) == list(range(stock))
        assert await engine_counts(server.engine) == (stock, 0, stock, 0)
        assert await wire_counts(server.url, SKU) == (stock, 0, stock, 0)


# ------------------------------------------------------------ metrics


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_prometheus_and_the_stats_op_show_the_same_figures(
    mock_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    # The clock stands still: the metrics task copies the engine's counts only when the test jumps it.
    config = server_config(skus=(SkuSettings(SKU, stock=3),), data_dir=str(tmp_path / "data"), metrics_port=0, shards=2)
    async with open_server(config) as server:
        assert server.metrics_port is not None
        async with open_raw(server.url) as websocket:
            replies = await exchange(websocket, [reserve_map(index, SKU, f"u{index}") for index in range(4)])
            assert [reply["status"] for reply in replies] == ["ok", "ok", "ok", "sold_out"]
            # A frame of one answer alone, counted as many times as it has requests.
            late = await exchange(websocket, [reserve_map(index, SKU, f"u{index}") for index in range(4, 7)])
            assert [reply["status"] for reply in late] == ["sold_out"] * 3
            assert (await exchange(websocket, {"id": 9, "op": "stock", "sku": SKU}))["held"] == 3
            assert (await exchange(websocket, {"id": 10, "op": "stats"}))["status"] == "forbidden"
        async with open_raw(server.url, ADMIN_TOKEN) as admin:
            stats = (await exchange(admin, {"id": 11, "op": "stats"}))["stats"]
        mock_clock.jump(1.0)
        await trio.testing.wait_all_tasks_blocked()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        samples = scrape(await trio.to_thread.run_sync(fetch_text, url))

    def requests(op: str, status: str) -> float:
        return samples[("soldout_requests_total", (("op", op), ("status", status)))]

    assert requests("reserve", "ok") == 3 == stats["requests"]["reserve"]["ok"]
    assert requests("reserve", "sold_out") == 4 == stats["requests"]["reserve"]["sold_out"]
    assert requests("stock", "ok") == 1 == stats["requests"]["stock"]["ok"]
    assert requests("stats", "forbidden") == 1 == stats["requests"]["stats"]["forbidden"]
    assert requests("stats", "ok") == 1  # counted once answered, so not in its own figures
    for name, value in {"stock": 3, "available": 0, "held": 3, "sold": 0}.items():
        assert samples[(f"soldout_sku_{name}_units", (("sku", SKU),))] == value
        assert stats["skus"][SKU][name] == value
    commits = samples[("soldout_journal_commit_seconds_count", ())]
    assert commits >= 2  # the configured SKU, then at least one batch of reserves
    assert commits >= stats["journal_commits"]
    assert samples[("soldout_frames_total", (("direction", "received"),))] == 5
    assert stats["frames_received"] == 5
    assert samples[("soldout_connections_accepted_total", ())] == 2
    assert ("soldout_reserve_latency_seconds_count", ()) in samples
