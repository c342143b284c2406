"""Benchmark reports: plain-text tables (no colours, no terminal tricks, so a report pastes
into a note or a CI log as it printed), the merge of the driver processes' results (HDR
histograms travel encoded and are added up here), the summary of a run, the ratios
between targets of the same run, the spread of a figure over `--repeat` runs, the JSON
report and the optional PNG chart (matplotlib, imported only when a chart is asked for).

Figures and ratios only: no target, no "met". What a figure should reach is for the
README and the notes, not for this code.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from bench.checks import Check, Observed
from bench.driver import BUCKET_SECONDS, DriverResult, new_histogram


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right_aligned: Sequence[int] = ()) -> str:
    """The rows under their headers, columns padded to fit; `right_aligned` lists
    the columns (by index) that hold numbers."""
    widths = [len(header) for header in headers]
    for row in rows:
        assert len(row) == len(headers), f"a row has {len(row)} cells for {len(headers)} columns"
        for column, cell in enumerate(row):
            widths[column] = max(widths[column], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(widths[column]) if column in right_aligned else cell.ljust(widths[column])
            for column, cell in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def rate(value: float) -> str:
    return f"{value:,.0f}"


def mebibytes(kibibytes: int) -> str:
    return f"{kibibytes / 1024:,.0f}"


def milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


# ---------------------------------------------------------------- one bench run

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# The latency distribution kept in the JSON report and drawn in the chart.
DISTRIBUTION_PERCENTILES = (0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0)


@dataclass
class Merged:
    """Every driver process's result, added up."""

    statuses: dict[str, dict[str, int]]
    histogram: HdrHistogram
    answered_per_bucket: list[int]
    held_per_bucket: list[int]
    ok_per_bucket: list[int]
    sold_out_per_bucket: list[int]
    remaining_per_bucket: list[int | None]
    first_send_at: float | None
    last_answer_at: float | None
    crowd_answered_at: float | None
    sold_out_at: dict[int, float]
    observed: Observed
    sent: int
    busy_retries: int
    client_cpu_seconds: float
    errors: list[str]
    # Requests sent again after an `unavailable` answer; connections opened again after a
    # gateway was lost, and the requests they sent again.
    unavailable_retries: int = 0
    reconnects: int = 0
    resent_after_loss: int = 0

    @property
    def answered(self) -> int:
        statuses = sum(sum(counts.values()) for counts in self.statuses.values())
        return statuses - self.busy_retries - self.unavailable_retries

    @property
    def elapsed_seconds(self) -> float | None:
        if self.first_send_at is None or self.last_answer_at is None:
            return None
        return max(self.last_answer_at - self.first_send_at, 1e-9)


