"""A soldout server process: the engine, its SKUs from the config, the gateway, metrics.

`open_server(config)` runs one in-process (tests use it over real loopback sockets);
`serve(config)` runs one until SIGINT or SIGTERM, then shuts down cleanly: stop
accepting, answer what is in flight, commit, close, return.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from engine.api import Engine, open_engine
from engine.descriptors import descriptors_wanted, raise_descriptor_limit
from engine.gateway import ENDPOINT_PATH, Gateway
from engine.metrics import GatewayMetrics
from engine.metrics_http import MetricsServer
from engine.server_config import ConfigError, ServerConfig

log = logging.getLogger("soldout.server")


@dataclass(frozen=True)
class RunningServer:
    engine: Engine
    gateway: Gateway
    metrics: GatewayMetrics
    host: str
    port: int
    metrics_port: int | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{ENDPOINT_PATH}"


async def put_configured_skus(engine: Engine, config: ServerConfig) -> None:
    """Put every [[sku]] of the config (restock semantics); a refusal stops the start."""
    for index, sku in enumerate(config.skus):
        reply = await engine.put_sku(
            sku.id,
            stock=sku.stock,
            per_buyer_limit=sku.per_buyer_limit,
            hold_seconds=sku.hold_seconds,
            opens_at=sku.opens_at,
            closes_at=sku.closes_at,
            registration_required=sku.registration_required,
        )
        if reply.status != "ok":
            raise ConfigError(f"sku[{index}] ({sku.id!r}): {reply.error or reply.status}")


@asynccontextmanager
async def open_server(config: ServerConfig) -> AsyncIterator[RunningServer]:
    config.check_bind_address()
    metrics = GatewayMetrics()
    async with open_engine(config.engine, commit_observer=metrics.commit) as engine:
        await put_configured_skus(engine, config)
        gateway = Gateway(engine, config, metrics)
        # Before any nursery, so that a limit too low stops the start as a config error does.
        gateway.budget_sockets()
        stopping = trio.CancelScope()

        async def run_beside_the_gateway(task_status: trio.TaskStatus[int | None]) -> None:
            """The metrics endpoint and the task that keeps its view of the engine fresh."""
            with stopping:
                async with trio.open_nursery() as nursery:
                    metrics_port = None
                    if config.metrics_port is not None:
                        tokens = config.admin_tokens if config.metrics_token_required else None
                        endpoint = MetricsServer(
                            {"/metrics": metrics.exposition},
                            tokens=tokens,
                            request_seconds=config.limits.handshake_seconds_max,
                        )
                        metrics_port = await nursery.start(endpoint.serve, config.metrics_host, config.metrics_port)
                    nursery.start_soon(metrics.refresh_engine_view, engine)
                    task_status.started(metrics_port)

        body_error: Exception | None = None
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gateway.serve)
            metrics_port = await nursery.start(run_beside_the_gateway)
            try:
                yield RunningServer(engine, gateway, metrics, config.host, port, metrics_port)
            except Exception as error:
                body_error = error
            finally:
                # The gateway ends by itself once in-flight frames are answered.
                gateway.shutdown()
                stopping.cancel()
        if body_error is not None:
            # The caller's own exception leaves as itself, not inside the nursery's group.
            raise body_error


def metrics_exposure(config: ServerConfig, port: int) -> str:
    """Where /metrics is and who may read it, for the start-up log."""
    host = f"[{config.metrics_host}]" if ":" in config.metrics_host else config.metrics_host
    who = (
        "an admin token required (Authorization: Bearer)"
        if config.metrics_token_required
        else "loopback only, no token"
    )
    return (
        f"metrics at http://{host}:{port}/metrics ({who}): per-SKU stock, available, held and sold; "
        "requests by op and status; frames, bytes, connections; journal commits; shard mailboxes"
    )


# The book's objects live as long as the sale and hold no reference cycles, so the
# cyclic collector only rescans them; measured under load it took 12-25% of the
# server's CPU at the default thresholds and under 1% at these.
SERVER_GC_THRESHOLDS = (100_000, 50, 1000)


async def serve(config: ServerConfig, *, announce: bool = True) -> None:
    """Run until SIGINT or SIGTERM; then shut down cleanly and return."""
    gc.set_threshold(*SERVER_GC_THRESHOLDS)
    # A soft descriptor limit of 1024 is common; the hard one is what the operator allows.
    limits = config.limits
    raise_descriptor_limit(descriptors_wanted(config.engine.shards, limits.connections_max + limits.handshakes_max))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(config) as server:
            # What recovery built stays for the life of the process: keep it out of
            # every future collection.
            gc.freeze()
            if announce:
                print(f"soldout serving {server.url}", flush=True)
                if server.metrics_port is not None:
                    print(metrics_exposure(config, server.metrics_port), flush=True)
            async for received in signals:
                log.info("received %s: shutting down", signal.Signals(received).name)
                break
    if announce:
        print("soldout stopped", flush=True)
