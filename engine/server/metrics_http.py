"""The metrics endpoint: Prometheus text at /metrics, served by a small HTTP server.

It answers one request per connection (the reply closes it), at most
`METRICS_CONNECTIONS_MAX` connections at once (the descriptor reserve counts them), each
given `request_seconds` to send its request. Paths are looked up in its routes, so
`/healthz` and `/readyz` can be added as routes; any other path is answered 404.

What /metrics shows is what the admin-only `stats` op shows: per-SKU stock, available,
held and sold; requests by op and status; frames, bytes and connections; journal commit
times and batch sizes; shard mailboxes. On a loopback address it answers anyone on the
machine. Given `tokens` (a server with tokens whose metrics listen elsewhere), it asks
for one of them in `Authorization: Bearer <token>`, as Prometheus's `authorization`
scrape setting sends it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import h11
import trio

from engine.server.listening import open_listeners
from engine.server.websocket import close_gently
from protocol.limits import METRICS_CONNECTIONS_MAX, METRICS_REQUEST_BYTES_MAX, RECEIVE_BYTES

log = logging.getLogger("soldout.metrics")

METHODS = (b"GET", b"HEAD")

# A route answers with (HTTP status, content type, body).
Route = Callable[[], Awaitable[tuple[int, bytes, bytes]]]


class MetricsServer:
    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        tokens: Sequence[str] | None,
        request_seconds: float,
        public_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.routes = dict(routes)
        # Paths that tell nothing of the sale (health checks) answer without a token.
        self.public_paths = public_paths
        self.tokens = None if tokens is None else [token.encode() for token in tokens]
        self.request_seconds = request_seconds
        self._slots = trio.Semaphore(METRICS_CONNECTIONS_MAX)

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on host:port; report the bound port; serve until cancelled."""
        listeners = await open_listeners(host, port, "server.metrics_port")
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept, listener, nursery)
                task_status.started(listeners[0].socket.getsockname()[1])
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except BaseException:
                self._slots.release()
                raise
            nursery.start_soon(self._serve_one, stream)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        try:
            connection = h11.Connection(h11.SERVER, max_incomplete_event_size=METRICS_REQUEST_BYTES_MAX)
            with trio.move_on_after(self.request_seconds):
                try:
                    request = await _read_request(stream, connection)
                except h11.RemoteProtocolError:
                    await _respond(stream, connection, 400, b"text/plain", b"bad request\n", head=False)
                    request = None
                if request is not None:
                    status, content_type, body, headers = await self._answer(request)
                    await _respond(
                        stream, connection, status, content_type, body, head=request.method == b"HEAD", headers=headers
                    )
            await close_gently(stream, self.request_seconds)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass  # the peer went first
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self._slots.release()

    async def _answer(self, request: h11.Request) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        if request.method not in METHODS:
            return 405, b"text/plain", b"GET or HEAD\n", [(b"Allow", b", ".join(METHODS))]
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        if self.tokens is not None and path not in self.public_paths:
            authorizations = [value for name, value in request.headers if name == b"authorization"]
            if len(authorizations) > 1:
                return 400, b"text/plain", b"more than one Authorization header\n", []
            if not authorizations or not self._known(authorizations[0]):
                return (
                    401,
                    b"text/plain",
                    b"an admin token is needed\n",
                    [(b"WWW-Authenticate", b'Bearer realm="soldout"')],
                )
        route = self.routes.get(path)
        if route is None:
            return 404, b"text/plain", b"not found\n", []
        status, content_type, body = await route()
        return status, content_type, body, []

    def _known(self, authorization: bytes) -> bool:
        assert self.tokens is not None
        scheme, _, credentials = authorization.partition(b" ")
        token = credentials.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare against every token in constant time, so timing tells nothing.
        return any([hmac.compare_digest(token, known) for known in self.tokens])


async def _read_request(stream: trio.SocketStream, connection: h11.Connection) -> h11.Request | None:
    """The request's head; None if the peer hung up before sending one."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(RECEIVE_BYTES))
            continue
        return event if isinstance(event, h11.Request) else None


async def _respond(
    stream: trio.SocketStream,
    connection: h11.Connection,
    status: int,
    content_type: bytes,
    body: bytes,
    *,
    head: bool,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    response_headers = [
        (b"Content-Type", content_type),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
        *headers,
    ]
    await stream.send_all(connection.send(h11.Response(status_code=status, headers=response_headers)))
    if not head:
        await stream.send_all(connection.send(h11.Data(data=body)))
    await stream.send_all(connection.send(h11.EndOfMessage()))
