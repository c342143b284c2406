"""What a data directory must hold, and damage that no crash explains.

Only what a crash can leave — a prefix of the last write, then possibly zeros — is a
torn tail, cut off at start with a warning. Every other kind of damage (a flipped bit
anywhere, a missing or emptied file, a journal shorter than its manifest says it
reached) stops the start with an error naming the file, and changes no file.
A data directory written by soldout before format 2 still opens, and is upgraded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from data_files import as_if_killed, encode_legacy_entry, entry_offsets, segment_entries
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import DataDirError, EngineConfig, JournalCorrupt, Limits, open_engine
from engine import journal as journal_module
from engine.book import RECORD_HOLD, RECORD_PUT_SKU, RECORD_REGISTER
from engine.journal import ENTRY_HEADER_BYTES, SEGMENT_HEADER_BYTES, _written_end
from engine.manifest import MissingFile, read_manifest
from protocol.messages import OK, Reserve, StockReply

SKU = "MI-BAND-1"
EPOCH = 1_700_000_000.0
ConfigFactory = Callable[..., EngineConfig]


def fixed_clock() -> float:
    return EPOCH


def single_shard_config(data_dir: str | Path, **overrides: object) -> EngineConfig:
    settings: dict[str, object] = {"shards": 1, "data_dir": str(data_dir), "durable": False, "wall_clock": fixed_clock}
    settings.update(overrides)
    return EngineConfig(**settings)  # type: ignore[arg-type]


async def make_holds(config: EngineConfig, holds: int) -> None:
    """put_sku, then `holds` reserves one at a time: one journal entry each."""
    async with open_engine(config) as engine:
        assert (await engine.put_sku(SKU, stock=1000, per_buyer_limit=1000)).ok
        for index in range(holds):
            assert (await engine.reserve(SKU, buyer="a", key=f"k{index}")).ok


async def held_units(config: EngineConfig) -> int:
    async with open_engine(config) as engine:
        stock = await engine.stock(SKU)
        assert stock.ok
        return stock.held


def snapshot_of_files(data_dir: Path) -> dict[str, bytes]:
    return {
        str(path): path.read_bytes()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file() and path.name != "soldout.lock"
    }


async def assert_refused(config: EngineConfig, error: type[Exception], path: str | Path) -> Exception:
    """The start fails with `error` naming `path`, twice (a refusal lets go of the directory)."""
    assert config.data_dir is not None
    before = snapshot_of_files(Path(config.data_dir))
    for _ in range(2):
        with pytest.raises(error) as raised:
            async with open_engine(config):
                pytest.fail("started on a damaged data directory")
        assert str(path) in str(raised.value)
        assert raised.value.path == str(path)  # type: ignore[attr-defined]
    assert snapshot_of_files(Path(config.data_dir)) == before, "a refused start changed a file"
    return raised.value


def segment(data_dir: Path, shard: int = 0, number: int = 0) -> Path:
    return data_dir / f"shard-{shard}" / f"journal-{number:010d}.log"


# ------------------------------------------------------------------ a flipped bit


@pytest.mark.parametrize("which_entry", ["first", "middle", "last"])
async def test_every_byte_of_an_entry_header_flipped_stops_the_start_naming_file_and_offset(
    tmp_path: Path, which_entry: str
) -> None:
    """The bug: a flipped length byte made the entry "run past the end of the file", which
    was taken for a torn tail, and everything after it was cut off. The header now checks
    itself, so every byte of it, flipped, is damage, not a torn tail."""
    config = single_shard_config(tmp_path)
    await make_holds(config, 9)
    path = segment(tmp_path)
    offsets = entry_offsets(path)
    offset = {"first": offsets[0], "middle": offsets[len(offsets) // 2], "last": offsets[-1]}[which_entry]
    original = path.read_bytes()
    for position in range(ENTRY_HEADER_BYTES):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(original)
            damaged[offset + position] ^= mask
            path.write_bytes(bytes(damaged))
            error = await assert_refused(config, JournalCorrupt, path)
            assert error.offset == offset, f"byte {position} ^ {mask:#x}: {error}"  # type: ignore[attr-defined]
    path.write_bytes(original)
    assert await held_units(config) == 9


async def test_every_byte_of_a_payload_or_end_mark_flipped_stops_the_start(tmp_path: Path) -> None:
    config = single_shard_config(tmp_path)
    await make_holds(config, 3)
    path = segment(tmp_path)
    original = path.read_bytes()
    last = entry_offsets(path)[-1]
    for position in range(last + ENTRY_HEADER_BYTES, len(original)):
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        error = await assert_refused(config, JournalCorrupt, path)
        assert error.offset == last  # type: ignore[attr-defined]


async def test_every_byte_of_the_segment_header_flipped_stops_the_start(tmp_path: Path) -> None:
    config = single_shard_config(tmp_path)
    await make_holds(config, 2)
    path = segment(tmp_path)
    original = path.read_bytes()
    for position in range(SEGMENT_HEADER_BYTES):
        damaged = bytearray(original)
        damaged[position] ^= 0x10
        path.write_bytes(bytes(damaged))
        error = await assert_refused(config, JournalCorrupt, path)
        assert error.offset == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("file_name", ["manifest", "snapshot-0000000001.msgpack"])
async def test_a_flipped_byte_in_a_manifest_or_snapshot_stops_the_start(tmp_path: Path, file_name: str) -> None:
    config = single_shard_config(tmp_path, snapshot_records_min=3)
    await make_holds(config, 6)
    path = tmp_path / "shard-0" / file_name
    assert path.exists(), sorted(os.listdir(tmp_path / "shard-0"))
    original = path.read_bytes()
    for position in range(0, len(original), max(1, len(original) // 40)):
        damaged = bytearray(original)
        damaged[position] ^= 0x04
        path.write_bytes(bytes(damaged))
        await assert_refused(config, JournalCorrupt, path)
    path.write_bytes(original)
    assert await held_units(config) == 6


async def test_garbage_after_the_last_entry_is_damage_but_zeros_are_a_torn_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = single_shard_config(tmp_path)
    await make_holds(config, 2)
    as_if_killed(tmp_path)
    path = segment(tmp_path)
    original = path.read_bytes()
    path.write_bytes(original + b"\x00" * 100 + b"\x01" + b"\x00" * 10)
    await assert_refused(config, JournalCorrupt, path)
    path.write_bytes(original + b"\x00" * 4096)
    with caplog.at_level(logging.WARNING):
        assert await held_units(config) == 2
    assert any(str(path) in record.getMessage() for record in caplog.records)
    assert path.read_bytes() == original


# ------------------------------------------------------------------ missing and shortened files


async def test_an_emptied_journal_stops_the_start(tmp_path: Path) -> None:
    """The bug: a journal truncated to 0 bytes started silently with every hold gone."""
    config = single_shard_config(tmp_path)
    await make_holds(config, 5)
    path = segment(tmp_path)
    path.write_bytes(b"")
    error = await assert_refused(config, JournalCorrupt, path)
    assert "segment header is missing" in str(error)


async def test_a_deleted_journal_stops_the_start(tmp_path: Path) -> None:
    config = single_shard_config(tmp_path)
    await make_holds(config, 5)
    path = segment(tmp_path)
    path.unlink()
    error = await assert_refused(config, MissingFile, path)
    assert "journal segment 0 of shard 0 is missing" in str(error)


async def test_a_deleted_shard_directory_stops_the_start(tmp_path: Path) -> None:
    config = EngineConfig(shards=4, data_dir=str(tmp_path), durable=False, wall_clock=fixed_clock)
    async with open_engine(config) as engine:
        for index in range(8):
            assert (await engine.put_sku(f"sku-{index}", stock=10)).ok
    shutil.rmtree(tmp_path / "shard-2")
    error = await assert_refused(config, MissingFile, tmp_path / "shard-2")
    assert "the directory of shard 2 is missing" in str(error)


async def test_a_deleted_manifest_stops_the_start(tmp_path: Path) -> None:
    config = single_shard_config(tmp_path)
    await make_holds(config, 1)
    path = tmp_path / "shard-0" / "manifest"
    path.unlink()
    error = await assert_refused(config, MissingFile, path)
    assert "the manifest of shard 0 is missing" in str(error)


async def test_a_deleted_snapshot_is_reported_as_a_missing_snapshot(tmp_path: Path) -> None:
    config = single_shard_config(tmp_path, snapshot_records_min=3)
    await make_holds(config, 8)
    (name,) = [name for name in os.listdir(tmp_path / "shard-0") if name.startswith("snapshot-")]
    path = tmp_path / "shard-0" / name
    number = int(name.removeprefix("snapshot-").removesuffix(".msgpack"))
    path.unlink()
    error = await assert_refused(config, MissingFile, path)
    assert f"snapshot {number} of shard 0 is missing" in str(error)


async def test_a_journal_shortened_after_a_clean_close_stops_the_start(tmp_path: Path) -> None:
    """A clean close records the journal's length: any cut after it is damage, even one on
    an entry boundary that would otherwise look like a crash before the last commits."""
    config = single_shard_config(tmp_path)
    await make_holds(config, 6)
    path = segment(tmp_path)
    offsets = entry_offsets(path)
    for cut in (offsets[-1], offsets[-1] + 5, len(path.read_bytes()) - 1):
        original = path.read_bytes()
        os.truncate(path, cut)
        await assert_refused(config, JournalCorrupt, path)
        path.write_bytes(original)
    assert await held_units(config) == 6


async def test_a_journal_cut_below_what_recovery_saw_stops_the_start(tmp_path: Path) -> None:
    """After a crash only what was written since the last start can be torn."""
    config = single_shard_config(tmp_path)
    await make_holds(config, 4)
    async with open_engine(config) as engine:  # recovery records the length it found
        assert (await engine.reserve(SKU, buyer="b", key="late")).ok
    as_if_killed(tmp_path)
    path = segment(tmp_path)
    reached = read_manifest(str(tmp_path / "shard-0"), 0).active_bytes_min
    os.truncate(path, reached - 1)
    await assert_refused(config, JournalCorrupt, path)


async def test_a_removed_soldout_json_beside_shard_data_stops_the_start(tmp_path: Path) -> None:
    config = single_shard_config(tmp_path)
    await make_holds(config, 2)
    (tmp_path / "soldout.json").unlink()
    with pytest.raises(DataDirError, match=r"soldout\.json"):
        async with open_engine(config):
            pytest.fail("started over a sale whose soldout.json was removed")


async def test_a_new_data_directory_is_created_and_reopens_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = EngineConfig(shards=3, data_dir=str(tmp_path / "new"), durable=True, wall_clock=fixed_clock)
    with caplog.at_level(logging.WARNING):
        async with open_engine(config) as engine:
            assert (await engine.put_sku(SKU, stock=5)).ok
        async with open_engine(config) as engine:
            assert (await engine.stock(SKU)).stock == 5
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    for shard in range(3):
        assert read_manifest(str(tmp_path / "new" / f"shard-{shard}"), shard).closed_bytes is not None


# ------------------------------------------------------------------ entries and their bound


async def test_a_commit_larger_than_an_entry_is_written_as_several_entries_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "ENTRY_PAYLOAD_BYTES_MAX", 300)
    config = single_shard_config(tmp_path, limits=Limits(register_buyers_max=10))
    buyers = [f"buyer-{index:04d}" for index in range(400)]
    async with open_engine(config) as engine:
        assert (await engine.put_sku(SKU, stock=1000, per_buyer_limit=5)).ok
        assert (await engine.register(SKU, buyers)).ok
        replies = await engine.execute([Reserve(SKU, buyer, 1, f"key-{buyer}") for buyer in buyers])
        assert all(reply.ok for reply in replies)
    result = segment_entries(segment(tmp_path))
    assert len(result.entries) > 10
    assert all(len(json.dumps(entry)) < 600 for entry in result.entries)
    async with open_engine(config) as engine:
        assert await engine.stock(SKU) == StockReply(OK, stock=1000, available=600, held=400, sold=0)


# ------------------------------------------------------------------ format 1 directories


def write_format_1_directory(data_dir: Path, entries: list[list[tuple]], torn: bytes = b"") -> Path:
    """A data directory as soldout wrote it before format 2: no manifest, 12-byte entry headers."""
    (data_dir / "shard-0").mkdir(parents=True)
    (data_dir / "soldout.json").write_text(json.dumps({"format": 1, "shards": 1}))
    path = data_dir / "shard-0" / "journal-0000000000.log"
    path.write_bytes(b"".join(encode_legacy_entry(records) for records in entries) + torn)
    return path


def format_1_entries(holds: int) -> list[list[tuple]]:
    entries: list[list[tuple]] = [[(RECORD_PUT_SKU, SKU, 100, 100, 900, None, None, False)]]
    entries.append([(RECORD_REGISTER, SKU, ["a"])])
    for number in range(1, holds + 1):
        entries.append([(RECORD_HOLD, number, SKU, "a", 1, EPOCH, EPOCH + 900, f"k{number}")])
    return entries


async def test_a_format_1_directory_opens_keeps_its_state_and_is_upgraded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = single_shard_config(tmp_path)
    legacy = write_format_1_directory(tmp_path, format_1_entries(7), torn=b"SJ\x00\x00\x40")
    legacy_bytes = legacy.read_bytes()
    with caplog.at_level(logging.WARNING):
        async with open_engine(config) as engine:
            assert await engine.stock(SKU) == StockReply(OK, stock=100, available=93, held=7, sold=0)
            again = await engine.reserve(SKU, buyer="a", key="k3")
            assert again.reservation == "0-3"
            assert (await engine.reserve(SKU, buyer="a", key="new")).reservation == "0-8"
    assert any("torn tail" in record.getMessage() for record in caplog.records)
    assert json.loads((tmp_path / "soldout.json").read_text())["format"] == 2
    manifest = read_manifest(str(tmp_path / "shard-0"), 0)
    assert [(entry.number, entry.format) for entry in manifest.segments] == [(0, 1), (1, 2)]
    assert legacy.read_bytes() == legacy_bytes[: len(legacy_bytes) - 5]  # only the torn tail went
    async with open_engine(config) as engine:
        assert (await engine.stock(SKU)).held == 8
    # The sealed format 1 segment is checked to its recorded length from now on.
    legacy.write_bytes(legacy.read_bytes()[:-1])
    await assert_refused(config, JournalCorrupt, legacy)


async def test_a_flipped_length_in_a_format_1_journal_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    """The bug as first found: a high length byte flipped in the middle of a format 1
    journal made it look torn there, and the holds after it were silently cut off."""
    entries = format_1_entries(40)
    path = write_format_1_directory(tmp_path, entries)
    data = bytearray(path.read_bytes())
    offset = sum(len(encode_legacy_entry(records)) for records in entries[:20])
    (length,) = struct.unpack_from("<I", data, offset + 4)
    data[offset + 7] ^= 0x01  # the length's high byte: the entry now "runs past the end"
    assert struct.unpack_from("<I", data, offset + 4)[0] > len(data)
    path.write_bytes(bytes(data))
    error = await assert_refused(single_shard_config(tmp_path), JournalCorrupt, path)
    assert error.offset == offset  # type: ignore[attr-defined]
    assert length < len(data)


async def test_a_torn_tail_after_a_crash_is_still_cut_off(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    config = single_shard_config(tmp_path)
    await make_holds(config, 3)
    as_if_killed(tmp_path)
    path = segment(tmp_path)
    os.truncate(path, len(path.read_bytes()) - 2)
    assert await held_units(config) == 2


def test_export_reads_a_format_1_directory_as_it_is_without_upgrading_it(tmp_path: Path) -> None:
    import io

    from engine.export import export

    path = write_format_1_directory(tmp_path, format_1_entries(5), torn=b"SJ\x00")
    before = snapshot_of_files(tmp_path)
    output = io.StringIO()
    assert export(str(tmp_path), output) == 5
    assert snapshot_of_files(tmp_path) == before
    assert json.loads((tmp_path / "soldout.json").read_text())["format"] == 1
    assert not (tmp_path / "shard-0" / "manifest").exists()
    assert path.read_bytes().endswith(b"SJ\x00")


@given(
    body=st.binary(max_size=300),
    zeros=st.integers(min_value=0, max_value=3 * 65536),
)
@settings(max_examples=60, deadline=None)
def test_the_written_end_is_found_from_the_tail_alone(body: bytes, zeros: int) -> None:
    data = body + bytes(zeros)
    assert _written_end(data) == len(data.rstrip(b"\x00"))
