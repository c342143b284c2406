"""The echo ceiling: a plain trio-websocket server that sends every message back unchanged.

The bench drives it with the same drivers and frames as soldout, so its rate is what the
stack (Python, trio, trio-websocket, msgpack on the driver side) can carry at all, and
soldout's rate over it is how much of that ceiling the engine leaves. Run as
`python -m bench.echo`; it prints `echo serving URL` once it listens, and stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

ENDPOINT_PATH = "/v1"
FRAME_BYTES_MAX = 64 * 1024 * 1024
# The gateway's own message queue size, so the echo server buffers like it.
MESSAGE_QUEUE_SIZE = 4


async def serve_echo(port: int = 0) -> None:
    async def echo(request: WebSocketRequest) -> None:
        websocket = await request.accept()
        try:
            while True:
                await websocket.send_message(await websocket.get_message())
        except ConnectionClosed:
            pass

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    echo,
                    "127.0.0.1",
                    port,
                    ssl_context=None,
                    max_message_size=FRAME_BYTES_MAX,
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    task_status=task_status,
                )
            )
            print(f"echo serving ws://127.0.0.1:{server.port}{ENDPOINT_PATH}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(serve_echo)
    sys.exit(0)
