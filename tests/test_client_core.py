"""The clients' sans-IO core (protocol/client_core.py), alone: a scripted peer feeds it bytes.

No socket and no event loop: calls go in, frames come out; reply frames go in, answers
come out. A stateful hypothesis test interleaves calls, frames, replies answered in any
order, calls given up on and dropped connections, against a peer that keeps its own
ledger of holds by idempotency key.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.server.config import ClusterConfig
from protocol.client_core import (
    Answered,
    ClientCore,
    Failed,
    Unreadable,
    reconnect_delay_seconds,
    unavailable_retry_pause_seconds,
)
from protocol.codec import LocalProtocolError
from protocol.limits import CLIENT_UNAVAILABLE_RETRIES_MAX
from protocol.messages import Reply, Reserve, Stock, StockReply

SKU = "MI-BAND-1"
PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"
# Only the clients may do I/O; everything else in protocol/ is sans-IO.
IO_MODULES = {"trio", "trio_websocket", "asyncio", "websockets", "socket", "selectors", "ssl", "anyio", "wsproto"}


def imported_modules(path: Path, *, top_level: bool = True) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name.split(".")[0] for name in names} if top_level else names


@pytest.mark.parametrize(
    "module", sorted(path.name for path in PROTOCOL.glob("*.py") if path.name not in ("client.py", "aio.py"))
)
def test_protocol_modules_other_than_the_clients_import_no_io(module: str) -> None:
    assert imported_modules(PROTOCOL / module) & IO_MODULES == set()


def test_the_core_imports_no_io_and_no_client() -> None:
    imported = imported_modules(PROTOCOL / "client_core.py")
    assert imported & IO_MODULES == set()
    assert imported_modules(PROTOCOL / "client_core.py", top_level=False) & {"protocol.client", "protocol.aio"} == set()


def frame_requests(frame: bytes) -> list[dict[str, Any]]:
    message = msgpack.unpackb(frame)
    return message if isinstance(message, list) else [message]


def pack(message: Any) -> bytes:
    return msgpack.packb(message)  # type: ignore[no-any-return]


def counting_keys() -> Any:
    counter = itertools.count(1)
    return lambda: f"key-{next(counter)}"


def test_calls_leave_in_batch_frames_in_order_and_one_call_as_a_map() -> None:
    core = ClientCore(batch_requests_max=3, make_key=counting_keys())
    ids = [core.call(Reserve(SKU, f"u{index}")) for index in range(7)]
    frames = list(core.frames_to_send())
    assert [len(frame_requests(frame)) for frame in frames] == [3, 3, 1]
    assert isinstance(msgpack.unpackb(frames[-1]), dict)
    requests = [request for frame in frames for request in frame_requests(frame)]
    assert [request["id"] for request in requests] == ids == list(range(1, 8))
    # A reserve without a key gets one of its own.
    assert [request["key"] for request in requests] == [f"key-{index}" for index in range(1, 8)]
    assert core.frame_to_send() is None
    assert core.in_flight == 7


def test_a_reserve_with_a_key_keeps_it() -> None:
    core = ClientCore()
    core.call(Reserve(SKU, "u1", 2, "mine"))
    (request,) = frame_requests(core.frame_to_send() or b"")
    assert (request["key"], request["qty"]) == ("mine", 2)


def test_replies_are_matched_by_id_whatever_order_their_frames_come_in() -> None:
    core = ClientCore(batch_requests_max=2)
    reserve = core.call(Reserve(SKU, "u1"))
    stock = core.call(Stock(SKU))
    ping = core.call_op("ping")
    stats = core.call_op("stats")
    assert len(list(core.frames_to_send())) == 2
    events = core.receive_frame(pack([{"id": ping, "status": "ok"}, {"id": stats, "status": "ok", "stats": {}}]))
    events += core.receive_frame(
        pack(
            [
                {"id": reserve, "status": "ok", "reservation": "1-1", "future": 1},
                {"id": stock, "status": "ok", "stock": 5},
            ]
        )
    )
    assert events == [
        Answered(ping, Reply("ok")),
        Answered(stats, {"id": stats, "status": "ok", "stats": {}}),
        Answered(reserve, Reply("ok", reservation="1-1")),
        Answered(stock, StockReply("ok", stock=5)),
    ]
    assert core.in_flight == 0
    # A reply for a call answered already, or never made, is dropped.
    assert core.receive_frame(pack({"id": reserve, "status": "ok"})) == []
    assert core.receive_frame(pack({"id": 999, "status": "ok"})) == []


def test_a_dropped_connection_sends_every_unanswered_call_again_first_with_its_key() -> None:
    core = ClientCore(batch_requests_max=2, make_key=counting_keys())
    first = [core.call(Reserve(SKU, f"u{index}")) for index in range(4)]
    sent = list(core.frames_to_send())
    core.receive_frame(pack([{"id": first[1], "status": "ok"}]))
    later = core.call(Reserve(SKU, "u-later"))
    core.connection_lost()
    again = [request for frame in core.frames_to_send() for request in frame_requests(frame)]
    assert [request["id"] for request in again] == [first[0], first[2], first[3], later]
    before = {request["id"]: request for frame in sent for request in frame_requests(frame)}
    assert [request["key"] for request in again[:3]] == [before[call]["key"] for call in (first[0], first[2], first[3])]
    assert core.resent == 3


def test_a_call_given_up_on_is_never_answered_nor_sent_again() -> None:
    core = ClientCore()
    unsent_then_abandoned = core.call_op("ping")
    core.abandon(unsent_then_abandoned)
    assert core.frame_to_send() is None
    sent = core.call(Reserve(SKU, "u1"))
    assert core.frame_to_send() is not None
    core.abandon(sent)
    # Still in flight on the server: it counts until its reply comes.
    assert core.in_flight == 1
    assert core.receive_frame(pack({"id": sent, "status": "ok", "reservation": "1-1"})) == []
    assert core.in_flight == 0
    another = core.call(Reserve(SKU, "u2"))
    core.frame_to_send()
    core.abandon(another)
    core.connection_lost()
    assert (core.in_flight, core.frame_to_send()) == (0, None)


def test_a_frame_the_server_refused_fails_every_call_sent_and_unanswered_only() -> None:
    core = ClientCore()
    sent = [core.call(Reserve(SKU, f"u{index}")) for index in range(3)]
    core.frame_to_send()
    waiting = core.call(Reserve(SKU, "u-waiting"))
    events = core.receive_frame(pack({"id": None, "status": "invalid", "error": "batch too long"}))
    assert events == [Failed(call, "the server refused a frame: invalid: batch too long") for call in sent]
    assert core.in_flight == 1
    assert [request["id"] for request in frame_requests(core.frame_to_send() or b"")] == [waiting]


def test_a_frame_that_is_not_a_reply_frame_is_reported_and_answers_nothing() -> None:
    core = ClientCore()
    core.call_op("ping")
    core.frame_to_send()
    (event,) = core.receive_frame(b"\xc1not msgpack")
    assert isinstance(event, Unreadable)
    assert core.in_flight == 1


def test_calls_beyond_the_in_flight_bound_are_refused_until_one_is_answered() -> None:
    core = ClientCore(inflight_requests_max=2)
    first = core.call_op("ping")
    core.call_op("ping")
    assert core.room == 0
    with pytest.raises(LocalProtocolError, match="in flight"):
        core.call_op("ping")
    core.frame_to_send()
    core.receive_frame(pack({"id": first, "status": "ok"}))
    assert core.room == 1


def test_failing_all_answers_every_waiting_call_with_the_error() -> None:
    core = ClientCore()
    calls = [core.call_op("ping") for _ in range(3)]
    core.frame_to_send()
    queued = core.call_op("ping")
    assert core.fail_all("closed") == [Failed(call, "closed") for call in [*calls, queued]]
    assert (core.in_flight, core.frame_to_send()) == (0, None)


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ClientCore().call_op("reserve")
    with pytest.raises(ValueError, match="batch_requests_max"):
        ClientCore(batch_requests_max=5000)


def test_the_reconnect_delay_grows_then_levels_off() -> None:
    delays = [reconnect_delay_seconds(failures) for failures in range(1, 30)]
    assert delays == sorted(delays)
    assert delays[0] == pytest.approx(0.05)
    assert delays[-1] == pytest.approx(1.0)


# ------------------------------------------------------------------ interleavings


class ScriptedServer:
    """Decides every request it receives at once, holding a unit per new key, and answers
    it whenever the test says, in any order, unless the connection drops first."""

    def __init__(self) -> None:
        self.holds: dict[str, str] = {}  # key -> reservation
        self.unanswered: list[list[dict[str, Any]]] = []  # per frame, its reply maps

    def receive(self, frame: bytes) -> None:
        replies = []
        for request in frame_requests(frame):
            if request["op"] == "reserve":
                reservation = self.holds.setdefault(request["key"], f"0-{len(self.holds) + 1}")
                replies.append({"id": request["id"], "status": "ok", "reservation": reservation})
            elif request["op"] == "stock":
                replies.append({"id": request["id"], "status": "ok", "held": len(self.holds)})
            else:
                replies.append({"id": request["id"], "status": "ok"})
        self.unanswered.append(replies)


class CoreAgainstAScriptedServer(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = ClientCore(batch_requests_max=4, inflight_requests_max=12, make_key=counting_keys())
        self.server = ScriptedServer()
        self.calls: dict[int, str] = {}  # call -> what it asked, for calls made and not given up
        self.reserve_keys: dict[int, str] = {}
        self.abandoned: set[int] = set()
        self.answers: dict[int, Any] = {}
        self.keys_seen: dict[int, str] = {}  # call -> the key its requests carried

    @precondition(lambda self: self.core.room > 0)
    @rule(kind=st.sampled_from(["reserve", "keyed reserve", "stock", "ping"]))
    def make_a_call(self, kind: str) -> None:
        if kind == "reserve":
            call = self.core.call(Reserve(SKU, "u1"))
        elif kind == "keyed reserve":
            call = self.core.call(Reserve(SKU, "u1", 1, f"given-{len(self.calls)}"))
        elif kind == "stock":
            call = self.core.call(Stock(SKU))
        else:
            call = self.core.call_op("ping")
        self.calls[call] = kind

    @rule()
    def send_a_frame(self) -> None:
        frame = self.core.frame_to_send()
        if frame is not None:
            self.send(frame)

    def send(self, frame: bytes) -> None:
        requests = frame_requests(frame)
        assert 1 <= len(requests) <= 4
        for request in requests:
            assert request["id"] not in self.abandoned, "a call given up on was sent again"
            if request["op"] == "reserve":
                # A call's key never changes, however often it is sent.
                assert self.keys_seen.setdefault(request["id"], request["key"]) == request["key"]
        self.server.receive(frame)

    @precondition(lambda self: self.server.unanswered)
    @rule(data=st.data())
    def answer_a_frame(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.server.unanswered) - 1))
        replies = self.server.unanswered.pop(index)
        for event in self.core.receive_frame(pack(replies if len(replies) > 1 else replies[0])):
            assert isinstance(event, Answered), event
            assert event.call not in self.answers, "answered twice"
            assert event.call not in self.abandoned, "a call given up on was answered"
            self.answers[event.call] = event.reply

    @precondition(lambda self: self.calls.keys() - self.answers.keys() - self.abandoned)
    @rule(data=st.data())
    def give_up_on_a_call(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(sorted(self.calls.keys() - self.answers.keys() - self.abandoned)))
        self.core.abandon(call)
        self.abandoned.add(call)

    @rule()
    def drop_the_connection(self) -> None:
        self.server.unanswered.clear()
        self.core.connection_lost()

    @invariant()
    def within_bounds(self) -> None:
        assert 0 <= self.core.in_flight <= 12

    def teardown(self) -> None:
        # The connection comes back and stays: every call not given up on gets its answer.
        self.core.connection_lost()
        self.server.unanswered.clear()
        while (frame := self.core.frame_to_send()) is not None:
            self.send(frame)
            for replies in self.server.unanswered:
                for event in self.core.receive_frame(pack(replies)):
                    assert isinstance(event, Answered)
                    assert event.call not in self.answers
                    self.answers[event.call] = event.reply
            self.server.unanswered.clear()
        assert self.answers.keys() == self.calls.keys() - self.abandoned
        assert self.core.in_flight == 0
        # Each reserve's answer is the hold of its own key; no two calls share a hold.
        reservations = [reply.reservation for call, reply in self.answers.items() if "reserve" in self.calls[call]]
        assert len(reservations) == len(set(reservations))
        for call, reply in self.answers.items():
            if "reserve" in self.calls[call]:
                assert reply.reservation == self.server.holds[self.keys_seen[call]]
            elif self.calls[call] == "stock":
                assert type(reply) is StockReply
            else:
                assert reply == Reply("ok")


CoreAgainstAScriptedServer.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_core_against_a_scripted_server = CoreAgainstAScriptedServer.TestCase


def test_the_pause_before_resending_an_unavailable_reserve_doubles_up_to_two_seconds() -> None:
    pauses = [unavailable_retry_pause_seconds(attempt) for attempt in range(1, CLIENT_UNAVAILABLE_RETRIES_MAX + 1)]
    assert pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0, 2.0])
    # Longer in all than a failover at the default lease (3 s to notice, then a round and the takeover).
    assert sum(pauses) > 3 * ClusterConfig.__dataclass_fields__["lease_seconds"].default
