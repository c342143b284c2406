"""EngineConfig: what an engine is opened with."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.limits import SHARDS_MAX, Limits


def system_wall_clock() -> float:
    return time.time()


@dataclass(frozen=True)
class EngineConfig:
    """How to open an engine.

    `data_dir=None` keeps everything in memory. With a `data_dir`, every batch is
    journaled before its replies are released; `durable=True` adds an fsync per batch,
    so an `ok` survives the machine crashing too. `wall_clock` returns epoch seconds:
    tests inject one tied to trio's MockClock to drive hold expiry and sale windows.
    """

    shards: int = 8
    data_dir: str | None = None
    durable: bool = True
    limits: Limits = field(default_factory=Limits)
    wall_clock: Callable[[], float] = system_wall_clock
    # A snapshot is taken once a shard has journaled this many records since its last
    # one, and at least half as many as it holds, so replay stays bounded and the cost
    # of snapshots stays proportional to the records written.
    snapshot_records_min: int = 100_000

    def __post_init__(self) -> None:
        if type(self.shards) is not int or not 1 <= self.shards <= SHARDS_MAX:
            raise ValueError(f"shards must be an integer from 1 to {SHARDS_MAX}, got {self.shards!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError("data_dir must be a path or None")
        if type(self.snapshot_records_min) is not int or self.snapshot_records_min < 1:
            raise ValueError("snapshot_records_min must be a positive integer")
