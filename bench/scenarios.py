"""Flash-crowd scenarios: which SKUs go on sale, and which buyer tries which SKU in what order.

A scenario is a small, picklable description; `Scenario.plan()` expands it into the
crowd, the same for the same seed in every process that asks, so each load-driver
process rebuilds the plan and takes its own share of it instead of receiving it.

    flash     one SKU, 10,000 units, limit 1 per buyer, 200,000 buyers trying once each
    catalog   1,000 SKUs, each buyer tries one SKU drawn uniformly, 100 units per SKU
              (about half of each SKU's demand, as in bench/embedded's spread workload)
    checkout  the flash crowd with a short hold time; each winner then confirms, cancels,
              or lets the hold expire, in configurable shares

A scenario may also drive a sale an operator configured (`existing_sku`): its SKU is
read from the server, not put, and its buyers can come from a file (the registered
ones), so a rehearsal runs the exact sale. The only I/O here is reading that file.

The wire cases are flash crowds too, each with its target, storage, requests per frame
and pace (`soldout bench wire`):

    echo-1, memory-1, durable-1          one request per frame, closed loop
    echo-100, memory-100, durable-100    100 requests per frame, closed loop
    open-loop                            a fixed rate offered, durable
    soak                                 half the measured durable-100 rate, durable, for minutes
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

SCENARIOS = ("flash", "catalog", "checkout")

RESERVE_OP = "reserve"
CONFIRM_OP = "confirm"
CANCEL_OP = "cancel"
# One request of the crowd: (op, buyer number, SKU index, reservation or None).
Item = tuple[str, int, int, str | None]

# What a buyer does after winning a hold.
KEEP = 0  # keeps the hold (flash, catalog): it neither confirms nor cancels
CONFIRM = 1
CANCEL = 2
EXPIRE = 3  # lets the hold run out
ACTION_NAMES = {KEEP: "keep", CONFIRM: "confirm", CANCEL: "cancel", EXPIRE: "expire"}

DEFAULT_BUYERS = 200_000
DEFAULT_SKUS = {"flash": 1, "catalog": 1000, "checkout": 1}
DEFAULT_STOCK = {"flash": 10_000, "catalog": 100, "checkout": 10_000}
DEFAULT_HOLD_SECONDS = {"flash": 900.0, "catalog": 900.0, "checkout": 2.0}
DEFAULT_CONFIRM_SHARE = 0.6
DEFAULT_CANCEL_SHARE = 0.2
PER_BUYER_LIMIT = 1
QTY = 1


@dataclass(frozen=True, slots=True)
class SkuPlan:
    sku: str
    stock: int
    per_buyer_limit: int
    hold_seconds: float


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    skus: tuple[SkuPlan, ...]
    buyers: int
    seed: int
    confirm_share: float = 0.0
    cancel_share: float = 0.0
    # A configured SKU of the server's, driven as it is (nothing put, nothing cancelled).
    existing_sku: bool = False
    # Buyer ids, one per line (first CSV column), instead of generated names.
    buyers_file: str | None = None
    # Makes this run's idempotency keys its own, so a run never meets an earlier one's holds.
    key_prefix: str = ""

    @property
    def holds_end(self) -> bool:
        """Whether winners end their holds (checkout), so units can come back during the run."""
        return self.name == "checkout"

    @property
    def total_stock(self) -> int:
        return sum(sku.stock for sku in self.skus)

    def plan(self) -> Plan:
        """The crowd, deterministic for the seed: the same lists in every process."""
        generator = random.Random(self.seed)
        sku_count = len(self.skus)
        # One SKU: no draw at all, so a flash plan costs next to nothing to rebuild.
        sku_indexes = [0] * self.buyers if sku_count == 1 else generator.choices(range(sku_count), k=self.buyers)
        if self.holds_end:
            confirm_share = self.confirm_share
            cancel_below = confirm_share + self.cancel_share
            actions = []
            for draw in (generator.random() for _ in range(self.buyers)):
                actions.append(CONFIRM if draw < confirm_share else CANCEL if draw < cancel_below else EXPIRE)
        else:
            actions = [KEEP] * self.buyers
        names = read_buyer_file(self.buyers_file)[: self.buyers] if self.buyers_file else None
        return Plan(self, sku_indexes, actions, names)


@dataclass(frozen=True, slots=True)
class Plan:
    """Buyer number i is `buyer(i)`, tries SKU `sku_indexes[i]` once, then does `actions[i]`."""

    scenario: Scenario
    sku_indexes: list[int]
    actions: list[int]
    names: list[str] | None = None  # buyer ids from the scenario's buyers file

    def buyer(self, number: int) -> str:
        return self.names[number] if self.names is not None else buyer_name(number)

    def key(self, number: int) -> str:
        return self.scenario.key_prefix + idempotency_key(number)

    def demand(self) -> list[int]:
        """How many buyers try each SKU."""
        counts = [0] * len(self.scenario.skus)
        for index in self.sku_indexes:
            counts[index] += 1
        return counts


def buyer_name(number: int) -> str:
    return f"u{number}"


def idempotency_key(number: int) -> str:
    # Each buyer tries once, so one key per buyer; a retry after `busy` reuses it.
    return f"k{number}"


def build_scenario(
    name: str,
    *,
    buyers: int | None = None,
    stock: int | None = None,
    skus: int | None = None,
    seed: int = 1,
    hold_seconds: float | None = None,
    confirm_share: float | None = None,
    cancel_share: float | None = None,
    sku_tag: str = "",
) -> Scenario:
    """A scenario with its defaults; any argument given overrides them.

    `stock` is units per SKU. `sku_tag` makes the SKU names of one run unique, so a bench
    against a long-running server never meets the holds of an earlier run.
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}: choose one of {', '.join(SCENARIOS)}")
    buyers = DEFAULT_BUYERS if buyers is None else buyers
    stock = DEFAULT_STOCK[name] if stock is None else stock
    sku_count = DEFAULT_SKUS[name] if skus is None else skus
    hold_seconds = DEFAULT_HOLD_SECONDS[name] if hold_seconds is None else hold_seconds
    if buyers < 1:
        raise ValueError("buyers must be at least 1")
    if stock < 0:
        raise ValueError("stock must not be negative")
    if sku_count < 1:
        raise ValueError("skus must be at least 1")
    if hold_seconds <= 0:
        raise ValueError("hold seconds must be above 0")
    confirm = 0.0
    cancel = 0.0
    if name == "checkout":
        confirm = DEFAULT_CONFIRM_SHARE if confirm_share is None else confirm_share
        cancel = DEFAULT_CANCEL_SHARE if cancel_share is None else cancel_share
        if confirm < 0 or cancel < 0 or confirm + cancel > 1:
            raise ValueError("confirm and cancel shares must be from 0 to 1 and add up to at most 1")
    tag = f"-{sku_tag}" if sku_tag else ""
    if sku_count == 1:
        names = [f"MI-BAND{tag}"]
    else:
        width = len(str(sku_count - 1))
        names = [f"SKU{tag}-{index:0{width}d}" for index in range(sku_count)]
    plans = tuple(SkuPlan(sku, stock, PER_BUYER_LIMIT, float(hold_seconds)) for sku in names)
    return Scenario(name, plans, buyers, seed, confirm, cancel)


