"""The end checks of a bench run: was anything oversold, did any buyer get more than the
limit, was any hold given twice, did every buyer get an answer (and for the echo
ceiling: did every request come back as it went).

Checks are about correctness only. How fast a run was is a figure the report prints;
no speed is ever judged here.

They compare what the drivers were told (every `ok` hold, every confirm and cancel)
with what the server itself reports at the end (`stock` per SKU, and soldout's
`stats`). Pure functions over plain data, so the tests can hand them a fabricated,
oversold result and watch them fail.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.scenarios import Scenario, buyer_name
from bench.targets import ECHOED

# What a crowd of distinct buyers on an open SKU may be answered (`busy` and `unavailable`
# are sent again with their keys).
CROWD_STATUSES = frozenset({"ok", "sold_out", "busy", "unavailable"})
# How many offending SKUs, buyers or ids a failed check names.
EXAMPLES_MAX = 5


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Counts:
    """One SKU's counts as the server reports them."""

    stock: int
    available: int
    held: int
    sold: int


@dataclass(frozen=True)
class Observed:
    """What the drivers were told, merged over every driver process."""

    # (SKU index, buyer number, reservation) of every ok reserve.
    holds: Sequence[tuple[int, int, str]]
    # SKU index -> units of ok confirms / ok cancels.
    confirmed: Mapping[int, int]
    cancelled: Mapping[int, int]
    crowd_buyers: int
    crowd_answered: int
    unsent_buyers: int
    unanswered: int
    # Requests still `unavailable` after their last try: their outcome is unknown.
    unavailable_unresolved: int = 0


def check_run(
    scenario: Scenario,
    demand: Sequence[int],
    observed: Observed,
    counts: Sequence[Counts | None],
    *,
    holds_expired: bool = False,
    stats_skus: Mapping[str, Mapping[str, Any]] | None = None,
    stats_reserve_ok: int | None = None,
    baseline: Sequence[Counts | None] | None = None,
    reserve_statuses: Mapping[str, int] | None = None,
) -> list[Check]:
    """Every check that applies to this run, passed or not.

    `demand[i]` is how many buyers tried SKU i. `counts[i]` is the server's `stock`
    reply for SKU i (None when it does not know the SKU). `holds_expired` says every
    hold of the run is past its expiry (checkout waits for that before reading the
    counts). `stats_skus` is soldout's `stats` per SKU; `stats_reserve_ok` is how many
    reserves the server's stats counted `ok` during the run. `baseline` holds the counts
    before the run of a SKU the server already had: its holds from before may end during
    the run, so the run is checked by what it added (ok replies within what was available,
    confirms against the units sold since) rather than by totals. `reserve_statuses` counts
    the reserve replies by status: a crowd of distinct buyers, each trying once for one
    unit of an open SKU the bench put, can only be answered ok, sold_out or busy.
    """
    skus = scenario.skus
    assert len(demand) == len(skus) == len(counts)
    ok_per_sku = Counter(sku for sku, _, _ in observed.holds)
    checks = []

    unknown = [skus[index].sku for index, count in enumerate(counts) if count is None]
    checks.append(_check("the server knows every SKU", not unknown, f"unknown: {_examples(unknown)}"))
    known = [(index, count) for index, count in enumerate(counts) if count is not None]

    oversold = [
        f"{skus[index].sku}: held {count.held} + sold {count.sold} > stock {count.stock}"
        for index, count in known
        if count.held + count.sold > count.stock
    ]
    checks.append(_check("held + sold <= stock", not oversold, _examples(oversold)))

    if baseline is not None:
        checks += _checks_against_baseline(scenario, ok_per_sku, observed, counts, baseline)
    elif not scenario.holds_end:
        # Nothing gives units back, so the ok replies are exactly the units held.
        over_ok = [
            f"{plan.sku}: {ok_per_sku[index]} ok for a stock of {plan.stock}"
            for index, plan in enumerate(skus)
            if ok_per_sku[index] > plan.stock
        ]
        checks.append(_check("ok replies <= stock", not over_ok, _examples(over_ok)))
        mismatched = [
            f"{skus[index].sku}: server holds {count.held + count.sold}, drivers were told ok {ok_per_sku[index]}"
            for index, count in known
            if count.held + count.sold != ok_per_sku[index]
        ]
        checks.append(_check("held + sold == ok replies", not mismatched, _examples(mismatched)))
        if observed.unsent_buyers == 0 and observed.unanswered == 0:
            short = [
                f"{skus[index].sku}: held + sold {count.held + count.sold}, "
                f"expected {min(count.stock, demand[index])} (stock {count.stock}, demand {demand[index]})"
                for index, count in known
                if count.held + count.sold != min(count.stock, demand[index])
            ]
            checks.append(_check("held + sold == stock where demand exceeds it", not short, _examples(short)))
    else:
        unsold = [
            f"{skus[index].sku}: sold {count.sold}, confirmed ok {observed.confirmed.get(index, 0)}"
            for index, count in known
            if count.sold != observed.confirmed.get(index, 0)
        ]
        checks.append(_check("sold == ok confirms", not unsold, _examples(unsold)))
        if holds_expired:
            lingering = [f"{skus[index].sku}: held {count.held}" for index, count in known if count.held != 0]
            checks.append(_check("no hold outlives its expiry", not lingering, _examples(lingering)))

    per_buyer = Counter((sku, buyer) for sku, buyer, _ in observed.holds)
    over_limit = [
        f"{buyer_name(buyer)} holds {units} of {skus[sku].sku} (limit {skus[sku].per_buyer_limit})"
        for (sku, buyer), units in per_buyer.items()
        if units > skus[sku].per_buyer_limit
    ]
    checks.append(_check("no buyer over the limit", not over_limit, _examples(over_limit)))

    reservations = Counter(reservation for _, _, reservation in observed.holds)
    duplicates = [f"{reservation} x{times}" for reservation, times in reservations.items() if times > 1]
    checks.append(_check("every ok reservation id distinct", not duplicates, _examples(duplicates)))

    missing = observed.crowd_buyers - observed.unsent_buyers - observed.crowd_answered
    detail = f"{missing} buyers sent but without an answer"
    if observed.unsent_buyers:
        detail += f" ({observed.unsent_buyers} never sent: the duration cap came first)"
    checks.append(_check("every buyer sent got an answer", missing == 0 and observed.unanswered == 0, detail))

    if reserve_statuses is not None and not scenario.existing_sku:
        unexpected = {status: count for status, count in reserve_statuses.items() if status not in CROWD_STATUSES}
        checks.append(
            _check("reserves answered only ok, sold_out, busy or unavailable", not unexpected, repr(unexpected))
        )
    if reserve_statuses is not None and reserve_statuses.get("unavailable"):
        unresolved = observed.unavailable_unresolved
        checks.append(
            _check(
                "every request answered unavailable decided on a retry",
                unresolved == 0,
                f"{unresolved} requests still unavailable after their last try: their outcome is unknown",
            )
        )
    if stats_skus is not None:
        disagree = []
        for index, count in known:
            figures = stats_skus.get(skus[index].sku)
            expected = {"stock": count.stock, "available": count.available, "held": count.held, "sold": count.sold}
            if figures is None or any(figures.get(name) != value for name, value in expected.items()):
                disagree.append(f"{skus[index].sku}: stats {figures}, stock {expected}")
        checks.append(_check("stats agree with stock", not disagree, _examples(disagree)))
    if stats_reserve_ok is not None:
        told = len(observed.holds)
        checks.append(
            _check(
                "stats count every ok reserve",
                stats_reserve_ok == told,
                f"the server counted {stats_reserve_ok} ok reserves during the run, the drivers were told {told}",
            )
        )
    return checks


