"""Helpers for tests that read, damage or crash a data directory's files."""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from engine.journal import LEGACY_HEADER, LEGACY_MAGIC, ReadResult, read_entries
from engine.manifest import read_manifest, write_manifest

_SEGMENT = re.compile(r"journal-(\d{10})\.log$")
_SHARD = re.compile(r"shard-(\d+)$")


def segment_number(path: str | Path) -> int:
    match = _SEGMENT.search(str(path))
    assert match, f"{path} is not a journal segment"
    return int(match.group(1))


def shard_of(path: str | Path) -> int:
    match = _SHARD.search(str(Path(path).parent))
    assert match, f"{path} is not in a shard directory"
    return int(match.group(1))


def segment_entries(path: str | Path) -> ReadResult:
    """The entries of a format 2 segment, read the way recovery reads them."""
    return read_entries(str(path), shard=shard_of(path), number=segment_number(path))


def entry_offsets(path: str | Path) -> list[int]:
    """Where each whole entry of a segment starts."""
    result = segment_entries(path)
    assert result.torn_bytes == 0, f"{path} has a torn tail"
    return result.offsets


def as_if_killed(data_dir: str | Path) -> None:
    """Leave the manifests as a killed process leaves them: without the clean close.

    A clean close records each journal's final length, so that a file shortened while
    the server is down is refused. A process killed mid-run never wrote that length;
    tests that tear a journal the way such a crash does first undo it here.
    """
    for name in os.listdir(data_dir):
        match = _SHARD.fullmatch(name)
        if match:
            directory = os.path.join(data_dir, name)
            manifest = read_manifest(directory, int(match.group(1)))
            write_manifest(directory, dataclasses.replace(manifest, closed_bytes=None))


def encode_legacy_entry(records: Sequence[Any]) -> bytes:
    """A format 1 entry, as soldout before journal format 2 wrote it."""
    payload = msgpack.packb(records, use_bin_type=True)
    return LEGACY_HEADER.pack(LEGACY_MAGIC, len(payload), zlib.crc32(payload)) + payload