def read_buyer_file(path: str) -> list[str]:
    """Buyer ids from the first column of a CSV file, as `soldout admin register` reads them."""
    from engine.cli.admin import read_buyer_ids

    with open(path, newline="") as file:
        return list(read_buyer_ids(file))


def configured_scenario(
    name: str,
    plan: SkuPlan,
    *,
    buyers: int,
    seed: int,
    buyers_file: str | None,
    key_prefix: str,
    confirm_share: float | None = None,
    cancel_share: float | None = None,
) -> Scenario:
    """A scenario over one SKU the server already has: `plan` holds what the server said."""
    if buyers < 1:
        raise ValueError("buyers must be at least 1")
    confirm = cancel = 0.0
    if name == "checkout":
        confirm = DEFAULT_CONFIRM_SHARE if confirm_share is None else confirm_share
        cancel = DEFAULT_CANCEL_SHARE if cancel_share is None else cancel_share
    return Scenario(name, (plan,), buyers, seed, confirm, cancel, True, buyers_file, key_prefix)


def split(numbers: range, parts: int) -> list[range]:
    """`numbers` cut into `parts` contiguous ranges whose lengths differ by at most one."""
    assert parts >= 1
    size, extra = divmod(len(numbers), parts)
    ranges = []
    start = numbers.start
    for part in range(parts):
        stop = start + size + (1 if part < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def split_weighted(numbers: range, weights: list[int]) -> list[range]:
    """`numbers` cut into contiguous ranges in proportion to `weights`."""
    total = sum(weights)
    assert total > 0
    ranges = []
    start = numbers.start
    given = 0
    for weight in weights:
        given += weight
        stop = numbers.start + len(numbers) * given // total
        ranges.append(range(start, stop))
        start = stop
    return ranges


# ---------------------------------------------------------------- the wire cases

WIRE_CASES = ("echo-1", "memory-1", "durable-1", "echo-100", "memory-100", "durable-100", "open-loop", "soak")


@dataclass(frozen=True, slots=True)
class WireCase:
    name: str
    target: str  # "echo" or "soldout"
    storage: str  # "memory" or "durable"; the echo server keeps nothing
    batch: int
    # open loop: the rate is given (--open-rate), or half the durable-100 rate (the soak)
    open_loop: bool = False
    soak: bool = False

    @property
    def label(self) -> str:
        pace = "soak" if self.soak else "open loop" if self.open_loop else "closed loop"
        server = "echo" if self.target == "echo" else f"soldout {self.storage}"
        return f"{server}, {self.batch}/frame, {pace}"


def wire_cases(names: Sequence[str], open_batch: int) -> list[WireCase]:
    """The named cases, in the order of WIRE_CASES (the soak's rate comes from durable-100)."""
    unknown = [name for name in names if name not in WIRE_CASES]
    if unknown:
        raise ValueError(f"unknown wire cases {', '.join(unknown)}: choose from {', '.join(WIRE_CASES)}")
    cases = []
    for name in WIRE_CASES:
        if name not in names:
            continue
        if name == "open-loop":
            cases.append(WireCase(name, "soldout", "durable", open_batch, open_loop=True))
        elif name == "soak":
            cases.append(WireCase(name, "soldout", "durable", 100, open_loop=True, soak=True))
        else:
            server, batch = name.split("-")
            target = "echo" if server == "echo" else "soldout"
            cases.append(WireCase(name, target, "memory" if target == "echo" else server, int(batch)))
    return cases
