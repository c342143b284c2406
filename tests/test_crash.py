"""Kill -9 a durable engine under load; every `ok` it gave must survive, every invariant hold.

tests/crash_child.py runs a durable engine in a child process under load and writes
each `ok` it received (a hold, a confirm, a cancel) as a line, only after the engine
returned it. The test reads those lines, and once the child has acknowledged a number
of holds chosen by the seed (after a short, also seeded, extra delay, so that the kill
lands anywhere in a batch's life: deciding, writing, syncing or answering) kills it
with SIGKILL. Then it reopens the data directory in this process and checks:

- every acknowledged hold is there: a reserve with its key returns its reservation id
  and expiry, and reserves nothing more;
- every acknowledged confirm and cancel happened: repeating it answers `ok`, and the
  hold is in that state;
- the invariants: held + sold <= stock for every SKU, no buyer over the limit, no key
  with two holds, and the books' own recount (`check_invariants`).

The seed chooses the kill moment; the process scheduler still moves it a little, so
a replay with SOLDOUT_SEED=<seed> repeats the scenario, not the exact instant.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from crash_child import EPOCH, PER_BUYER_LIMIT, SHARDS, SKUS, STOCK
from model import observe_engine

from engine import EngineConfig, open_engine

CHILD = Path(__file__).with_name("crash_child.py")
# A safety net against a child that hangs; a healthy run takes a few seconds.
RUN_SECONDS_MAX = 120


def _seeds() -> list[int]:
    if "SOLDOUT_SEED" in os.environ:
        return [int(os.environ["SOLDOUT_SEED"])]
    return [1, 2, 3, random.SystemRandom().randrange(1 << 32)]


async def run_child_until_killed(data_dir: Path, seed: int) -> list[dict[str, Any]]:
    """Start the child, kill it at the seed's moment, return every line it acknowledged."""
    generator = random.Random(seed)
    holds_before_kill = generator.randint(1, 1500)
    extra_delay_seconds = generator.choice((0.0, 0.0, 0.001, 0.005, 0.02))
    acknowledged: list[dict[str, Any]] = []
    errors = bytearray()
    process = await trio.lowlevel.open_process(
        [sys.executable, str(CHILD), str(data_dir), str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = process.stdout, process.stderr

    async def read_errors() -> None:
        while chunk := await stderr.receive_some(65536):
            errors.extend(chunk)

    async def read_acknowledgements() -> None:
        holds = 0
        buffer = b""
        killed = False
        while chunk := await stdout.receive_some(65536):
            buffer += chunk
            # A line cut short by the kill stays in the buffer: it was never a whole acknowledgement.
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                acknowledged.append(event)
                holds += event["event"] == "hold"
            if not killed and holds >= holds_before_kill:
                await trio.sleep(extra_delay_seconds)
                process.kill()  # SIGKILL
                killed = True

    try:
        with trio.fail_after(RUN_SECONDS_MAX):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_errors)
                nursery.start_soon(read_acknowledgements)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    message = errors.decode(errors="replace")
    assert process.returncode == -signal.SIGKILL, f"the child ended with {process.returncode}:\n{message}"
    assert acknowledged[:1] == [{"event": "ready"}], message
    print(f"killed after {holds_before_kill} holds (+{extra_delay_seconds} s): {len(acknowledged)} lines acknowledged")
    return acknowledged


@pytest.mark.slow
@pytest.mark.parametrize("seed", _seeds(), ids=lambda seed: f"seed={seed}")
async def test_every_acknowledged_reply_survives_sigkill(seed: int, tmp_path: Path) -> None:
    print(f"crash seed {seed}; replay with: SOLDOUT_SEED={seed} .venv/bin/python -m pytest tests/test_crash.py")
    data_dir = tmp_path / "data"
    acknowledged = await run_child_until_killed(data_dir, seed)

    holds = {event["reservation"]: event for event in acknowledged if event["event"] == "hold"}
    assert len(holds) == sum(event["event"] == "hold" for event in acknowledged), "one id named two holds"
    confirmed = {event["reservation"] for event in acknowledged if event["event"] == "confirmed"}
    cancelled = {event["reservation"] for event in acknowledged if event["event"] == "cancelled"}
    assert confirmed <= holds.keys()
    assert cancelled <= holds.keys()
    assert not confirmed & cancelled

    config = EngineConfig(shards=SHARDS, data_dir=str(data_dir), durable=True, wall_clock=lambda: EPOCH)
    async with open_engine(config) as engine:
        view = observe_engine(engine)  # the books also recount themselves here
        counts = {sku: await engine.stock(sku) for sku in SKUS}

        for reservation, hold in holds.items():
            assert reservation in view.holds, f"acknowledged hold {reservation} was lost"
            sku, buyer, qty, expires_at, key, state, _ = view.holds[reservation]
            assert (sku, buyer, qty, expires_at, key) == (
                hold["sku"],
                hold["buyer"],
                hold["qty"],
                hold["expires_at"],
                hold["key"],
            ), f"acknowledged hold {reservation} came back different"
            if reservation in confirmed:
                assert state == "confirmed", f"acknowledged confirm of {reservation} was lost"
            elif reservation in cancelled:
                assert state == "cancelled", f"acknowledged cancel of {reservation} was lost"
            else:
                # Its confirm or cancel may have been decided without its answer reaching us.
                assert state in ("held", "confirmed", "cancelled"), (reservation, state)
            again = await engine.reserve(hold["sku"], buyer=hold["buyer"], qty=hold["qty"], key=hold["key"])
            assert again.ok, again
            assert (again.reservation, again.expires_at) == (reservation, hold["expires_at"])
        for reservation in confirmed:
            assert (await engine.confirm(reservation, buyer=holds[reservation]["buyer"])).ok
        for reservation in cancelled:
            assert (await engine.cancel(reservation, buyer=holds[reservation]["buyer"])).ok
        # Retries with used keys and repeated endings changed nothing.
        assert {sku: await engine.stock(sku) for sku in SKUS} == counts

    for sku in SKUS:
        count = counts[sku]
        assert count.ok
        assert count.stock == STOCK
        assert count.held + count.sold <= count.stock, f"{sku} oversold after the crash"
        sold_acknowledged = sum(
            holds[reservation]["qty"] for reservation in confirmed if holds[reservation]["sku"] == sku
        )
        # Not a lower bound on held: a hold may have been cancelled without the answer reaching us.
        assert count.sold >= sold_acknowledged
    units: dict[tuple[str, str], int] = {}
    keys: set[tuple[str, str]] = set()
    for sku, buyer, qty, _, key, state, _ in view.holds.values():
        if state in ("held", "confirmed"):
            units[sku, buyer] = units.get((sku, buyer), 0) + qty
        if key is not None:
            assert (sku, key) not in keys, f"key {key} of {sku} made two holds"
            keys.add((sku, key))
    assert max(units.values(), default=0) <= PER_BUYER_LIMIT
    assert len(holds) > 0
