"""Fixtures shared by soldout's tests.

pytest-trio already provides `autojump_clock` (a `MockClock(autojump_threshold=0)`);
a test that asks for it by name runs on that clock. `wall_clock` is the matching
epoch-seconds clock for `EngineConfig(wall_clock=...)`: it moves with trio's clock,
so hold expiry and sale windows follow the mock clock without a single real sleep.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from nats_cluster import nats_cluster  # noqa: F401 (a fixture: a three-server JetStream cluster per session)

from engine import EngineConfig

# Epoch seconds at trio time 0: a fixed, recognisable moment (2023-11-14).
WALL_CLOCK_START = 1_700_000_000.0


def mock_wall_clock(offset_seconds: float = 0.0) -> Callable[[], float]:
    """Epoch seconds tied to trio's clock, `offset_seconds` ahead of WALL_CLOCK_START."""
    start = WALL_CLOCK_START + offset_seconds

    def wall_clock() -> float:
        return start + trio.current_time()

    return wall_clock


@pytest.fixture
def wall_clock() -> Callable[[], float]:
    return mock_wall_clock()


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    """A path for an engine's data directory; the engine creates it."""
    return str(tmp_path / "data")


@pytest.fixture
def engine_config(wall_clock: Callable[[], float]) -> Callable[..., EngineConfig]:
    """Builds an EngineConfig on the mock wall clock; keyword arguments override fields."""

    def build(**overrides: Any) -> EngineConfig:
        overrides.setdefault("wall_clock", wall_clock)
        return EngineConfig(**overrides)

    return build


PROCESS_LOG_TAIL_BYTES = 6000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that started server processes shows the end of each one's log (the
    `*.log` files under its tmp_path), so a failure seen once in CI can be read."""
    report = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp_path, Path):
        for log in sorted(tmp_path.glob("**/*.log")):
            tail = log.read_bytes()[-PROCESS_LOG_TAIL_BYTES:].decode(errors="replace")
            report.sections.append((f"{log.relative_to(tmp_path)} (its last {len(tail)} characters)", tail))
    return report
