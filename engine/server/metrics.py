"""The gateway's figures: plain counters for the `stats` op, exported to Prometheus.

Counting happens once per frame (requests are tallied in a local dict and added in
one step), so metrics stay off the per-request path. Per-SKU stock and engine
figures are read by a trio task into an immutable view that the scrape (a worker
thread, see engine/server/metrics_http.py) reads, so it never walks a book that a shard is
changing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.api import Engine, SkuCounts
from engine.shard import ShardStatistics

# A `_created` series beside every counter and histogram only clutters a dashboard.
disable_created_metrics()

HOLD_EVENTS = ("created", "confirmed", "cancelled", "expired")

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class ServerMetrics:
    """Counters of one server process; `stats()` gives them to an admin as plain data."""

    def __init__(self) -> None:
        # Set on a cluster node: the `cluster` map of the stats reply (absent on a single node).
        self.cluster_view: Callable[[], dict[str, Any]] | None = None
        self.registry = CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=self.registry)
        self.started_at = time.time()
        self.requests: dict[tuple[str, str], int] = {}
        self.frames_received = 0
        self.frames_sent = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.connections_open = 0
        self.connections_total = 0
        self.connections_refused = 0
        self.commits = 0
        self.commit_seconds_total = 0.0
        self.committed_commands = 0
        self._requests = Counter(
            "soldout_requests", "Requests answered, by op and status", ["op", "status"], registry=self.registry
        )
        self._reserve_latency = Histogram(
            "soldout_reserve_latency_seconds",
            "Time from a frame's arrival to its replies being queued, for frames holding reserves",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._frames = Counter("soldout_frames", "Websocket frames", ["direction"], registry=self.registry)
        self._bytes = Counter("soldout_bytes", "Payload bytes", ["direction"], registry=self.registry)
        self._connections = Gauge("soldout_connections", "Open websocket connections", registry=self.registry)
        self._connections_total = Counter(
            "soldout_connections_accepted", "Websocket connections accepted", registry=self.registry
        )
        self._connections_refused = Counter(
            "soldout_connections_refused", "Upgrade requests refused, by reason", ["reason"], registry=self.registry
        )
        self._commit_seconds = Histogram(
            "soldout_journal_commit_seconds",
            "Time to write (and fsync) one batch to a shard's journal",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._commit_batch = Histogram(
            "soldout_journal_commit_batch_commands",
            "Commands decided in one committed batch",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._frames_received = self._frames.labels("received")
        self._frames_sent = self._frames.labels("sent")
        self._bytes_received = self._bytes.labels("received")
        self._bytes_sent = self._bytes.labels("sent")
        self._request_children: dict[tuple[str, str], Any] = {}
        self._engine_view = EngineView()
        self.registry.register(self._engine_view)

    # Called from the gateway and the shards (all in the trio thread).

    def frame_received(self, size: int) -> None:
        self.frames_received += 1
        self.bytes_received += size
        self._frames_received.inc()
        self._bytes_received.inc(size)

    def frame_sent(self, size: int) -> None:
        self.frames_sent += 1
        self.bytes_sent += size
        self._frames_sent.inc()
        self._bytes_sent.inc(size)

    def answered(self, tally: dict[tuple[str, str], int]) -> None:
        requests = self.requests
        children = self._request_children
        for key, count in tally.items():
            requests[key] = requests.get(key, 0) + count
            child = children.get(key)
            if child is None:
                # labels() looks the child up under a lock: once per (op, status) is enough.
                child = children[key] = self._requests.labels(*key)
            child.inc(count)

    def reserve_latency(self, seconds: float) -> None:
        self._reserve_latency.observe(seconds)

    def connection_opened(self) -> None:
        self.connections_open += 1
        self.connections_total += 1
        self._connections.inc()
        self._connections_total.inc()

    def connection_closed(self) -> None:
        self.connections_open -= 1
        self._connections.dec()

    def connection_refused(self, reason: str) -> None:
        self.connections_refused += 1
        self._connections_refused.labels(reason).inc()

    def commit(self, shard: int, commands: int, records: int, seconds: float) -> None:
        self.commits += 1
        self.commit_seconds_total += seconds
        self.committed_commands += commands
        self._commit_seconds.observe(seconds)
        if commands:
            self._commit_batch.observe(commands)

    def stats(self, engine: Engine) -> dict[str, Any]:
        """The same figures Prometheus sees, as one msgpack-able map."""
        by_op: dict[str, dict[str, int]] = {}
        for (op, status), count in sorted(self.requests.items()):
            by_op.setdefault(op, {})[status] = count
        statistics = engine.statistics()
        return {
            "uptime_seconds": time.time() - self.started_at,
            "requests": by_op,
            "frames_received": self.frames_received,
            "frames_sent": self.frames_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "connections_open": self.connections_open,
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "journal_commits": self.commits,
            "journal_commit_seconds_total": self.commit_seconds_total,
            "journal_committed_commands": self.committed_commands,
            "shards": [
                {
                    "shard": shard.shard,
                    "batches": shard.batches,
                    "commands": shard.commands,
                    "holds": shard.holds,
                    "mailbox_used": shard.mailbox_used,
                    "snapshots": shard.snapshots,
                    "state": shard.state,
                    "faults": shard.faults,
                    "snapshot_failures": shard.snapshot_failures,
                }
                for shard in statistics.shards
            ],
            "skus": {
                counts.sku: {
                    "stock": counts.stock,
                    "available": counts.available,
                    "held": counts.held,
                    "sold": counts.sold,
                }
                for counts in engine.sku_counts()
            },
            **({"cluster": self.cluster_view()} if self.cluster_view is not None else {}),
        }

    async def refresh_engine_view(self, engine: Engine, interval_seconds: float = 1.0) -> None:
        """Keep the scrape's view of the engine fresh; runs until cancelled."""
        while True:
            self._engine_view.update(engine)
            await trio.sleep(interval_seconds)

    async def exposition(self) -> tuple[int, bytes, bytes]:
        """The Prometheus text format of every figure: (200, content type, body), for /metrics."""
        body = await trio.to_thread.run_sync(generate_latest, self.registry)
        return 200, CONTENT_TYPE_LATEST.encode(), body