def merge(results: Sequence[DriverResult]) -> Merged:
    histogram = new_histogram()
    statuses: dict[str, dict[str, int]] = {}
    answered_per_bucket: list[int] = []
    held_per_bucket: list[int] = []
    ok_per_bucket: list[int] = []
    sold_out_per_bucket: list[int] = []
    remaining_per_bucket: list[int | None] = []
    sold_out_at: dict[int, float] = {}
    holds: list[tuple[int, int, str]] = []
    confirmed: dict[int, int] = {}
    cancelled: dict[int, int] = {}
    errors: list[str] = []
    for result in results:
        histogram.add(HdrHistogram.decode(result.histogram))
        for op, counts in result.statuses.items():
            merged = statuses.setdefault(op, {})
            for status, count in counts.items():
                merged[status] = merged.get(status, 0) + count
        _add_into(answered_per_bucket, result.answered_per_bucket)
        _add_into(held_per_bucket, result.held_per_bucket)
        _add_into(ok_per_bucket, result.ok_per_bucket)
        _add_into(sold_out_per_bucket, result.sold_out_per_bucket)
        _fewest_into(remaining_per_bucket, result.remaining_per_bucket)
        for sku, at in result.sold_out_at.items():
            sold_out_at[sku] = min(at, sold_out_at.get(sku, at))
        holds.extend(result.holds)
        for sku, units in result.confirmed.items():
            confirmed[sku] = confirmed.get(sku, 0) + units
        for sku, units in result.cancelled.items():
            cancelled[sku] = cancelled.get(sku, 0) + units
        errors.extend(f"driver {result.index}: {error}" for error in result.errors)
    observed = Observed(
        holds=holds,
        confirmed=confirmed,
        cancelled=cancelled,
        crowd_buyers=sum(result.crowd_buyers for result in results),
        crowd_answered=sum(result.crowd_answered for result in results),
        unsent_buyers=sum(result.unsent_buyers for result in results),
        unanswered=sum(result.unanswered for result in results),
        unavailable_unresolved=sum(result.unavailable_unresolved for result in results),
    )
    return Merged(
        statuses={op: counts for op, counts in statuses.items() if counts},
        histogram=histogram,
        answered_per_bucket=answered_per_bucket,
        held_per_bucket=held_per_bucket,
        ok_per_bucket=ok_per_bucket,
        sold_out_per_bucket=sold_out_per_bucket,
        remaining_per_bucket=remaining_per_bucket,
        first_send_at=_earliest(result.first_send_at for result in results),
        last_answer_at=_latest(result.last_answer_at for result in results),
        crowd_answered_at=_latest(result.crowd_answered_at for result in results),
        sold_out_at=sold_out_at,
        observed=observed,
        sent=sum(result.sent for result in results),
        busy_retries=sum(result.busy_retries for result in results),
        client_cpu_seconds=sum(result.cpu_seconds for result in results),
        errors=errors,
        unavailable_retries=sum(result.unavailable_retries for result in results),
        reconnects=sum(result.reconnects for result in results),
        resent_after_loss=sum(result.resent_after_loss for result in results),
    )


def _add_into(total: list[int], values: Sequence[int]) -> None:
    if len(total) < len(values):
        total.extend([0] * (len(values) - len(total)))
    for index, value in enumerate(values):
        total[index] += value


def _fewest_into(fewest: list[int | None], values: Sequence[int | None]) -> None:
    if len(fewest) < len(values):
        fewest.extend([None] * (len(values) - len(fewest)))
    for index, value in enumerate(values):
        current = fewest[index]
        if value is not None and (current is None or value < current):
            fewest[index] = value


def _earliest(values: Any) -> float | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None


def _latest(values: Any) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


