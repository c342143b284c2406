"""A fault is not a crash: disks that fail to write, to fsync, or fill up.

A shard whose commit fails answers that batch, and everything after it, `unavailable`
(none of it is known to be on disk); the other shards keep serving; the shard reports
itself in `statistics()`, rebuilds its book from the files with backoff, and serves
again once writes succeed. Nothing acknowledged is lost, and a retry with the same
idempotency key never makes a second hold. A snapshot that fails is retried later.

Faults are injected by replacing the journal's write and fsync system calls for the
files of one shard (engine/journal.py looks them up at call time), and a real full
disk is a small tmpfs the test mounts (it needs root; without it, ENOSPC is injected).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from engine import Engine, EngineConfig, open_engine
from engine import journal as journal_module
from engine import store as store_module
from engine.router import shard_for_sku
from protocol.messages import OK, UNAVAILABLE, Reserve, StockReply

EPOCH = 1_700_000_000.0
WAIT_SECONDS_MAX = 30


def fixed_clock() -> float:
    return EPOCH


def skus_on_shards(shards: int) -> list[str]:
    """One SKU name per shard, in shard order."""
    found: dict[int, str] = {}
    index = 0
    while len(found) < shards:
        found.setdefault(shard_for_sku(f"sku-{index}", shards), f"sku-{index}")
        index += 1
    return [found[shard] for shard in range(shards)]


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class DiskFaults:
    """Makes write or fsync fail with `error` for files under `directory`, while `failing`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.directory = str(directory)
        self.failing: set[str] = set()  # "write", "fsync"
        self.error = errno.EIO
        self.partial_write_bytes = 0  # a failing write first writes this many bytes
        self.failures = 0
        real_write, real_fsync = os.write, os.fsync

        def write(fd: int, data: bytes | memoryview) -> int:
            if "write" in self.failing and fd_path(fd).startswith(self.directory):
                self.failures += 1
                if self.partial_write_bytes:
                    real_write(fd, bytes(data[: self.partial_write_bytes]))
                raise OSError(self.error, os.strerror(self.error))
            return real_write(fd, data)

        def fsync(fd: int) -> None:
            if "fsync" in self.failing and fd_path(fd).startswith(self.directory):
                self.failures += 1
                raise OSError(self.error, os.strerror(self.error))
            real_fsync(fd)

        monkeypatch.setattr(journal_module, "write_system_call", write)
        monkeypatch.setattr(journal_module, "fsync_system_call", fsync)


async def wait_until(condition: Callable[[], bool]) -> None:
    # Polled: a shard's recovery runs in worker threads, on the real clock, with backoff.
    with trio.fail_after(WAIT_SECONDS_MAX):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.02)


def shard_state(engine: Engine, shard: int) -> str:
    return engine.statistics().shards[shard].state


async def test_a_failed_fsync_makes_only_its_shard_unavailable_until_the_disk_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = EngineConfig(shards=2, data_dir=str(tmp_path), durable=True, wall_clock=fixed_clock)
    broken_sku, healthy_sku = skus_on_shards(2)[1], skus_on_shards(2)[0]
    faults = DiskFaults(monkeypatch, tmp_path / "shard-1")
    with caplog.at_level(logging.WARNING):
        async with open_engine(config) as engine:
            for sku in (broken_sku, healthy_sku):
                assert (await engine.put_sku(sku, stock=10, per_buyer_limit=10)).ok
            first = await engine.reserve(broken_sku, buyer="a", key="first")
            assert first.ok
            faults.failing = {"fsync"}
            # The batch whose fsync failed is not known to be on disk: not `ok`.
            lost = await engine.reserve(broken_sku, buyer="a", key="during")
            assert lost.status == UNAVAILABLE
            assert lost.error
            assert shard_state(engine, 1) == "unavailable"
            assert engine.statistics().shards[1].faults == 1
            # Everything on that shard is unavailable now, stock included; the other shard serves.
            assert (await engine.stock(broken_sku)).status == UNAVAILABLE
            assert (await engine.reserve(broken_sku, buyer="b", key="later")).status == UNAVAILABLE
            assert (await engine.reserve(healthy_sku, buyer="a", key="elsewhere")).ok
            assert shard_state(engine, 0) == "serving"
            # It keeps trying; once fsync works again it serves, rebuilt from its files.
            await wait_until(lambda: faults.failures >= 3)
            faults.failing = set()
            await wait_until(lambda: shard_state(engine, 1) == "serving")
            assert (await engine.reserve(broken_sku, buyer="a", key="first")).reservation == first.reservation
            retried = await engine.reserve(broken_sku, buyer="a", key="during")
            assert retried.ok
            again = await engine.reserve(broken_sku, buyer="a", key="during")
            assert again.reservation == retried.reservation  # one key, one hold
            held = (await engine.stock(broken_sku)).held
            assert held == 2
        # Nothing acknowledged is lost across a restart either.
        async with open_engine(config) as engine:
            stock = await engine.stock(broken_sku)
            assert (stock.held, stock.available) == (2, 8)
            assert (await engine.reserve(broken_sku, buyer="a", key="during")).reservation == retried.reservation
            assert (await engine.stock(healthy_sku)).held == 1
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "shard 1" in errors[0].getMessage()
    assert "unavailable" in errors[0].getMessage()


