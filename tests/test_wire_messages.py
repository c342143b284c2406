"""What "frame" means in the limits: a whole websocket message, however many websocket
frames (fragments) carry it. A raw wsproto client sends one request in fragments to a
real server over loopback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio
from wire_helpers import FRONTEND_TOKEN, reserve_map, server_config
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Event, Message, Request

from engine.server.config import SkuSettings
from engine.server.runner import RunningServer, open_server
from protocol.limits import Limits

SKU = "MI-BAND-1"
FRAME_BYTES_MAX = 4096


class FragmentingClient:
    """A websocket client that sends each message in the fragments it is given."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.connection = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    async def next_event(self) -> Event:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.connection.receive_data(data or None)
            self.events.extend(self.connection.events())
        return self.events.pop(0)

    async def send_fragments(self, fragments: list[bytes]) -> None:
        for position, fragment in enumerate(fragments):
            last = position == len(fragments) - 1
            await self.stream.send_all(self.connection.send(Message(data=fragment, message_finished=last)))

    async def reply_or_close_code(self) -> Any:
        """The reply map the server sends, or the close code it closes with."""
        payload = b""
        while True:
            event = await self.next_event()
            if isinstance(event, BytesMessage):
                payload += bytes(event.data)
                if event.message_finished:
                    return msgpack.unpackb(payload)
            elif isinstance(event, CloseConnection):
                return event.code


@asynccontextmanager
async def fragmenting_client(server: RunningServer) -> AsyncIterator[FragmentingClient]:
    stream = await trio.open_tcp_stream(server.host, server.port)
    try:
        client = FragmentingClient(stream)
        headers = [(b"Authorization", f"Bearer {FRONTEND_TOKEN}".encode())]
        await stream.send_all(client.connection.send(Request(host=server.host, target="/v1", extra_headers=headers)))
        assert isinstance(await client.next_event(), AcceptConnection)
        yield client
    finally:
        await stream.aclose()


def reserve_of_size(size: int) -> bytes:
    """A reserve request whose payload is exactly `size` bytes (its buyer pads it)."""
    base = len(msgpack.packb(reserve_map(1, SKU, "")))
    for buyer_length in range(size - base, 0, -1):
        payload = msgpack.packb(reserve_map(1, SKU, "u" * buyer_length))
        if len(payload) == size:
            return payload
    raise AssertionError(f"no reserve of {size} bytes")


def in_fragments(payload: bytes, size: int) -> list[bytes]:
    return [payload[start : start + size] for start in range(0, len(payload), size)]


async def test_a_message_in_fragments_is_one_frame_answered_as_a_whole() -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=5),), limits=Limits(frame_bytes_max=FRAME_BYTES_MAX))
    async with open_server(config) as server, fragmenting_client(server) as client:
        payload = msgpack.packb(reserve_map(1, SKU, "u1"))
        await client.send_fragments(in_fragments(payload, 3))
        reply = await client.reply_or_close_code()
        assert (reply["id"], reply["status"]) == (1, "ok")


async def test_the_frame_limit_counts_every_fragment_of_a_message() -> None:
    config = server_config(skus=(SkuSettings(SKU, stock=5),), limits=Limits(frame_bytes_max=FRAME_BYTES_MAX))
    async with open_server(config) as server:
        # At the limit, in fragments of a quarter of it each: answered.
        async with fragmenting_client(server) as client:
            await client.send_fragments(in_fragments(reserve_of_size(FRAME_BYTES_MAX), FRAME_BYTES_MAX // 4))
            reply = await client.reply_or_close_code()
            # Read whole and decoded: its padded buyer is longer than a name may be.
            assert (reply["id"], reply["status"]) == (1, "invalid")
            assert "buyer" in reply["error"]
        # One byte over, though no fragment is near the limit: the connection closes with 1009.
        async with fragmenting_client(server) as client:
            await client.send_fragments(in_fragments(reserve_of_size(FRAME_BYTES_MAX + 1), FRAME_BYTES_MAX // 4))
            assert await client.reply_or_close_code() == 1009