@dataclass
class RunReport:
    """One run against one target: the figures and the end checks."""

    label: str  # e.g. "soldout memory", "redis durable"
    target: str
    storage: str
    scenario: str
    sku_count: int
    total_stock: int
    buyers: int
    merged: Merged
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # CPU the server spent during the run, when the bench can read it (a server it
    # started, or any Redis): on a shared machine, a steadier figure than wall time.
    server_cpu_seconds: float | None = None
    # Every core's busy time over the run, so the rest of the machine's work shows.
    machine_cpu_seconds: float | None = None
    # (seconds since the run started, KiB) of a server the bench started.
    rss_samples_kibibytes: list[tuple[float, int]] = field(default_factory=list)
    # The load each connection carried: requests per frame (pipeline) and in flight.
    connections: int | None = None
    batch: int | None = None
    inflight_per_connection: int | None = None
    # The journal's commits over the run (journal_figures), from the server's stats.
    journal: dict[str, Any] | None = None
    # A cluster run: CPU seconds by role ("owner", "gateway", "nats"), its nodes and owners,
    # and the kill of an owner when there was one.
    role_cpu_seconds: dict[str, float] = field(default_factory=dict)
    cluster: dict[str, Any] | None = None
    failover: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks) and not self.merged.errors

    def summary(self) -> dict[str, Any]:
        """The run's figures, as the JSON report and the table show them."""
        merged = self.merged
        histogram = merged.histogram
        elapsed = merged.elapsed_seconds
        start = merged.first_send_at
        reserve = merged.statuses.get("reserve", {})
        sold_out_after = None
        if start is not None and len(merged.sold_out_at) == self.sku_count:
            sold_out_after = max(merged.sold_out_at.values()) - start
        all_answered_after = None
        if start is not None and merged.crowd_answered_at is not None:
            all_answered_after = merged.crowd_answered_at - start
        latency = {f"p{percentile:g}": _ms(histogram.get_value_at_percentile(percentile)) for percentile in PERCENTILES}
        latency["max"] = _ms(histogram.get_max_value())
        latency["mean"] = round(histogram.get_mean_value() / 1000, 3)
        reserves = sum(reserve.values())
        server_cpu = self.server_cpu_seconds
        other_cpu = None
        if self.machine_cpu_seconds is not None:
            spent = (server_cpu or 0.0) + merged.client_cpu_seconds
            other_cpu = round(max(0.0, self.machine_cpu_seconds - spent), 3)
        return {
            "label": self.label,
            "target": self.target,
            "storage": self.storage,
            "scenario": self.scenario,
            "skus": self.sku_count,
            "stock": self.total_stock,
            "buyers": self.buyers,
            "requests_sent": merged.sent,
            "requests_answered": merged.answered,
            "busy_retries": merged.busy_retries,
            "unavailable_retries": merged.unavailable_retries,
            "unavailable_unresolved": merged.observed.unavailable_unresolved,
            "reconnects": merged.reconnects,
            "resent_after_reconnect": merged.resent_after_loss,
            "buyers_not_sent": merged.observed.unsent_buyers,
            "server_cpu_seconds": None if self.server_cpu_seconds is None else round(self.server_cpu_seconds, 3),
            "server_cpu_microseconds_per_request": (
                round(server_cpu * 1e6 / merged.answered, 2) if server_cpu is not None and merged.answered else None
            ),
            "server_cpu_microseconds_per_reserve": (
                round(server_cpu * 1e6 / reserves, 2) if server_cpu is not None and reserves else None
            ),
            # Busy CPU of the machine over the run that was neither the server's nor the drivers'.
            "other_cpu_seconds": other_cpu,
            "connections": self.connections,
            "batch": self.batch,
            "inflight_per_connection": self.inflight_per_connection,
            # What the load cost the driver processes: a client near a core per process is the limit.
            "client_cpu_seconds": round(merged.client_cpu_seconds, 3),
            "client_cpu_microseconds_per_request": (
                round(merged.client_cpu_seconds * 1e6 / merged.answered, 2) if merged.answered else None
            ),
            "elapsed_seconds": elapsed,
            "throughput_per_second": merged.answered / elapsed if elapsed else 0.0,
            "reserves_per_second": reserves / elapsed if elapsed else 0.0,
            "latency_ms": latency,
            "latency_distribution_ms": {
                f"{percentile:g}": _ms(histogram.get_value_at_percentile(percentile))
                for percentile in DISTRIBUTION_PERCENTILES
            },
            "sold_out_after_ms": None if sold_out_after is None else sold_out_after * 1000,
            "all_answered_after_ms": None if all_answered_after is None else all_answered_after * 1000,
            "statuses": merged.statuses,
            "timeline": {
                "bucket_seconds": BUCKET_SECONDS,
                "answered": merged.answered_per_bucket,
                "ok": merged.ok_per_bucket,
                "sold_out": merged.sold_out_per_bucket,
                "units_left": self.units_left(),
            },
            "server_rss": rss_figures(self.rss_samples_kibibytes),
            "journal": self.journal,
            "cpu_by_role": {
                role: {
                    "seconds": round(seconds, 3),
                    "microseconds_per_reserve": round(seconds * 1e6 / reserves, 2) if reserves else None,
                }
                for role, seconds in self.role_cpu_seconds.items()
            },
            "cluster": self.cluster,
            "failover": self.failover,
            "checks": [{"name": check.name, "passed": check.passed, "detail": check.detail} for check in self.checks],
            "errors": merged.errors,
            "notes": self.notes,
        }

    def units_left(self) -> list[int]:
        """Units left at the end of each time bucket.

        With one SKU, the fewest the server's own ok replies reported (`remaining`), so
        units given back by expiry show; with many, the stock less what ok reserves took and ok
        cancels gave back (exact where no hold ends during the run, as in catalog).
        """
        merged = self.merged
        if self.sku_count == 1:
            return remaining_left(self.total_stock, merged.remaining_per_bucket, len(merged.held_per_bucket))
        return units_left(self.total_stock, merged.held_per_bucket)