async def test_a_write_that_fails_halfway_leaves_no_ok_and_no_second_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EngineConfig(shards=1, data_dir=str(tmp_path), durable=True, wall_clock=fixed_clock)
    faults = DiskFaults(monkeypatch, tmp_path / "shard-0")
    async with open_engine(config) as engine:
        assert (await engine.put_sku("band", stock=5, per_buyer_limit=5)).ok
        faults.failing = {"write"}
        faults.partial_write_bytes = 7
        replies = await engine.execute([Reserve("band", "a", 1, f"k{index}") for index in range(3)])
        assert [reply.status for reply in replies] == [UNAVAILABLE] * 3
        faults.failing = set()
        await wait_until(lambda: shard_state(engine, 0) == "serving")
        # The torn write is not in the rebuilt book: each retry makes its one hold now.
        assert await engine.stock("band") == StockReply(OK, stock=5, available=5, held=0, sold=0)
        retried = await engine.execute([Reserve("band", "a", 1, f"k{index}") for index in range(3)])
        assert all(reply.ok for reply in retried)
    async with open_engine(config) as engine:
        assert (await engine.stock("band")).held == 3
        for index, hold in enumerate(retried):
            assert (await engine.reserve("band", buyer="a", key=f"k{index}")).reservation == hold.reservation


async def test_an_engine_closed_while_a_shard_is_unavailable_reopens_from_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EngineConfig(shards=1, data_dir=str(tmp_path), durable=True, wall_clock=fixed_clock)
    faults = DiskFaults(monkeypatch, tmp_path / "shard-0")
    async with open_engine(config) as engine:
        assert (await engine.put_sku("band", stock=5, per_buyer_limit=5)).ok
        assert (await engine.reserve("band", buyer="a", key="kept")).ok
        faults.failing = {"write"}
        faults.partial_write_bytes = 9
        assert (await engine.reserve("band", buyer="a", key="torn")).status == UNAVAILABLE
        # Still failing at the close (so no reopen succeeds first), but fsync works again.
    faults.failing = set()
    async with open_engine(config) as engine:
        assert (await engine.stock("band")).held == 1
        assert (await engine.reserve("band", buyer="a", key="kept")).reservation == "0-1"


async def test_a_disk_failing_at_start_starts_the_shard_unavailable_not_the_process_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EngineConfig(shards=2, data_dir=str(tmp_path), durable=True, wall_clock=fixed_clock)
    broken_sku = skus_on_shards(2)[1]
    async with open_engine(config) as engine:
        assert (await engine.put_sku(broken_sku, stock=3)).ok
        assert (await engine.reserve(broken_sku, buyer="a", key="k")).ok
    faults = DiskFaults(monkeypatch, tmp_path / "shard-1")
    faults.failing = {"fsync"}
    async with open_engine(config) as engine:
        assert shard_state(engine, 1) == "unavailable"
        assert shard_state(engine, 0) == "serving"
        assert (await engine.stock(broken_sku)).status == UNAVAILABLE
        faults.failing = set()
        await wait_until(lambda: shard_state(engine, 1) == "serving")
        assert (await engine.stock(broken_sku)).held == 1


