"""The journal file format: segments of append-only entries, each one commit's records.

A segment (format 2) begins with a 28-byte segment header — magic b"SOLDJRNL", the
format, the shard and the segment number, and the CRC-32 of those bytes — written and
fsynced before the data directory's manifest lists the segment. Then come entries:

    header (16 bytes): magic b"SJ\\x02\\x00", payload length, payload CRC-32,
                       and the CRC-32 of those 12 bytes
    payload:           the msgpack array of the commit's records
    end mark (1 byte): 0xA5

The header checks itself, so a damaged length is caught before it decides how much is
read; the end mark is never zero, so a whole entry always ends in a non-zero byte.
A commit is one `write` (and, when durable, one `fsync`) of its entries.

`read_entries` tells a torn tail from damage. A crash can leave only a prefix of the
last write, then possibly zeros where the file system grew the file: so the bad entry
is a torn tail only when everything from the point where its bytes stop being written
is zeros, and that point lies inside the entry. Anything else stops recovery with
`JournalCorrupt`, naming the file and the offset.

Format 1 segments (no segment header; 12-byte entry headers whose length the checksum
does not cover) are still read, never written: a data directory made by an earlier
soldout seals them when it is first opened.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol.limits import JOURNAL_ENTRY_PAYLOAD_BYTES_MAX, LEGACY_JOURNAL_ENTRY_BYTES_MAX

SEGMENT_FORMAT = 2
SEGMENT_MAGIC = b"SOLDJRNL"
SEGMENT_HEADER = struct.Struct("<8sHHIQI")  # magic, format, reserved, shard, number, CRC of the rest
SEGMENT_HEADER_BYTES = SEGMENT_HEADER.size

ENTRY_MAGIC = b"SJ\x02\x00"
ENTRY_HEADER = struct.Struct("<4sIII")  # magic, payload length, payload CRC, header CRC
ENTRY_HEADER_BYTES = ENTRY_HEADER.size
ENTRY_END = b"\xa5"
# The largest payload one entry may declare (protocol/limits.py): a commit whose records
# encode larger is written as several entries in its one write, so a reader can refuse
# any larger length.
ENTRY_PAYLOAD_BYTES_MAX = JOURNAL_ENTRY_PAYLOAD_BYTES_MAX
# Trailing zeros are looked for this many bytes at a time, from the end of the file.
TAIL_SCAN_BYTES = 65536

LEGACY_MAGIC = b"SJ\x00\x00"
LEGACY_HEADER = struct.Struct("<4sII")  # magic, payload length, payload CRC
LEGACY_HEADER_BYTES = LEGACY_HEADER.size


class JournalCorrupt(Exception):
    """A journal is damaged before its tail: soldout will not guess what it held."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"journal {path} is corrupt at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


# ------------------------------------------------------------------ writing


def encode_segment_header(shard: int, number: int) -> bytes:
    body = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_FORMAT, 0, shard, number, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def encode_entry(records: Sequence[Any]) -> bytes:
    """One commit's records as the bytes of one write: a single entry unless it is huge."""
    payload = msgpack.packb(records, use_bin_type=True)
    if len(payload) <= ENTRY_PAYLOAD_BYTES_MAX:
        return _entry(payload)
    assert len(records) > 1, "one record is larger than an entry may be"
    middle = len(records) // 2
    return encode_entry(records[:middle]) + encode_entry(records[middle:])