def _ms(microseconds: float) -> float:
    return round(microseconds / 1000, 3)


def remaining_left(stock: int, remaining_per_bucket: Sequence[int | None], buckets: int) -> list[int]:
    """The fewest units left reported in each bucket, carried over buckets without an ok reserve."""
    left = []
    current = stock
    for index in range(buckets):
        reported = remaining_per_bucket[index] if index < len(remaining_per_bucket) else None
        if reported is not None:
            current = reported
        left.append(current)
    return left


def units_left(total_stock: int, held_per_bucket: Sequence[int]) -> list[int]:
    """The stock less units taken by ok reserves and given back by ok cancels, bucket by bucket."""
    left = []
    remaining = total_stock
    for held in held_per_bucket:
        remaining -= held
        left.append(remaining)
    return left


# ---------------------------------------------------------------- tables

RUN_HEADERS = (
    "run",
    "requests",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "sold out ms",
    "all answered ms",
    "checks",
)


def run_row(summary: dict[str, Any], passed: bool) -> list[str]:
    latency = summary["latency_ms"]
    return [
        summary["label"],
        f"{summary['requests_answered']:,}",
        rate(summary["throughput_per_second"]),
        milliseconds(latency["p50"]),
        milliseconds(latency["p90"]),
        milliseconds(latency["p99"]),
        milliseconds(latency["p99.9"]),
        milliseconds(latency["max"]),
        milliseconds(summary["sold_out_after_ms"]),
        milliseconds(summary["all_answered_after_ms"]),
        "passed" if passed else "FAILED",
    ]


def runs_table(runs: Sequence[RunReport]) -> str:
    rows = [run_row(run.summary(), run.passed) for run in runs]
    return format_table(RUN_HEADERS, rows, right_aligned=range(1, 10))


def statuses_line(summary: dict[str, Any]) -> str:
    parts = []
    for op, counts in summary["statuses"].items():
        shown = ", ".join(f"{status} {count:,}" for status, count in sorted(counts.items(), key=lambda item: -item[1]))
        parts.append(f"{op}: {shown}")
    return "; ".join(parts)


