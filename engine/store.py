"""A data directory: per-shard journal segments, snapshots and manifests, and their recovery.

Layout of `data_dir`:

    soldout.json                          format, shard count and a checksum, fixed at creation
    soldout.lock                          held (flock) by the one process that has it open
    shard-3/manifest                      the files shard 3 must hold (engine/manifest.py)
    shard-3/journal-0000000007.log        records committed since snapshot 7
    shard-3/snapshot-0000000007.msgpack   the book as it was when segment 7 began

Recovery loads the snapshot the manifest names and replays the segments it lists. A
snapshot starts a new segment; older files are deleted only once the manifest no
longer needs them, so a crash at any point leaves every file the manifest names.
A data directory made by soldout before format 2 (no manifests) is upgraded when it
is first opened: its files are checked as before, then listed, and sealed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack

from engine.book import Book, Record
from engine.checked_file import TEMPORARY_SUFFIX, read_checked_file, write_checked_file
from engine.journal import (
    SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
    JournalCorrupt,
    JournalWriter,
    encode_entry,
    fsync_directory,
    read_entries,
    truncate,
)
from engine.manifest import (
    MANIFEST_FILE,
    DataDirError,
    Manifest,
    MissingFile,
    SegmentEntry,
    read_manifest,
    write_manifest,
)
from protocol.limits import Limits

log = logging.getLogger("soldout.store")

FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
META_FILE = "soldout.json"
LOCK_FILE = "soldout.lock"
SNAPSHOT_MAGIC = b"SSNP"
_SEGMENT = re.compile(r"^journal-(\d{10})\.log$")
_SNAPSHOT = re.compile(r"^snapshot-(\d{10})\.msgpack$")
_SHARD_DIRECTORY = re.compile(r"^shard-(\d+)$")


def segment_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"journal-{number:010d}.log")


def snapshot_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"snapshot-{number:010d}.msgpack")


def _numbered(directory: str, pattern: re.Pattern[str]) -> list[int]:
    numbers = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


# ------------------------------------------------------------------ the directory


class DataDir:
    """Holds a data directory open for one engine: its lock, its shard count, its format."""

    def __init__(self, path: str, shards: int, limits: Limits | None = None) -> None:
        self.path = path
        self.limits = limits or Limits()
        os.makedirs(path, exist_ok=True)
        self._lock_fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DataDirError(f"data directory {path} is in use by another soldout process") from None
        try:
            self._open(shards)
        except BaseException:
            self.close()
            raise

    def _open(self, shards: int) -> None:
        meta_path = os.path.join(self.path, META_FILE)
        if not os.path.exists(meta_path):
            self._create(shards)
            return
        version, recorded_shards = read_meta(self.path)
        if recorded_shards != shards:
            raise DataDirError(
                f"data directory {self.path} was created with {recorded_shards} shards, "
                f"not {shards}: SKUs and holds are placed by shard count, so open it with "
                f"shards={recorded_shards}"
            )
        if version == LEGACY_FORMAT_VERSION:
            self._upgrade(shards)

    def _create(self, shards: int) -> None:
        """A new data directory: every shard's first segment and manifest, then soldout.json."""
        for name in os.listdir(self.path):
            if _SHARD_DIRECTORY.match(name):
                _refuse_if_it_holds_data(os.path.join(self.path, name))
        for shard in range(shards):
            directory = self.shard_directory(shard)
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):
                os.remove(os.path.join(directory, name))  # what an interrupted creation left
            writer = JournalWriter.create(segment_path(directory, 0), True, shard, 0)
            writer.close()
            write_manifest(directory, Manifest(shard, None, (SegmentEntry(0, 2, None),), SEGMENT_HEADER_BYTES))
            fsync_directory(self.path)
        # Written last: a directory without it was never finished, and holds no data.
        _write_meta(self.path, shards)

    def _upgrade(self, shards: int) -> None:
        """Format 1 to 2: check each shard's files as format 1 did, list them, seal them."""
        for shard in range(shards):
            directory = self.shard_directory(shard)
            os.makedirs(directory, exist_ok=True)
            _upgrade_shard(directory, shard, self.limits)
        _write_meta(self.path, shards)
        log.info("data directory %s upgraded to format %d", self.path, FORMAT_VERSION)

    def shard_directory(self, shard: int) -> str:
        return os.path.join(self.path, f"shard-{shard}")

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _meta_checksum(document: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps({"format": document["format"], "shards": document["shards"]}).encode())


def _write_meta(path: str, shards: int) -> None:
    document: dict[str, Any] = {"format": FORMAT_VERSION, "shards": shards}
    document["checksum"] = _meta_checksum(document)
    meta_path = os.path.join(path, META_FILE)
    temporary = meta_path + TEMPORARY_SUFFIX
    with open(temporary, "w") as file:
        json.dump(document, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, meta_path)
    fsync_directory(path)


