"""A data directory: per-shard journal segments and snapshots, and their recovery.

Layout of `data_dir`:

    soldout.json                 format version and shard count, fixed at creation
    soldout.lock                 held (flock) by the one process that has it open
    shard-3/journal-0000000007.log   records committed since snapshot 7
    shard-3/snapshot-0000000007.msgpack   the book as it was when segment 7 began

Recovery loads the newest snapshot and replays the segments from its number on. A
new snapshot starts a new segment; older files are deleted only once it is on disk,
so a crash at any point leaves a snapshot and the segments that follow it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack

from engine.book import Book, Record
from engine.journal import (
    JournalCorrupt,
    JournalWriter,
    encode_entry,
    fsync_directory,
    read_entries,
    truncate,
)
from protocol.limits import Limits

log = logging.getLogger("soldout.store")

FORMAT_VERSION = 1
META_FILE = "soldout.json"
LOCK_FILE = "soldout.lock"
SNAPSHOT_MAGIC = b"SSNP"
SNAPSHOT_HEADER = struct.Struct("<4sQI")
_SEGMENT = re.compile(r"^journal-(\d{10})\.log$")
_SNAPSHOT = re.compile(r"^snapshot-(\d{10})\.msgpack$")


class DataDirError(Exception):
    """The data directory cannot be opened as asked: the message says why."""


class DataDir:
    """Holds a data directory open for one engine: its lock and its shard count."""

    def __init__(self, path: str, shards: int) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        self._lock_fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DataDirError(f"data directory {path} is in use by another soldout process") from None
        try:
            self._check_meta(shards)
        except BaseException:
            self.close()
            raise

    def _check_meta(self, shards: int) -> None:
        meta_path = os.path.join(self.path, META_FILE)
        if os.path.exists(meta_path):
            try:
                with open(meta_path) as file:
                    meta = json.load(file)
                recorded_shards = int(meta["shards"])
                version = int(meta["format"])
            except (ValueError, KeyError, TypeError) as error:
                raise DataDirError(f"{meta_path} is not a soldout data directory file: {error}") from None
            if version != FORMAT_VERSION:
                raise DataDirError(f"{meta_path} has format {version}; this soldout reads format {FORMAT_VERSION}")
            if recorded_shards != shards:
                raise DataDirError(
                    f"data directory {self.path} was created with {recorded_shards} shards, "
                    f"not {shards}: SKUs and holds are placed by shard count, so open it with "
                    f"shards={recorded_shards}"
                )
            return
        temporary = meta_path + ".tmp"
        with open(temporary, "w") as file:
            json.dump({"format": FORMAT_VERSION, "shards": shards}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, meta_path)
        fsync_directory(self.path)

    @staticmethod
    def check_exists(path: str) -> None:
        if not os.path.exists(os.path.join(path, META_FILE)):
            raise DataDirError(f"{path} is not a soldout data directory: no {META_FILE}")

    def shard_directory(self, shard: int) -> str:
        return os.path.join(self.path, f"shard-{shard}")

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def read_meta_shards(path: str) -> int:
    """The shard count recorded in a data directory, for tools that read it."""
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as file:
            return int(json.load(file)["shards"])
    except FileNotFoundError:
        raise DataDirError(f"{path} is not a soldout data directory: no {META_FILE}") from None


def _numbered(directory: str, pattern: re.Pattern[str]) -> list[int]:
    numbers = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def segment_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"journal-{number:010d}.log")


def snapshot_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"snapshot-{number:010d}.msgpack")


def write_snapshot(directory: str, number: int, data: dict[str, Any]) -> None:
    """Write snapshot `number` atomically, then drop the files it makes obsolete."""
    payload = msgpack.packb(data, use_bin_type=True)
    path = snapshot_path(directory, number)
    temporary = path + ".tmp"
    with open(temporary, "wb") as file:
        file.write(SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, len(payload), zlib.crc32(payload)))
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(directory)
    for older in _numbered(directory, _SNAPSHOT):
        if older < number:
            os.remove(snapshot_path(directory, older))
    for older in _numbered(directory, _SEGMENT):
        if older < number:
            os.remove(segment_path(directory, older))


def read_snapshot(path: str) -> dict[str, Any]:
    with open(path, "rb") as file:
        data = file.read()
    if len(data) < SNAPSHOT_HEADER.size:
        raise JournalCorrupt(path, 0, "snapshot shorter than its header")
    magic, length, checksum = SNAPSHOT_HEADER.unpack_from(data)
    payload = data[SNAPSHOT_HEADER.size :]
    if magic != SNAPSHOT_MAGIC or length != len(payload) or zlib.crc32(payload) != checksum:
        raise JournalCorrupt(path, 0, "snapshot fails its checksum")
    return msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=False)


@dataclass
class RebuiltBook:
    book: Book
    segment: int  # the segment new records go to
    records_since_snapshot: int
    torn_path: str | None = None  # the segment with a torn tail, if any
    torn_offset: int = 0
    torn_bytes: int = 0


def rebuild_book(directory: str, shard: int, limits: Limits) -> RebuiltBook:
    """Read a shard's snapshot and journal into a book, changing no file.

    Used by recovery (which then cuts the torn tail) and by `soldout export`, which
    may read the files of a running server: its torn tail is a commit in progress.
    """
    present = os.path.isdir(directory)
    snapshots = _numbered(directory, _SNAPSHOT) if present else []
    segment = 0
    if snapshots:
        segment = snapshots[-1]
        book = Book.from_snapshot(read_snapshot(snapshot_path(directory, segment)), limits)
        if book.shard != shard:
            raise DataDirError(f"{directory} holds the snapshot of shard {book.shard}")
    else:
        book = Book(shard, limits)
    rebuilt = RebuiltBook(book, segment, 0)
    segments = [number for number in _numbered(directory, _SEGMENT) if number >= segment] if present else []
    if segments and segments[0] != segment:
        raise DataDirError(f"{directory}: journal segment {segment} is missing")
    for position, number in enumerate(segments):
        path = segment_path(directory, number)
        result = read_entries(path)
        for records in result.entries:
            book.replay(records)
            rebuilt.records_since_snapshot += len(records)
        if result.torn_bytes:
            if position != len(segments) - 1:
                raise JournalCorrupt(path, result.valid_bytes, "torn entry in a segment that is not the last")
            rebuilt.torn_path = path
            rebuilt.torn_offset = result.valid_bytes
            rebuilt.torn_bytes = result.torn_bytes
        rebuilt.segment = number
    book.check_invariants()
    return rebuilt


class ShardStore:
    """One shard's files: recovers its book, commits its batches, rolls snapshots."""

    def __init__(self, directory: str, shard: int, durable: bool, limits: Limits) -> None:
        self.directory = directory
        self.shard = shard
        self.durable = durable
        self.limits = limits
        self.segment = 0
        self.records_since_snapshot = 0
        self._writer: JournalWriter | None = None

    def recover(self) -> Book:
        """Rebuild the book from the newest snapshot and the journal after it.

        A torn tail on the last segment is cut off with a warning; any other damage
        raises JournalCorrupt naming the file and offset.
        """
        os.makedirs(self.directory, exist_ok=True)
        rebuilt = rebuild_book(self.directory, self.shard, self.limits)
        if rebuilt.torn_path is not None:
            log.warning(
                "journal %s: cutting off a torn tail of %d bytes at offset %d",
                rebuilt.torn_path,
                rebuilt.torn_bytes,
                rebuilt.torn_offset,
            )
            truncate(rebuilt.torn_path, rebuilt.torn_offset)
        self.segment = rebuilt.segment
        self.records_since_snapshot = rebuilt.records_since_snapshot
        self._writer = JournalWriter(segment_path(self.directory, self.segment), self.durable)
        return rebuilt.book

    def commit(self, records: list[Record]) -> None:
        """Append one batch's records as one entry; durable: on disk when this returns."""
        assert self._writer is not None, "commit before recover"
        self._writer.append(encode_entry(records))
        self.records_since_snapshot += len(records)

    def start_snapshot(self) -> int:
        """Begin a new segment; the caller then writes snapshot N of the book as it is now."""
        assert self._writer is not None, "snapshot before recover"
        self._writer.close()
        self.segment += 1
        self._writer = JournalWriter(segment_path(self.directory, self.segment), self.durable)
        self.records_since_snapshot = 0
        return self.segment

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