class EngineView(Collector):
    """Per-SKU stock gauges and shard figures, as last copied by the trio thread."""

    def __init__(self) -> None:
        self._skus: tuple[SkuCounts, ...] = ()
        self._shards: tuple[ShardStatistics, ...] = ()

    def update(self, engine: Engine) -> None:
        self._skus = tuple(engine.sku_counts())
        self._shards = engine.statistics().shards

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        families = {
            name: GaugeMetricFamily(f"soldout_sku_{name}_units", f"Units of a SKU: {name}", labels=["sku"])
            for name in ("stock", "available", "held", "sold")
        }
        holds = {
            event: CounterMetricFamily(f"soldout_holds_{event}", f"Holds {event} since the SKU was put", labels=["sku"])
            for event in HOLD_EVENTS
        }
        for counts in self._skus:
            label = [counts.sku]
            families["stock"].add_metric(label, counts.stock)
            families["available"].add_metric(label, counts.available)
            families["held"].add_metric(label, counts.held)
            families["sold"].add_metric(label, counts.sold)
            holds["created"].add_metric(label, counts.holds_created)
            holds["confirmed"].add_metric(label, counts.holds_confirmed)
            holds["cancelled"].add_metric(label, counts.holds_cancelled)
            holds["expired"].add_metric(label, counts.holds_expired)
        yield from families.values()
        yield from holds.values()
        mailbox = GaugeMetricFamily(
            "soldout_shard_mailbox_used", "Batches of commands waiting in a shard's mailbox", labels=["shard"]
        )
        unavailable = GaugeMetricFamily(
            "soldout_shard_unavailable", "1 while a shard cannot commit and answers unavailable", labels=["shard"]
        )
        faults = CounterMetricFamily("soldout_shard_faults", "Journal commits that failed", labels=["shard"])
        for shard in self._shards:
            label = [str(shard.shard)]
            mailbox.add_metric(label, shard.mailbox_used)
            unavailable.add_metric(label, 0 if shard.state == "serving" else 1)
            faults.add_metric(label, shard.faults)
        yield mailbox
        yield unavailable
        yield faults
