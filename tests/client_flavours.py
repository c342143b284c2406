"""What the behaviour tests of the two clients share: the client under test (trio or
asyncio), a real `soldout serve` process, and a scripted websocket peer.

A test is written once as `async def body(flavour, ...)` and run by a plain sync test
with `flavour.run(body, ...)`: under `trio.run` for the trio client, under `asyncio.run`
for the asyncio one. Inside, it uses only the flavour's `open_client`, `gather`,
`to_thread` and `cancel_after`, so the same lines drive either client.

The server process and the scripted peer are plain threads and processes, outside
either event loop, so both flavours meet the very same peers.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio
import wsproto
import wsproto.events
from wire_helpers import REPOSITORY, process_environment

import protocol.aio
import protocol.client

# A guard against a lost call or a hung start, not a measurement.
GUARD_SECONDS = 60


class Flavour:
    name: str
    cancelled: type[BaseException]

    def run(self, body: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        raise NotImplementedError

    def open_client(self, url: str, token: str | None = None, **options: Any) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def gather(self, *thunks: Callable[[], Awaitable[Any]]) -> list[Any]:
        """Run every thunk concurrently; their results in the order given."""
        raise NotImplementedError

    async def to_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    async def cancel_after(self, call: Callable[[], Awaitable[Any]], sent: threading.Event) -> BaseException | None:
        """Start `call`, cancel it once `sent` is set; what it raised (None if it returned)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class TrioFlavour(Flavour):
    name = "trio"
    cancelled = trio.Cancelled

    def run(self, body: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async def guarded() -> Any:
            with trio.fail_after(GUARD_SECONDS):
                return await body(self, *args)

        return trio.run(guarded)

    def open_client(self, url: str, token: str | None = None, **options: Any) -> AbstractAsyncContextManager[Any]:
        return protocol.client.open_client(url, token, **options)

    async def gather(self, *thunks: Callable[[], Awaitable[Any]]) -> list[Any]:
        results: list[Any] = [None] * len(thunks)

        async def one(index: int) -> None:
            results[index] = await thunks[index]()

        async with trio.open_nursery() as nursery:
            for index in range(len(thunks)):
                nursery.start_soon(one, index)
        return results

    async def to_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args)

    async def cancel_after(self, call: Callable[[], Awaitable[Any]], sent: threading.Event) -> BaseException | None:
        raised: list[BaseException | None] = [None]

        async def calling(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                try:
                    await call()
                except BaseException as error:
                    raised[0] = error
                    raise

        async with trio.open_nursery() as nursery:
            scope = await nursery.start(calling)
            await trio.to_thread.run_sync(sent.wait, GUARD_SECONDS)
            scope.cancel()
        return raised[0]


class AsyncioFlavour(Flavour):
    name = "asyncio"
    cancelled = asyncio.CancelledError

    def run(self, body: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async def guarded() -> Any:
            async with asyncio.timeout(GUARD_SECONDS):
                return await body(self, *args)

        return asyncio.run(guarded())

    def open_client(self, url: str, token: str | None = None, **options: Any) -> AbstractAsyncContextManager[Any]:
        return protocol.aio.open_client(url, token, **options)

    async def gather(self, *thunks: Callable[[], Awaitable[Any]]) -> list[Any]:
        return list(await asyncio.gather(*(thunk() for thunk in thunks)))

    async def to_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(function, *args)

    async def cancel_after(self, call: Callable[[], Awaitable[Any]], sent: threading.Event) -> BaseException | None:
        task = asyncio.ensure_future(call())
        await asyncio.to_thread(sent.wait, GUARD_SECONDS)
        task.cancel()
        try:
            await task
        except BaseException as error:
            return error
        return None


FLAVOURS = [TrioFlavour(), AsyncioFlavour()]


# ------------------------------------------------------------------ a real server process

SALE_TEMPLATE = """
[server]
host = "127.0.0.1"
port = 0
metrics_port = 0

[engine]
shards = 4
{data_dir}
durable = true

[auth]
frontend_tokens = ["front-secret"]
admin_tokens = ["admin-secret"]

[limits]
{limits}
"""


@dataclass
class ServerProcess:
    """`soldout serve --config FILE`, started, killed and started again by the test."""

    directory: Path
    data_dir: bool = False
    limits: str = ""
    url: str = ""
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    outputs: list[Path] = field(default_factory=list)

    def start(self) -> str:
        """Start it (on the port it had before, if it ran before); returns its ws:// url."""
        assert self.process is None
        config = self.directory / "soldout.toml"
        data_dir = f'data_dir = "{self.directory / "data"}"' if self.data_dir else ""
        config.write_text(SALE_TEMPLATE.format(data_dir=data_dir, limits=self.limits))
        self.starts += 1
        output = self.directory / f"output-{self.starts}.txt"
        self.outputs.append(output)
        arguments = ["serve", "--config", str(config), "--port", str(self.port)]
        with output.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", *arguments],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=str(REPOSITORY),
                env=process_environment(),
            )
        deadline = time.monotonic() + GUARD_SECONDS
        while time.monotonic() < deadline:
            for line in output.read_bytes().splitlines():
                if line.startswith(b"soldout serving "):
                    self.url = line.split()[-1].decode()
                    self.port = int(self.url.rsplit(":", 1)[1].split("/", 1)[0])
                    return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"soldout serve did not start: {output.read_text(errors='replace')}")

    def kill(self, signal_number: int = signal.SIGKILL) -> int:
        """Stop it (kill -9 unless told otherwise); returns its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal_number)
        status = self.process.wait(GUARD_SECONDS)
        self.process = None
        return status


def serve(directory: Path, **options: Any) -> Iterator[ServerProcess]:
    """A fixture body: a started server, killed when the test ends."""
    server = ServerProcess(directory, **options)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.kill()


# ------------------------------------------------------------------ a scripted websocket peer


class ScriptedPeer:
    """A websocket server in a thread that hands the test each request frame it receives
    and sends back the frames the test gives it, in whatever order the test likes.

    `frames` fills with the decoded request frames (a map or a list of maps); `received`
    is set each time one arrives; `reply(message)` sends a frame on the current
    connection; `drop()` closes the connection at once, without a close handshake.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        # So that the accepting thread sees `close` soon: closing a listener does not wake accept().
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/v1"
        self.frames: list[Any] = []
        self.connections = 0
        self._condition = threading.Condition()
        self._socket: socket.socket | None = None
        self._connection: wsproto.WSConnection | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def wait_for_frames(self, count: int) -> list[Any]:
        with self._condition:
            assert self._condition.wait_for(lambda: len(self.frames) >= count, GUARD_SECONDS), self.frames
            return list(self.frames)

    def reply(self, message: Any) -> None:
        with self._condition:
            assert self._connection is not None
            assert self._socket is not None
            data = self._connection.send(wsproto.events.BytesMessage(msgpack.packb(message)))
            self._socket.sendall(data)

    def drop(self) -> None:
        with self._condition:
            if self._socket is not None:
                self._socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stopping = True
        self.drop()
        self._listener.close()
        self._thread.join(GUARD_SECONDS)

    def _serve(self) -> None:
        while not self._stopping:
            try:
                accepted, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.settimeout(None)
            with accepted:
                connection = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
                with self._condition:
                    self._socket, self._connection = accepted, connection
                    self.connections += 1
                self._talk(accepted, connection)
                with self._condition:
                    self._socket = self._connection = None

    def _talk(self, accepted: socket.socket, connection: wsproto.WSConnection) -> None:
        while True:
            try:
                data = accepted.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._condition:
                connection.receive_data(data)
                for event in connection.events():
                    if isinstance(event, wsproto.events.Request):
                        accepted.sendall(connection.send(wsproto.events.AcceptConnection()))
                    elif isinstance(event, wsproto.events.BytesMessage):
                        self.frames.append(msgpack.unpackb(event.data))
                        self._condition.notify_all()
                    elif isinstance(event, wsproto.events.CloseConnection):
                        accepted.sendall(connection.send(event.response()))
                        return
                    elif isinstance(event, wsproto.events.Ping):
                        accepted.sendall(connection.send(event.response()))


def requests_in(frames: list[Any]) -> list[dict[str, Any]]:
    """Every request map in the frames, in order."""
    return [request for frame in frames for request in (frame if isinstance(frame, list) else [frame])]


def free_port() -> int:
    """A loopback port nothing listens on (it did a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
