"""A soldout server process: the engine, its SKUs from the config, the gateway, metrics.

`open_server(config)` runs one in-process (tests use it over real loopback sockets);
`serve(config)` runs one until SIGINT or SIGTERM, then shuts down cleanly: stop
accepting, answer what is in flight, commit, close, return.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from engine.api import Engine, open_engine
from engine.server.config import ConfigError, ServerConfig
from engine.server.descriptors import descriptors_wanted, raise_descriptor_limit
from engine.server.gateway import ENDPOINT_PATH, Gateway
from engine.server.health import ServerHealth
from engine.server.metrics import ServerMetrics
from engine.server.metrics_http import MetricsServer
from protocol.messages import UNKNOWN_SKU

log = logging.getLogger("soldout.server")


@dataclass(frozen=True)
class RunningServer:
    engine: Engine
    gateway: Gateway
    metrics: ServerMetrics
    host: str
    port: int
    metrics_port: int | None
    recovery_seconds: float = 0.0  # opening the engine: reading snapshots, replaying journals

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{ENDPOINT_PATH}"


async def put_configured_skus(engine: Engine, config: ServerConfig) -> None:
    """Create every [[sku]] of the config that does not exist; leave the others as journaled.

    A SKU that exists keeps its settings and stock (admin changes survive a restart), and
    the log says, one line per SKU, which of the file's values differ and were not applied;
    with `apply_config_skus` they are applied, with restock semantics. A refusal stops the start.
    """
    for index, sku in enumerate(config.skus):
        given = sku.given()
        current = await engine.get_sku(sku.sku)
        if current.status == UNKNOWN_SKU or config.apply_config_skus:
            reply = await engine.put_sku(sku.sku, **given)
            if reply.status != "ok":
                raise ConfigError(f"sku[{index}] ({sku.sku!r}): {reply.error or reply.status}")
            if current.status != UNKNOWN_SKU:
                log.info("sku %s: the config file's settings applied (--apply-config-skus)", sku.sku)
            continue
        if current.status != "ok":
            raise ConfigError(f"sku[{index}] ({sku.sku!r}): {current.error or current.status}")
        differ = [
            f"{name} {value!r} (journal: {getattr(current, name)!r})"
            for name, value in given.items()
            if getattr(current, name) != value
        ]
        if differ:
            log.warning(
                "sku %s exists; the config file's %s not applied (the journal keeps what was set; "
                "--apply-config-skus applies the file)",
                sku.sku,
                ", ".join(differ),
            )


@asynccontextmanager
async def _open_engine(config: ServerConfig, metrics: ServerMetrics) -> AsyncIterator[Engine]:
    """The single node's engine over its data directory, or a cluster node's over JetStream."""
    if config.cluster is None:
        async with open_engine(config.engine, commit_observer=metrics.commit) as engine:
            yield engine
        return
    try:
        from engine.server.cluster import cluster_view, open_node_engine  # NATS only when asked for
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"cluster mode needs the cluster extra ({error.name} is missing): pip install 'soldout[cluster]'"
        ) from None

    async with open_node_engine(config, commit_observer=metrics.commit) as (engine, node):
        metrics.cluster_view = lambda: cluster_view(node)
        yield engine


@asynccontextmanager
async def open_server(config: ServerConfig, health: ServerHealth | None = None) -> AsyncIterator[RunningServer]:
    """Recover the engine, put the config's SKUs, serve the gateway; on exit shut down cleanly.

    The metrics endpoint (with /healthz and /readyz) listens first, so that an
    orchestrator sees the server starting (503 at /readyz) while journals are recovered.
    """
    config.check_bind_address()
    health = health or ServerHealth()
    metrics = ServerMetrics()
    # A failed start (a damaged journal, a refused SKU) and the caller's own exception
    # leave as themselves, not inside the nurseries' exception groups.
    failure: Exception | None = None
    async with trio.open_nursery() as beside:
        metrics_port = None
        if config.metrics_port is not None:
            endpoint = MetricsServer(
                {"/metrics": metrics.exposition, "/healthz": health.healthz, "/readyz": health.readyz},
                tokens=config.admin_tokens if config.metrics_token_required else None,
                request_seconds=config.limits.handshake_seconds_max,
                public_paths=frozenset({"/healthz", "/readyz"}),
            )
            metrics_port = await beside.start(endpoint.serve, config.metrics_host, config.metrics_port)
        health.metrics_port = metrics_port
        health.listening.set()
        try:
            started = time.perf_counter()
            async with _open_engine(config, metrics) as engine:
                recovery_seconds = time.perf_counter() - started
                await put_configured_skus(engine, config)
                gateway = Gateway(engine, config, metrics)
                # Before any nursery, so that a limit too low stops the start as a config error does.
                gateway.budget_sockets()
                refreshing = trio.CancelScope()

                async def refresh_metrics() -> None:
                    with refreshing:
                        await metrics.refresh_engine_view(engine)

                async with trio.open_nursery() as nursery:
                    port = await nursery.start(gateway.serve)
                    nursery.start_soon(refresh_metrics)
                    health.serving(engine)
                    try:
                        yield RunningServer(engine, gateway, metrics, config.host, port, metrics_port, recovery_seconds)
                    except Exception as error:
                        failure = error
                    finally:
                        # The gateway ends by itself once in-flight frames are answered.
                        health.stopping()
                        gateway.shutdown()
                        refreshing.cancel()
        except Exception as error:
            failure = failure or error
        beside.cancel_scope.cancel()
    if failure is not None:
        raise failure


def startup_summary(config: ServerConfig, server: RunningServer) -> str:
    """One line: shards, memory-only or durable, data directory, SKUs, holds recovered, replay time."""
    engine = config.engine
    if engine.data_dir is None:
        storage = "memory only"
    else:
        storage = f"{'durable' if engine.durable else 'journaled without fsync'}, data directory {engine.data_dir}"
    statistics = server.engine.statistics()
    skus = sum(shard.skus for shard in statistics.shards)
    return (
        f"soldout: {engine.shards} shards, {storage}, {skus:,} SKUs, {statistics.holds:,} holds recovered "
        f"in {server.recovery_seconds:.2f} s"
    )


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
                print(startup_summary(config, server), flush=True)
                print(f"soldout serving {server.url}", flush=True)
                if server.metrics_port is not None:
                    print(metrics_exposure(config, server.metrics_port), flush=True)
            async for received in signals:
                log.info("received %s: shutting down", signal.Signals(received).name)
                break
    if announce:
        print("soldout stopped", flush=True)
