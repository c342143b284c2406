"""A shard's manifest: which files its directory must hold, and how far its journal reached.

Without it a deleted or emptied file would look like a shard that never had data. The
manifest names the snapshot recovery starts from, every journal segment after it (with
the exact length of each segment no longer written), and for the segment being written
the length it is known to have reached: at its last recovery or segment change, and at
a clean close its final length. Recovery refuses a file that is missing, or shorter
than the manifest says, with an error that names it; only what lies past the known
length can be a torn tail.

It is rewritten (atomically, fsynced) only when the set of files or those lengths
change: at recovery, when a snapshot starts a new segment, when a snapshot is on disk,
and at a clean close. Never per commit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from engine.checked_file import read_checked_file, write_checked_file
from engine.journal import JournalCorrupt

MANIFEST_FILE = "manifest"
MANIFEST_MAGIC = b"SMAN"
MANIFEST_FORMAT = 1


class DataDirError(Exception):
    """The data directory cannot be opened as asked: the message says why."""


class MissingFile(DataDirError):
    """A file the data directory must hold is not there."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{what} is missing: {path} does not exist")
        self.path = path


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    number: int
    format: int  # 2, or 1 for a segment written before format 2
    bytes: int | None  # the final length; None for the segment being written (the last)


@dataclass(frozen=True, slots=True)
class Manifest:
    shard: int
    snapshot: int | None  # the snapshot recovery starts from; None: from an empty book
    segments: tuple[SegmentEntry, ...]  # consecutive numbers; the last is being written
    active_bytes_min: int  # the last segment is at least this long
    closed_bytes: int | None = None  # set by a clean close: the last segment's exact length

    def __post_init__(self) -> None:
        assert self.segments, "a shard always has a segment to write"
        numbers = [segment.number for segment in self.segments]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), f"segments not consecutive: {numbers}"
        assert self.snapshot is None or self.snapshot == numbers[0], "segments start at the snapshot"
        assert all(segment.bytes is not None for segment in self.segments[:-1]), "sealed segments have a length"
        assert self.segments[-1].bytes is None, "the last segment is being written"

    @property
    def active(self) -> SegmentEntry:
        return self.segments[-1]

    def with_new_segment(self, sealed_bytes: int, number: int, active_bytes_min: int) -> Manifest:
        """The active segment sealed at `sealed_bytes`, and segment `number` begun."""
        assert number == self.active.number + 1
        sealed = replace(self.active, bytes=sealed_bytes)
        return replace(
            self,
            segments=(*self.segments[:-1], sealed, SegmentEntry(number, 2, None)),
            active_bytes_min=active_bytes_min,
            closed_bytes=None,
        )

    def with_snapshot(self, number: int) -> Manifest:
        """Snapshot `number` is on disk: the files before it are no longer needed."""
        return replace(self, snapshot=number, segments=tuple(s for s in self.segments if s.number >= number))


def manifest_path(directory: str) -> str:
    return os.path.join(directory, MANIFEST_FILE)


def write_manifest(directory: str, manifest: Manifest) -> None:
    document = {
        "format": MANIFEST_FORMAT,
        "shard": manifest.shard,
        "snapshot": manifest.snapshot,
        "segments": [[segment.number, segment.format, segment.bytes] for segment in manifest.segments],
        "active_bytes_min": manifest.active_bytes_min,
        "closed_bytes": manifest.closed_bytes,
    }
    write_checked_file(manifest_path(directory), MANIFEST_MAGIC, json.dumps(document).encode())


def read_manifest(directory: str, shard: int) -> Manifest:
    """The manifest of shard `shard`; its absence or any damage is an error naming the file."""
    if not os.path.isdir(directory):
        raise MissingFile(directory, f"the directory of shard {shard}")
    path = manifest_path(directory)
    try:
        payload = read_checked_file(path, MANIFEST_MAGIC, "manifest")
    except FileNotFoundError:
        raise MissingFile(path, f"the manifest of shard {shard}") from None
    try:
        document = json.loads(payload)
        if document["format"] != MANIFEST_FORMAT:
            raise JournalCorrupt(path, 0, f"manifest format {document['format']} is not {MANIFEST_FORMAT}")
        manifest = Manifest(
            shard=document["shard"],
            snapshot=document["snapshot"],
            segments=tuple(SegmentEntry(number, format, size) for number, format, size in document["segments"]),
            active_bytes_min=document["active_bytes_min"],
            closed_bytes=document["closed_bytes"],
        )
    except (ValueError, KeyError, TypeError, AssertionError) as error:
        raise JournalCorrupt(path, 0, f"the manifest passes its checksum but does not make sense: {error}") from None
    if manifest.shard != shard:
        raise JournalCorrupt(path, 0, f"the manifest is shard {manifest.shard}'s, not shard {shard}'s")
    return manifest