def _entry(payload: bytes) -> bytes:
    head = struct.pack("<4sII", ENTRY_MAGIC, len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload + ENTRY_END


# ------------------------------------------------------------------ reading


@dataclass(frozen=True, slots=True)
class ReadResult:
    entries: list[list[Any]]
    valid_bytes: int  # the file's length up to the end of its last whole entry
    torn_bytes: int  # bytes past that: a torn tail, cut off by recovery
    offsets: list[int] = field(default_factory=list)  # where each whole entry starts


def read_segment_header(path: str, data: bytes, shard: int, number: int) -> None:
    """Check a format 2 segment's header: it is fsynced before the segment is listed."""
    if len(data) < SEGMENT_HEADER_BYTES:
        raise JournalCorrupt(path, 0, f"the segment header is missing (the file has {len(data)} bytes)")
    magic, version, _, recorded_shard, recorded_number, checksum = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or zlib.crc32(data[: SEGMENT_HEADER_BYTES - 4]) != checksum:
        raise JournalCorrupt(path, 0, "the segment header fails its checksum")
    if version != SEGMENT_FORMAT:
        raise JournalCorrupt(path, 0, f"segment format {version}; this soldout reads format {SEGMENT_FORMAT}")
    if (recorded_shard, recorded_number) != (shard, number):
        raise JournalCorrupt(
            path, 0, f"the file is segment {recorded_number} of shard {recorded_shard}, not {number} of {shard}"
        )


def read_entries(path: str, *, shard: int, number: int, segment_format: int = SEGMENT_FORMAT) -> ReadResult:
    """Every whole entry of the segment at `path`, and where its torn tail starts."""
    with open(path, "rb") as file:
        data = file.read()
    if segment_format == SEGMENT_FORMAT:
        read_segment_header(path, data, shard, number)
        return parse_entries(path, data, SEGMENT_HEADER_BYTES)
    assert segment_format == 1, f"unknown segment format {segment_format}"
    return parse_legacy_entries(path, data)


def parse_entries(path: str, data: bytes, start: int) -> ReadResult:
    """Format 2 entries of `data` from `start` on (see the module docstring for the rule)."""
    size = len(data)
    # Past `written_end` the file is zeros to its end: a torn write stops at or after it.
    written_end = _written_end(data)
    entries: list[list[Any]] = []
    offsets: list[int] = []
    offset = start
    while offset < size:
        if offset >= written_end:
            return ReadResult(entries, offset, size - offset, offsets)  # zeros past the last entry
        if written_end - offset < ENTRY_HEADER_BYTES:
            # The written bytes end inside a header: torn, if what is there begins like one.
            present = data[offset : min(written_end, offset + len(ENTRY_MAGIC))]
            if ENTRY_MAGIC.startswith(present):
                return ReadResult(entries, offset, size - offset, offsets)
            raise JournalCorrupt(path, offset, "bytes that are not an entry follow the last entry")
        magic, length, payload_checksum, header_checksum = ENTRY_HEADER.unpack_from(data, offset)
        # The written bytes go past this header, so a crash left it whole: it must check.
        if magic != ENTRY_MAGIC:
            raise JournalCorrupt(path, offset, "bad entry magic")
        if zlib.crc32(data[offset : offset + ENTRY_HEADER_BYTES - 4]) != header_checksum:
            raise JournalCorrupt(path, offset, "the entry header fails its checksum")
        if not 0 < length <= ENTRY_PAYLOAD_BYTES_MAX:
            raise JournalCorrupt(path, offset, f"the entry declares {length} payload bytes")
        payload_start = offset + ENTRY_HEADER_BYTES
        end = payload_start + length + len(ENTRY_END)
        if end > written_end:
            # Its end mark is not written: the write was cut inside this entry.
            return ReadResult(entries, offset, size - offset, offsets)
        if data[end - 1 : end] != ENTRY_END:
            raise JournalCorrupt(path, offset, "the entry's end mark is missing")
        payload = data[payload_start : end - 1]
        if zlib.crc32(payload) != payload_checksum:
            raise JournalCorrupt(path, offset, "checksum mismatch")
        entries.append(_decode(path, offset, payload))
        offsets.append(offset)
        offset = end
    return ReadResult(entries, size, 0, offsets)


def _written_end(data: bytes) -> int:
    """The length of `data` without its trailing zeros, looking only at its end."""
    end = len(data)
    while end > 0:
        start = max(0, end - TAIL_SCAN_BYTES)
        kept = len(data[start:end].rstrip(b"\x00"))
        if kept:
            return start + kept
        end = start
    return 0


def parse_legacy_entries(path: str, data: bytes) -> ReadResult:
    """Format 1 entries: a bad entry is a torn tail only when nothing whole follows it."""
    size = len(data)
    entries: list[list[Any]] = []
    offsets: list[int] = []
    offset = 0
    while offset < size:
        reason = _legacy_problem(data, offset)
        if reason is not None:
            if _legacy_is_tail(data, offset, reason):
                return ReadResult(entries, offset, size - offset, offsets)
            raise JournalCorrupt(path, offset, reason)
        _, length, _ = LEGACY_HEADER.unpack_from(data, offset)
        end = offset + LEGACY_HEADER_BYTES + length
        entries.append(_decode(path, offset, data[offset + LEGACY_HEADER_BYTES : end]))
        offsets.append(offset)
        offset = end
    return ReadResult(entries, size, 0, offsets)


def _legacy_problem(data: bytes, offset: int) -> str | None:
    size = len(data)
    if size - offset < LEGACY_HEADER_BYTES:
        return "incomplete header"
    magic, length, checksum = LEGACY_HEADER.unpack_from(data, offset)
    if magic != LEGACY_MAGIC:
        return "bad magic"
    if length == 0:
        return "empty entry"  # never written: zeros where a header was
    end = offset + LEGACY_HEADER_BYTES + length
    if length > LEGACY_JOURNAL_ENTRY_BYTES_MAX or end > size:
        return "entry runs past the end of the file"
    if zlib.crc32(data[offset + LEGACY_HEADER_BYTES : end]) != checksum:
        return "checksum mismatch"
    return None


def _legacy_is_tail(data: bytes, offset: int, reason: str) -> bool:
    """Whether the bad format 1 entry at `offset` is what a crash mid-append leaves.

    Its header has no checksum of its own, so a damaged length can look like a cut
    write; a whole, checking entry anywhere after it proves that it is not the tail.
    """
    if _a_whole_entry_follows(data, offset + 1):
        return False
    if reason in ("incomplete header", "entry runs past the end of the file"):
        return True
    if reason == "bad magic":
        kept = 0
        while kept < len(LEGACY_MAGIC) and offset + kept < len(data) and data[offset + kept] == LEGACY_MAGIC[kept]:
            kept += 1
        return not data[offset + kept :].strip(b"\x00")
    _, length, _ = LEGACY_HEADER.unpack_from(data, offset)
    return not data[offset + LEGACY_HEADER_BYTES + length :].strip(b"\x00")


def _a_whole_entry_follows(data: bytes, start: int) -> bool:
    position = data.find(LEGACY_MAGIC, start)
    while position >= 0:
        if _legacy_problem(data, position) is None:
            return True
        position = data.find(LEGACY_MAGIC, position + 1)
    return False


def _decode(path: str, offset: int, payload: bytes) -> list[Any]:
    try:
        return msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as error:
        raise JournalCorrupt(path, offset, f"entry passes its checksum but does not decode: {error}") from None


# ------------------------------------------------------------------ the file


# The system calls a commit makes, looked up at call time so that tests can make them
# fail the way a full or failing disk does.
write_system_call = os.write
fsync_system_call = os.fsync


class JournalWriter:
    """Appends entries to one segment file; `durable` adds an fsync per commit."""

    def __init__(self, path: str, durable: bool, fd: int) -> None:
        self.path = path
        self.durable = durable
        self._fd = fd
        self.bytes_written = os.fstat(fd).st_size

    @classmethod
    def create(cls, path: str, durable: bool, shard: int, number: int) -> JournalWriter:
        """Make a new segment with its header, on disk (file and name) when this returns."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _write_all(fd, encode_segment_header(shard, number))
            # Always synced: the manifest will list this segment, so its header must be there.
            fsync_system_call(fd)
            fsync_directory(os.path.dirname(path))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, durable, fd)

    @classmethod
    def open_existing(cls, path: str, durable: bool) -> JournalWriter:
        return cls(path, durable, os.open(path, os.O_WRONLY | os.O_APPEND))

    def append(self, entry: bytes) -> None:
        """Write one commit; return only when it is on disk if the journal is durable."""
        _write_all(self._fd, entry)
        if self.durable:
            fsync_system_call(self._fd)
        self.bytes_written += len(entry)

    def sync(self) -> None:
        fsync_system_call(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = write_system_call(fd, view)
        view = view[written:]


def fsync_directory(path: str) -> None:
    """Make a file's creation or rename in `path` survive a machine crash."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        fsync_system_call(fd)
    finally:
        os.close(fd)


def truncate(path: str, length: int) -> None:
    with open(path, "r+b") as file:
        file.truncate(length)
        file.flush()
        fsync_system_call(file.fileno())
