"""One server-side websocket over one TCP stream: trio-websocket, with what it lacks.

trio-websocket's server (`WebSocketServer`) waits up to 60 s for an upgrade request even
from a peer that has already hung up, and it hangs up without a close frame when a peer
breaks the framing rules (wsproto reports the failure as a close event but leaves the
connection open, so no close frame is ever sent). `ServerWebSocket` fixes both: its
`wait_for_request` ends as soon as the peer goes, and a frame wsproto cannot parse is
answered with the close frame RFC 6455 7.1.7 asks for (1002, or 1007 for bad UTF-8).

`close_gently` ends a stream the way RFC 7230 6.6 describes: send FIN after whatever is
queued, read what the peer still sends until it hangs up (bounded), then close. Closing
with unread bytes would make the kernel reset the connection and drop the close frame
and last replies still on their way.
"""

from __future__ import annotations

import contextlib

import trio
import wsproto
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from protocol.limits import DRAIN_BYTES, GATEWAY_RECEIVE_BYTES


class ServerWebSocket(WebSocketConnection):
    """A server connection whose opening and failing close are under soldout's bounds."""

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        max_message_size: int,
        message_queue_size: int,
        receive_buffer_size: int = GATEWAY_RECEIVE_BYTES,
    ) -> None:
        super().__init__(
            stream,
            WSConnection(ConnectionType.SERVER),
            max_message_size=max_message_size,
            message_queue_size=message_queue_size,
            receive_buffer_size=receive_buffer_size,
        )
        self._request: WebSocketRequest | None = None
        self._request_or_end = trio.Event()

    async def read(self) -> None:
        """The connection's reader task (trio-websocket's), telling when it ends."""
        try:
            await self._reader_task()
        except ConnectionClosed:
            pass  # the peer went while trio-websocket answered its bad request with a 400
        finally:
            self._request_or_end.set()

    async def wait_for_request(self, seconds: float) -> WebSocketRequest | None:
        """The upgrade request; None if the peer hung up, broke HTTP, or took over `seconds`."""
        with trio.move_on_after(seconds):
            await self._request_or_end.wait()
        return self._request

    async def _handle_request_event(self, event: wsproto.events.Request) -> None:
        self._request = WebSocketRequest(self, event)
        self._request_or_end.set()

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state is not ConnectionState.OPEN:
            await super()._handle_close_connection_event(event)
            return
        # A close event while the connection is still open comes from wsproto itself: a
        # frame it could not parse. The peer sent no close frame; tell it why we end.
        with contextlib.suppress(ConnectionClosed):
            await self._send(CloseConnection(code=event.code, reason=event.reason))
        await self._close_web_socket(event.code, event.reason or None)
        self._close_handshake.set()
        # Nothing more to read; whoever owns the stream closes it (gently).
        self._reader_running = False


async def close_gently(stream: trio.SocketStream, seconds: float) -> None:
    """Half-close, drain until the peer hangs up or `seconds` pass, then close."""
    try:
        with trio.move_on_after(seconds):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_eof()
                while await stream.receive_some(DRAIN_BYTES):
                    pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