async def test_a_failed_snapshot_is_logged_and_retried_while_the_shard_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = EngineConfig(
        shards=1, data_dir=str(tmp_path), durable=False, snapshot_records_min=5, wall_clock=fixed_clock
    )
    real_write_snapshot = store_module.write_snapshot
    failing = {"on": True}

    def write_snapshot(directory: str, number: int, data: dict) -> None:
        if failing["on"]:
            raise OSError(errno.EMFILE, "Too many open files")
        real_write_snapshot(directory, number, data)

    monkeypatch.setattr(store_module, "write_snapshot", write_snapshot)
    with caplog.at_level(logging.ERROR):
        async with open_engine(config) as engine:
            assert (await engine.put_sku("band", stock=500, per_buyer_limit=500)).ok
            for index in range(30):
                assert (await engine.reserve("band", buyer="a", key=f"k{index}")).ok
            await wait_until(lambda: engine.statistics().shards[0].snapshot_failures >= 1)
            assert engine.statistics().shards[0].snapshots == 0
            assert shard_state(engine, 0) == "serving"
            failing["on"] = False
            index = 30
            while engine.statistics().shards[0].snapshots == 0:
                assert (await engine.reserve("band", buyer="a", key=f"k{index}")).ok
                index += 1
                await trio.sleep(0.01)
    assert any("snapshot failed" in record.getMessage() for record in caplog.records)
    async with open_engine(config) as engine:
        assert (await engine.stock("band")).held == index


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[bool]:
    """A tmpfs of `size_bytes` at `path`; yields False when it cannot be mounted here."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True, check=False
    )
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write zeros to `path` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\x00" * size)
    finally:
        os.close(fd)


async def test_a_full_disk_makes_shards_unavailable_and_they_serve_again_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount_point = tmp_path / "small"
    with small_filesystem(mount_point, 2 * 1024 * 1024) as mounted:
        data_dir = mount_point / "data"
        config = EngineConfig(shards=2, data_dir=str(data_dir), durable=True, wall_clock=fixed_clock)
        skus = skus_on_shards(2)
        faults = DiskFaults(monkeypatch, data_dir)
        faults.error = errno.ENOSPC
        filler = mount_point / "filler"
        acknowledged: dict[str, str] = {}
        async with open_engine(config) as engine:
            for sku in skus:
                assert (await engine.put_sku(sku, stock=100_000, per_buyer_limit=100_000)).ok
            if mounted:
                fill(filler)
            else:
                faults.failing = {"write"}
            statuses: set[str] = set()
            for index in range(2000):
                reply = await engine.reserve(skus[index % 2], buyer="a", key=f"k{index}")
                statuses.add(reply.status)
                if reply.ok:
                    acknowledged[f"k{index}"] = reply.reservation
                if all(shard.state == "unavailable" for shard in engine.statistics().shards):
                    break
            assert statuses <= {OK, UNAVAILABLE}
            assert UNAVAILABLE in statuses
            assert all(shard.state == "unavailable" for shard in engine.statistics().shards)
            # While the disk stays full, the retries fail and the shards stay unavailable.
            await trio.sleep(0.5)
            assert all(shard.state == "unavailable" for shard in engine.statistics().shards)
            assert (await engine.reserve(skus[0], buyer="a", key="while-full")).status == UNAVAILABLE
            if mounted:
                filler.unlink()
            faults.failing = set()
            await wait_until(lambda: all(shard.state == "serving" for shard in engine.statistics().shards))
            for key, reservation in acknowledged.items():
                again = await engine.reserve(skus[int(key[1:]) % 2], buyer="a", key=key)
                assert again.reservation == reservation
        async with open_engine(config) as engine:
            held = [(await engine.stock(sku)).held for sku in skus]
            assert sum(held) >= len(acknowledged)
            for key, reservation in acknowledged.items():
                again = await engine.reserve(skus[int(key[1:]) % 2], buyer="a", key=key)
                assert again.reservation == reservation