def journal_figures(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The commits between two readings of the stats of the same servers (journal_commits,
    journal_commit_seconds_total, journal_committed_commands): None when there were none."""

    def total(readings: Sequence[dict[str, Any]], name: str) -> float:
        return float(sum(reading.get(name, 0) for reading in readings))

    commits = total(after, "journal_commits") - total(before, "journal_commits")
    if commits <= 0:
        return None
    seconds = total(after, "journal_commit_seconds_total") - total(before, "journal_commit_seconds_total")
    commands = total(after, "journal_committed_commands") - total(before, "journal_committed_commands")
    return {
        "commits": int(commits),
        "commit_seconds": round(seconds, 4),
        "mean_commit_ms": round(seconds * 1000 / commits, 3),
        "commands_per_commit": round(commands / commits, 1),
    }


def journal_line(summary: dict[str, Any]) -> str | None:
    figures = summary["journal"]
    if figures is None:
        return None
    kind = f" ({figures['kind']})" if figures.get("kind") else ""
    return (
        f"journal{kind}: {figures['commits']:,} commits, mean {figures['mean_commit_ms']:,.2f} ms per commit, "
        f"{figures['commands_per_commit']:,.1f} commands per commit"
    )


ROLE_NAMES = {
    "node": "nodes (gateway + owner)",
    "gateway": "gateway side (the crowd's nodes)",
    "owner": "owner side (the hot shard's node)",
    "nats": "nats-server processes",
}


def role_cpu_line(summary: dict[str, Any]) -> str | None:
    """Each role's CPU seconds and CPU per reserve; an owner that also takes the crowd is
    named for both."""
    roles = summary["cpu_by_role"]
    if not roles:
        return None
    names = ROLE_NAMES
    parts = []
    for role, figures in roles.items():
        per = figures["microseconds_per_reserve"]
        shown = "-" if per is None else f"{per:,.1f} us/reserve"
        parts.append(f"{names.get(role, role)} {figures['seconds']:,.1f} s ({shown})")
    return "CPU by role: " + ", ".join(parts)


def cluster_line(summary: dict[str, Any]) -> str | None:
    """The nodes of a cluster run, their roles, and which took the crowd."""
    cluster = summary["cluster"]
    if cluster is None:
        return None
    nodes = ", ".join(
        f"{node['name']} ({node['role']}{', the crowd' if node['name'] in cluster['crowd_nodes'] else ''}) "
        f"{node['url']}"
        for node in cluster["nodes"]
    )
    shards, lease = cluster["shards"], cluster["lease_seconds"]
    return f"3 NATS servers (JetStream, R3) and nodes {nodes}; {shards} shards, lease {lease:g} s"


def failover_lines(summary: dict[str, Any]) -> list[str]:
    figures = summary["failover"]
    if figures is None:
        return []

    def owners(by_node: dict[str, list[int]] | None) -> str:
        if by_node is None:
            return "unknown"
        return "; ".join(f"{node} shards {','.join(map(str, shards))}" for node, shards in by_node.items())

    lines = [
        f"killed {figures['killed_node']} (kill -9) {figures['killed_after_seconds']:g} s into the run; "
        f"it owned shards {','.join(map(str, figures['its_shards']))} (the hot SKU's: {figures['hot_shard']})",
        f"owners before: {owners(figures['owners_before'])}",
        f"owners after:  {owners(figures['owners_after'])}",
    ]
    hot, every = figures["hot_shard_answered_after_ms"], figures["all_its_shards_answered_after_ms"]
    if hot is not None:
        probes = ", ".join(f"{status} {count:,}" for status, count in sorted(figures["probe_statuses"].items()))
        lines.append(
            f"failover: the hot SKU's shard answered again {hot:,.0f} ms after the kill, all its shards "
            f"after {every:,.0f} ms (probe replies: {probes})"
        )
    if figures["error"]:
        lines.append(f"failover probe: {figures['error']}")
    return lines


def retries_line(summary: dict[str, Any]) -> str | None:
    """What the crowd sent again: after `unavailable`, and after a lost connection; None when nothing."""
    if not (summary["unavailable_retries"] or summary["unavailable_unresolved"] or summary["reconnects"]):
        return None
    unavailable = summary["statuses"].get("reserve", {}).get("unavailable", 0)
    return (
        f"unavailable {unavailable:,} replies, {summary['unavailable_retries']:,} sent again with their keys, "
        f"{summary['unavailable_unresolved']:,} still unavailable after the last try; "
        f"{summary['reconnects']:,} connections opened again at another gateway, "
        f"{summary['resent_after_reconnect']:,} requests sent again there"
    )


def cpu_line(summary: dict[str, Any]) -> str:
    """CPU time of the server, of the drivers and of the rest of the machine, per request:
    steadier than rates on a busy machine."""
    parts = []
    if summary["server_cpu_seconds"] is not None:
        per_request = _per_request(summary["server_cpu_microseconds_per_request"])
        parts.append(f"server CPU {summary['server_cpu_seconds']:,.1f} s ({per_request})")
    per_request = _per_request(summary["client_cpu_microseconds_per_request"])
    parts.append(f"drivers' CPU {summary['client_cpu_seconds']:,.1f} s ({per_request})")
    if summary["other_cpu_seconds"] is not None:
        parts.append(f"the rest of the machine {summary['other_cpu_seconds']:,.1f} s")
    return f"{', '.join(parts)}, over {summary['elapsed_seconds'] or 0:,.1f} s"


def _per_request(microseconds: float | None) -> str:
    return "-" if microseconds is None else f"{microseconds:,.1f} us per request"


def load_line(summary: dict[str, Any]) -> str:
    return (
        f"{summary['connections']} connections, {summary['batch']} requests per frame/pipeline, "
        f"{summary['inflight_per_connection']} in flight per connection"
    )


def rss_figures(samples: Sequence[tuple[float, int]]) -> dict[str, Any] | None:
    """The server's RSS at the start, once settled (after a fifth of the run, at most 30 s),
    at the end and at its peak, and its growth from settled to the end."""
    if not samples:
        return None
    duration = samples[-1][0]
    settle_at = min(30.0, duration / 5)
    settled = next((rss for moment, rss in samples if moment >= settle_at), samples[-1][1])
    end = samples[-1][1]
    return {
        "start_kibibytes": samples[0][1],
        "settled_kibibytes": settled,
        "end_kibibytes": end,
        "peak_kibibytes": max(rss for _, rss in samples),
        "growth_kibibytes": end - settled,
        "growth_share": (end - settled) / settled if settled else None,
    }


def rss_line(summary: dict[str, Any]) -> str | None:
    figures = summary["server_rss"]
    if figures is None:
        return None
    growth = figures["growth_share"]
    share = "" if growth is None else f" ({growth:+.1%})"
    return (
        f"server RSS start {mebibytes(figures['start_kibibytes'])} MiB, settled "
        f"{mebibytes(figures['settled_kibibytes'])} MiB, end {mebibytes(figures['end_kibibytes'])} MiB, peak "
        f"{mebibytes(figures['peak_kibibytes'])} MiB; settled to end {figures['growth_kibibytes']:+,} KiB{share}"
    )


def human_summary(report: RunReport) -> str:
    """One sentence on how the sale went, for people rather than spreadsheets."""
    summary = report.summary()
    reserve = summary["statuses"].get("reserve", {})
    sold_out = summary["sold_out_after_ms"]
    answered = summary["all_answered_after_ms"]
    passed = sum(1 for check in report.checks if check.passed)
    verdict = (
        f"all {passed} invariant checks passed"
        if report.passed
        else f"{len(report.checks) - passed} of {len(report.checks)} checks FAILED"
    )
    speed = f"{summary['throughput_per_second']:,.0f} requests/s, p99 {summary['latency_ms']['p99']:,.1f} ms"
    if report.target == "echo":
        return f"{report.label}: {summary['requests_answered']:,} requests echoed; {speed}; {verdict}"
    return (
        f"{report.label}: {report.total_stock:,} units, {report.buyers:,} buyers, {reserve.get('ok', 0):,} holds; "
        + (f"sold out after {sold_out:,.0f} ms, " if sold_out is not None else "not sold out, ")
        + (f"every buyer answered after {answered:,.0f} ms; " if answered is not None else "")
        + f"{speed}; {verdict}"
    )


def ratio(soldout: RunReport, peer: RunReport) -> dict[str, float | None]:
    """soldout / peer for throughput (higher is better), p99 latency and server CPU per
    reserve (lower is better)."""
    ours, theirs = soldout.summary(), peer.summary()

    def divided(mine: float | None, other: float | None) -> float | None:
        return mine / other if mine is not None and other else None

    return {
        "throughput": divided(ours["throughput_per_second"], theirs["throughput_per_second"]),
        "p99": divided(ours["latency_ms"]["p99"], theirs["latency_ms"]["p99"]),
        "server_cpu_per_reserve": divided(
            ours["server_cpu_microseconds_per_reserve"], theirs["server_cpu_microseconds_per_reserve"]
        ),
    }


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio_line(soldout: RunReport, peer: RunReport) -> str:
    figures = ratio(soldout, peer)
    ours, theirs = soldout.summary(), peer.summary()
    if peer.target == "echo":
        share = "-" if figures["throughput"] is None else f"{figures['throughput']:.0%}"
        return (
            f"{soldout.label}: {share} of the echo server's rate in the same run "
            f"({rate(ours['throughput_per_second'])}/s of {rate(theirs['throughput_per_second'])}/s, "
            f"at {soldout.batch}/frame)"
        )
    line = (
        f"{soldout.label} / {peer.label}: throughput {_times(figures['throughput'])} (higher is better), "
        f"p99 latency {_times(figures['p99'])} (lower is better)"
    )
    mine, other = ours["server_cpu_microseconds_per_reserve"], theirs["server_cpu_microseconds_per_reserve"]
    if mine is not None and other is not None:
        line += (
            f"; server CPU per reserve {mine:,.1f} us / {other:,.1f} us = "
            f"{_times(figures['server_cpu_per_reserve'])} (lower is better)"
        )
    return line


def json_report(settings: dict[str, Any], runs: Sequence[RunReport]) -> str:
    document: dict[str, Any] = {"settings": settings, "runs": [run.summary() for run in runs]}
    soldout = [run for run in runs if run.target == "soldout"]
    peers = [run for run in runs if run.target != "soldout"]
    if soldout and peers:
        document["ratio"] = ratio(soldout[0], peers[0])
    document["passed"] = all(run.passed for run in runs)
    return json.dumps(document, indent=2)


# ---------------------------------------------------------------- the spread of repeated runs

# (name, unit, how to read it from a summary)
SPREAD_FIGURES: tuple[tuple[str, str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("throughput", "req/s", lambda summary: summary["throughput_per_second"]),
    ("p50 latency", "ms", lambda summary: summary["latency_ms"]["p50"]),
    ("p99 latency", "ms", lambda summary: summary["latency_ms"]["p99"]),
    ("server CPU per reserve", "us", lambda summary: summary["server_cpu_microseconds_per_reserve"]),
    ("drivers' CPU per request", "us", lambda summary: summary["client_cpu_microseconds_per_request"]),
    ("sold out after", "ms", lambda summary: summary["sold_out_after_ms"]),
)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, lowest, highest, and the range as a share of the median."""
    assert values
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {"median": median, "min": low, "max": high, "spread": (high - low) / median if median else 0.0}


def _figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def spread_table(runs: Sequence[RunReport]) -> str:
    """Each figure of each target over its repeated runs: median, min, max, spread."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run.summary())
    rows = []
    for label, summaries in by_label.items():
        for name, unit, read in SPREAD_FIGURES:
            values = [value for value in (read(summary) for summary in summaries) if value is not None]
            if not values:
                continue
            figures = spread(values)
            rows.append(
                [
                    label,
                    f"{name} ({unit})",
                    str(len(values)),
                    _figure(figures["median"]),
                    _figure(figures["min"]),
                    _figure(figures["max"]),
                    f"{figures['spread']:.0%}",
                ]
            )
    headers = ("run", "figure", "runs", "median", "min", "max", "spread")
    return format_table(headers, rows, right_aligned=range(2, 7))


def ratio_spread_line(pairs: Sequence[tuple[RunReport, RunReport]]) -> str | None:
    """The soldout/peer ratios over repeated runs (one pair per repeat)."""
    if len(pairs) < 2:
        return None
    soldout, peer = pairs[0]
    parts = []
    for name in ("throughput", "p99", "server_cpu_per_reserve"):
        values = [value for value in (ratio(mine, theirs)[name] for mine, theirs in pairs) if value is not None]
        if values:
            figures = spread(values)
            parts.append(
                f"{name.replace('_', ' ')} {figures['median']:.2f}x ({figures['min']:.2f}-{figures['max']:.2f})"
            )
    return f"{soldout.label} / {peer.label} over {len(pairs)} runs, median (range): " + ", ".join(parts)


# ---------------------------------------------------------------- the chart


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


PLOT_MISSING = (
    "--plot needs matplotlib, which is not installed: pip install 'soldout[plot]' (or pip install matplotlib)"
)
SOLD_OUT_LABEL = "sold out"


def chart(runs: Sequence[RunReport], title: str) -> Any:
    """The figure: units left (the sell-out moment marked), ok and sold_out replies per
    second as separate series, and the latency distribution; titled with `title`, the
    scenario's settings. The caller saves and closes it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(PLOT_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    figure, (units_axes, rate_axes, latency_axes) = pyplot.subplots(3, 1, figsize=(9, 12))
    figure.suptitle(title, wrap=True, fontsize=9)
    for number, run in enumerate(runs):
        summary = run.summary()
        distribution = summary["latency_distribution_ms"]
        percentiles = [float(percentile) for percentile in distribution]
        # The usual HDR view: x = 1 / (1 - percentile), so the tail gets the room.
        positions = [1 / (1 - min(percentile, 99.9999) / 100) for percentile in percentiles]
        (line,) = latency_axes.plot(positions, list(distribution.values()), marker="o", label=run.label)
        if run.target == "echo":
            continue  # it sells nothing: only its latency is drawn
        colour = line.get_color()
        timeline = summary["timeline"]
        # Units left at the start and at each bucket's end; rates at each bucket's middle.
        ends = [(index + 1) * BUCKET_SECONDS for index in range(len(timeline["units_left"]))]
        units_axes.plot([0.0, *ends], [run.total_stock, *timeline["units_left"]], color=colour, label=run.label)
        middles = [(index + 0.5) * BUCKET_SECONDS for index in range(len(timeline["ok"]))]
        ok = [count / BUCKET_SECONDS for count in timeline["ok"]]
        sold_out = [count / BUCKET_SECONDS for count in timeline["sold_out"]]
        rate_axes.plot(middles, ok, color=colour, marker=".", label=f"{run.label}: ok")
        rate_axes.plot(middles, sold_out, color=colour, linestyle=":", marker=".", label=f"{run.label}: sold_out")
        sold_out_ms = summary["sold_out_after_ms"]
        if sold_out_ms is not None:
            moment = sold_out_ms / 1000
            for axes in (units_axes, rate_axes):
                axes.axvline(moment, color=colour, linestyle="--", label=f"{run.label}: {SOLD_OUT_LABEL}")
            units_axes.annotate(
                f"{run.label}: {SOLD_OUT_LABEL} at {moment:.3f} s",
                (moment, run.total_stock),
                textcoords="offset points",
                xytext=(4, -12 * (number + 1)),
                fontsize=8,
            )
    units_axes.set(title="units left", xlabel="seconds", ylabel="units")
    rate_axes.set(title="reserve replies per second, ok and sold_out", xlabel="seconds", ylabel="replies/s")
    latency_axes.set(title="latency by percentile", ylabel="ms", xscale="log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000, 1000000]
    latency_axes.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%", "max"])
    for axes in (units_axes, rate_axes, latency_axes):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot(runs: Sequence[RunReport], path: str, title: str = "") -> None:
    """The chart as a PNG at `path`."""
    figure = chart(runs, title)
    import matplotlib.pyplot as pyplot

    figure.savefig(path, dpi=100)
    pyplot.close(figure)