def read_meta(path: str) -> tuple[int, int]:
    """(format, shard count) recorded in a data directory's soldout.json, checked."""
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as file:
            document = json.load(file)
        version = int(document["format"])
        shards = int(document["shards"])
    except FileNotFoundError:
        raise DataDirError(f"{path} is not a soldout data directory: no {META_FILE}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise DataDirError(f"{meta_path} is not a soldout data directory file: {error}") from None
    if version == FORMAT_VERSION and document.get("checksum") != _meta_checksum(document):
        raise DataDirError(f"{meta_path} fails its checksum: it was changed or damaged")
    if version not in (LEGACY_FORMAT_VERSION, FORMAT_VERSION):
        raise DataDirError(f"{meta_path} has format {version}; this soldout reads formats 1 and {FORMAT_VERSION}")
    return version, shards


def _refuse_if_it_holds_data(directory: str) -> None:
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        holds_entries = _SEGMENT.match(name) and os.path.getsize(path) > SEGMENT_HEADER_BYTES
        if holds_entries or _SNAPSHOT.match(name):
            raise DataDirError(
                f"{path} holds data but its data directory has no {META_FILE}: it was removed or the "
                "directory is damaged; restore it rather than start over an acknowledged sale"
            )


def legacy_manifest(directory: str, shard: int) -> Manifest:
    """The manifest a format 1 shard directory would have: its newest snapshot and the
    segments from it on, the last one being written. Read from the files, written nowhere."""
    snapshots = _numbered(directory, _SNAPSHOT) if os.path.isdir(directory) else []
    first = snapshots[-1] if snapshots else 0
    numbers = [n for n in _numbered(directory, _SEGMENT) if n >= first] if os.path.isdir(directory) else []
    if numbers and numbers != list(range(first, first + len(numbers))):
        raise DataDirError(f"shard {shard}: journal segments {numbers} of {directory} are not consecutive")
    if not numbers:
        raise MissingFile(segment_path(directory, first), f"journal segment {first} of shard {shard}")
    segments = [SegmentEntry(number, 1, os.path.getsize(segment_path(directory, number))) for number in numbers]
    segments[-1] = SegmentEntry(numbers[-1], 1, None)
    return Manifest(shard, first if snapshots else None, tuple(segments), 0)


def _upgrade_shard(directory: str, shard: int, limits: Limits) -> None:
    """Check a format 1 shard as format 1 did, cut its torn tail, seal it, begin a format 2 segment."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        match = _SEGMENT.match(name)
        path = os.path.join(directory, name)
        if match and _starts_format_2(path):
            os.remove(path)  # the empty first segment of an upgrade that was cut short
    if not _numbered(directory, _SNAPSHOT) and not _numbered(directory, _SEGMENT):
        with open(segment_path(directory, 0), "ab"):
            pass  # a shard format 1 never wrote to: its first segment, empty
    manifest = legacy_manifest(directory, shard)
    rebuilt = rebuild_book(directory, shard, limits, manifest)
    _cut_torn_tail(rebuilt)
    active = manifest.active.number + 1
    JournalWriter.create(segment_path(directory, active), True, shard, active).close()
    write_manifest(directory, manifest.with_new_segment(rebuilt.active_bytes, active, SEGMENT_HEADER_BYTES))


def _starts_format_2(path: str) -> bool:
    with open(path, "rb") as file:
        return file.read(len(SEGMENT_MAGIC)) == SEGMENT_MAGIC


# ------------------------------------------------------------------ snapshots


def write_snapshot(directory: str, number: int, data: dict[str, Any]) -> None:
    write_checked_file(snapshot_path(directory, number), SNAPSHOT_MAGIC, msgpack.packb(data, use_bin_type=True))


def _read_snapshot(path: str, shard: int) -> dict[str, Any]:
    payload = read_checked_file(path, SNAPSHOT_MAGIC, "snapshot")
    try:
        data = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as error:
        raise JournalCorrupt(path, 0, f"snapshot passes its checksum but does not decode: {error}") from None
    if not isinstance(data, dict) or data.get("shard") != shard:
        raise JournalCorrupt(path, 0, f"the snapshot is not shard {shard}'s")
    return data


# ------------------------------------------------------------------ reading a shard


@dataclass
class RebuiltBook:
    book: Book
    manifest: Manifest
    records_since_snapshot: int
    active_bytes: int  # the active segment's length up to its last whole entry
    torn_path: str | None = None  # the segment with a torn tail, if any
    torn_offset: int = 0
    torn_bytes: int = 0


def rebuild_book(directory: str, shard: int, limits: Limits, manifest: Manifest | None = None) -> RebuiltBook:
    """Read a shard's manifest, snapshot and journal into a book, changing no file.

    Every file the manifest names must be there, as long as it says; only the active
    segment may end in a torn tail, and only past the length it is known to have had.
    Used by recovery (which then cuts the torn tail) and by `soldout export`, which may
    read the files of a running server: its torn tail is a commit in progress.
    """
    manifest = manifest or read_manifest(directory, shard)
    if manifest.snapshot is None:
        book = Book(shard, limits)
    else:
        path = snapshot_path(directory, manifest.snapshot)
        try:
            book = Book.from_snapshot(_read_snapshot(path, shard), limits)
        except FileNotFoundError:
            raise MissingFile(path, f"snapshot {manifest.snapshot} of shard {shard}") from None
    records = 0
    active_bytes = 0
    torn: tuple[str, int, int] | None = None
    for segment in manifest.segments:
        path = segment_path(directory, segment.number)
        try:
            result = read_entries(path, shard=shard, number=segment.number, segment_format=segment.format)
        except FileNotFoundError:
            raise MissingFile(path, f"journal segment {segment.number} of shard {shard}") from None
        size = result.valid_bytes + result.torn_bytes
        if segment.bytes is not None:
            # A sealed segment: written to the end before the next one began.
            if result.torn_bytes:
                raise JournalCorrupt(path, result.valid_bytes, "torn entry in a segment that is not the last")
            if size != segment.bytes:
                reason = f"the segment has {size} bytes, not the {segment.bytes} it was sealed with"
                raise JournalCorrupt(path, min(size, segment.bytes), reason)
        else:
            known = manifest.active_bytes_min if manifest.closed_bytes is None else manifest.closed_bytes
            if result.valid_bytes < known:
                raise JournalCorrupt(
                    path,
                    result.valid_bytes,
                    f"the journal holds whole entries up to byte {result.valid_bytes} only, but it reached "
                    f"{known} bytes: it was shortened or damaged",
                )
            if manifest.closed_bytes is not None and size != manifest.closed_bytes:
                raise JournalCorrupt(
                    path, manifest.closed_bytes, f"the segment has {size} bytes, not the {known} it was closed with"
                )
            active_bytes = result.valid_bytes
            if result.torn_bytes:
                torn = (path, result.valid_bytes, result.torn_bytes)
        for entry in result.entries:
            book.replay(entry)
            records += len(entry)
    book.check_invariants()
    _refuse_unlisted_entries(directory, manifest)
    rebuilt = RebuiltBook(book, manifest, records, active_bytes)
    if torn is not None:
        rebuilt.torn_path, rebuilt.torn_offset, rebuilt.torn_bytes = torn
    return rebuilt


def _cut_torn_tail(rebuilt: RebuiltBook) -> None:
    """Cut off what a crash left of the last write, with a warning that says where."""
    if rebuilt.torn_path is None:
        return
    log.warning(
        "journal %s: cutting off a torn tail of %d bytes at offset %d",
        rebuilt.torn_path,
        rebuilt.torn_bytes,
        rebuilt.torn_offset,
    )
    truncate(rebuilt.torn_path, rebuilt.torn_offset)


def _refuse_unlisted_entries(directory: str, manifest: Manifest) -> None:
    """Nothing is committed to a segment before the manifest lists it: one that holds
    entries but is not listed means the manifest is older than the journal."""
    for number in _numbered(directory, _SEGMENT):
        path = segment_path(directory, number)
        if number > manifest.active.number and os.path.getsize(path) > SEGMENT_HEADER_BYTES:
            raise JournalCorrupt(path, SEGMENT_HEADER_BYTES, "entries in a segment the manifest does not list")


def _remove_unlisted_files(directory: str, manifest: Manifest) -> None:
    """Drop what a crash between two steps left: files the manifest no longer, or not yet, names."""
    listed = {os.path.basename(segment_path(directory, segment.number)) for segment in manifest.segments}
    if manifest.snapshot is not None:
        listed.add(os.path.basename(snapshot_path(directory, manifest.snapshot)))
    for name in os.listdir(directory):
        if name in listed or name == MANIFEST_FILE:
            continue
        path = os.path.join(directory, name)
        if _SEGMENT.match(name) or _SNAPSHOT.match(name) or name.endswith(TEMPORARY_SUFFIX):
            os.remove(path)


# ------------------------------------------------------------------ one shard's files


class ShardStore:
    """One shard's files: recovers its book, commits its batches, rolls snapshots."""

    def __init__(self, directory: str, shard: int, durable: bool, limits: Limits) -> None:
        self.directory = directory
        self.shard = shard
        self.durable = durable
        self.limits = limits
        self.records_since_snapshot = 0
        self._writer: JournalWriter | None = None
        self._manifest: Manifest | None = None
        # The shard's task and a snapshot's worker thread both rewrite the manifest.
        self._manifest_lock = threading.Lock()

    @property
    def segment(self) -> int:
        return self._manifest.active.number if self._manifest is not None else 0

    def load(self) -> RebuiltBook:
        """Read the book from the snapshot and journal the manifest names, changing no file.

        Any damage, or a missing file, raises naming the file (JournalCorrupt,
        MissingFile); an engine loads every shard before it changes any file.
        """
        return rebuild_book(self.directory, self.shard, self.limits)

    def adopt(self, rebuilt: RebuiltBook) -> Book:
        """Make the loaded book this store's: cut a torn tail (with a warning), drop the files
        a crash left that the manifest does not name, and record how far the journal reached.
        """
        manifest = rebuilt.manifest
        active = segment_path(self.directory, manifest.active.number)
        _cut_torn_tail(rebuilt)
        _remove_unlisted_files(self.directory, manifest)
        writer = JournalWriter.open_existing(active, self.durable)
        try:
            # What recovery read is on disk before the manifest says the journal reached it.
            writer.sync()
            manifest = Manifest(
                self.shard, manifest.snapshot, manifest.segments, rebuilt.active_bytes, closed_bytes=None
            )
            write_manifest(self.directory, manifest)
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self._manifest = manifest
        self.records_since_snapshot = rebuilt.records_since_snapshot
        return rebuilt.book

    def commit(self, records: list[Record]) -> None:
        """Append one batch's records as one write; durable: on disk when this returns."""
        assert self._writer is not None, "commit before recover"
        self._writer.append(encode_entry(records))
        self.records_since_snapshot += len(records)

    def start_snapshot(self) -> int:
        """Begin a new segment; the caller then writes snapshot N of the book as it is now.

        On an OSError the shard goes on writing the segment it had, and nothing changed.
        """
        writer, manifest = self._writer, self._manifest
        assert writer is not None, "snapshot before recover"
        assert manifest is not None
        number = manifest.active.number + 1
        path = segment_path(self.directory, number)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # an earlier attempt that failed after creating it
        new_writer = JournalWriter.create(path, self.durable, self.shard, number)
        try:
            if not self.durable:
                writer.sync()  # the sealed length the manifest records is on disk
            with self._manifest_lock:
                changed = manifest.with_new_segment(writer.bytes_written, number, new_writer.bytes_written)
                write_manifest(self.directory, changed)
                self._manifest = changed
        except BaseException:
            new_writer.close()
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
        writer.close()
        self._writer = new_writer
        self.records_since_snapshot = 0
        return number

    def finish_snapshot(self, number: int, data: dict[str, Any]) -> None:
        """Write snapshot `number` (a worker thread), then drop the files it makes obsolete."""
        write_snapshot(self.directory, number, data)
        with self._manifest_lock:
            assert self._manifest is not None
            changed = self._manifest.with_snapshot(number)
            write_manifest(self.directory, changed)
            self._manifest = changed
        _remove_unlisted_files(self.directory, changed)

    def restart_from_disk(self) -> Book:
        """After a failed commit: the book as the files hold it, made durable afresh.

        After a failed write or fsync neither the open file nor the page cache can be
        trusted to match the disk. So the book is rebuilt from the files, written as a
        new snapshot, and a new segment begins; the manifest moves to both at once.
        A crash before that leaves the manifest as it was, naming the old files.
        """
        self.close_after_fault()
        rebuilt = rebuild_book(self.directory, self.shard, self.limits)
        number = rebuilt.manifest.active.number + 1
        write_snapshot(self.directory, number, rebuilt.book.to_snapshot())
        path = segment_path(self.directory, number)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        writer = JournalWriter.create(path, self.durable, self.shard, number)
        try:
            manifest = Manifest(self.shard, number, (SegmentEntry(number, 2, None),), writer.bytes_written)
            write_manifest(self.directory, manifest)
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self._manifest = manifest
        self.records_since_snapshot = 0
        _remove_unlisted_files(self.directory, manifest)
        return rebuilt.book

    def close_after_fault(self) -> None:
        """Let go of the segment without recording anything: its state on disk is unknown."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """A clean close: the manifest records the journal's final length."""
        writer, manifest = self._writer, self._manifest
        if writer is None or manifest is None:
            return
        try:
            writer.sync()
            with self._manifest_lock:
                closed = Manifest(
                    self.shard, manifest.snapshot, manifest.segments, manifest.active_bytes_min, writer.bytes_written
                )
                write_manifest(self.directory, closed)
                self._manifest = closed
        except OSError as error:
            # The manifest still says how far the journal is known to reach: recovery is
            # as after a crash, which loses nothing acknowledged.
            log.error("shard %d: could not record its clean close (%s)", self.shard, error)
        finally:
            writer.close()
            self._writer = None