def _checks_against_baseline(
    scenario: Scenario,
    ok_per_sku: Counter[int],
    observed: Observed,
    counts: Sequence[Counts | None],
    baseline: Sequence[Counts | None],
) -> list[Check]:
    skus = scenario.skus
    pairs = [
        (index, before, after)
        for index, (before, after) in enumerate(zip(baseline, counts, strict=True))
        if before is not None and after is not None
    ]
    over = [
        f"{skus[index].sku}: {ok_per_sku[index]} ok, {before.available} were available"
        for index, before, _ in pairs
        if ok_per_sku[index] > before.available
    ]
    checks = [_check("ok replies <= units available at the start", not over, _examples(over))]
    sold = [
        f"{skus[index].sku}: sold {after.sold - before.sold} during the run, confirmed ok "
        f"{observed.confirmed.get(index, 0)}"
        for index, before, after in pairs
        if after.sold - before.sold != observed.confirmed.get(index, 0)
    ]
    checks.append(_check("units sold during the run == ok confirms", not sold, _examples(sold)))
    return checks


def check_echo_run(observed: Observed, statuses: Mapping[str, Mapping[str, int]]) -> list[Check]:
    """The echo server sent every request back, each as it went (with no status)."""
    unexpected = {
        f"{op} {status}": count
        for op, counts in statuses.items()
        for status, count in counts.items()
        if status != ECHOED
    }
    missing = observed.crowd_buyers - observed.unsent_buyers - observed.crowd_answered
    return [
        _check("only echoed requests came back", not unexpected, repr(unexpected)),
        _check(
            "every request sent came back",
            missing == 0 and observed.unanswered == 0,
            f"{missing + observed.unanswered} requests sent but not echoed",
        ),
    ]


def failures(checks: Sequence[Check]) -> list[str]:
    return [f"{check.name}: {check.detail}" for check in checks if not check.passed]


def _check(name: str, passed: bool, detail: str) -> Check:
    return Check(name, passed, "" if passed else detail)


def _examples(items: Sequence[str]) -> str:
    shown = "; ".join(items[:EXAMPLES_MAX])
    more = len(items) - EXAMPLES_MAX
    return f"{shown}; and {more} more" if more > 0 else shown
