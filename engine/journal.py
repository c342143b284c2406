"""The journal file format: append-only entries, each one commit's records.

An entry is a 12-byte header — magic b"SJ", 2 reserved bytes, the payload length and
the CRC-32 of the payload, little-endian — then the payload: the msgpack array of the
commit's records. A commit is one `write` (and, when durable, one `fsync`) of one
entry, so a crash leaves either the whole entry or a torn tail, never half a batch.

`read_entries` tells a torn tail (a write cut short by a crash: an incomplete entry
at the end, or zeros the file system left past the last write) from corruption
before the tail, which no crash can cause and which stops recovery.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

MAGIC = b"SJ\x00\x00"
HEADER = struct.Struct("<4sII")
HEADER_BYTES = HEADER.size
ENTRY_BYTES_MAX = 1 << 30


class JournalCorrupt(Exception):
    """A journal is damaged before its tail: soldout will not guess what it held."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"journal {path} is corrupt at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset


def encode_entry(records: list[Any]) -> bytes:
    payload = msgpack.packb(records, use_bin_type=True)
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True, slots=True)
class ReadResult:
    entries: list[list[Any]]
    valid_bytes: int  # the file's length up to the end of its last whole entry
    torn_bytes: int  # bytes past that: a torn tail, cut off by recovery


def read_entries(path: str) -> ReadResult:
    """Every whole entry of the journal at `path`, and where its torn tail starts."""
    with open(path, "rb") as file:
        data = file.read()
    entries: list[list[Any]] = []
    offset = 0
    size = len(data)
    for offset, payload_or_reason in _scan(data):
        if isinstance(payload_or_reason, str):
            reason = payload_or_reason
            if _is_tail(data, offset, reason):
                return ReadResult(entries, offset, size - offset)
            raise JournalCorrupt(path, offset, reason)
        try:
            entries.append(msgpack.unpackb(payload_or_reason, raw=False, use_list=False, strict_map_key=True))
        except (ValueError, msgpack.UnpackException) as error:
            raise JournalCorrupt(path, offset, f"entry passes its checksum but does not decode: {error}") from None
    return ReadResult(entries, size, 0)


def _scan(data: bytes) -> Iterator[tuple[int, bytes | str]]:
    """(offset, payload) for each entry; (offset, reason) at the first bad one, then stop."""
    offset = 0
    size = len(data)
    while offset < size:
        if size - offset < HEADER_BYTES:
            yield offset, "incomplete header"
            return
        magic, length, checksum = HEADER.unpack_from(data, offset)
        if magic != MAGIC:
            yield offset, "bad magic"
            return
        end = offset + HEADER_BYTES + length
        if length == 0:
            yield offset, "empty entry"  # encode_entry never writes one: zeros where a header was
            return
        if length > ENTRY_BYTES_MAX or end > size:
            yield offset, "entry runs past the end of the file"
            return
        payload = data[offset + HEADER_BYTES : end]
        if zlib.crc32(payload) != checksum:
            yield offset, "checksum mismatch"
            return
        yield offset, payload
        offset = end


def _is_tail(data: bytes, offset: int, reason: str) -> bool:
    """Whether the bad entry at `offset` is what a crash mid-append leaves behind.

    A crash keeps a prefix of the last write, and the file system may have grown the
    file with zeros past it. So the bad entry is a torn tail when everything after
    the part of it that could have been written is zeros; anything else after it is
    corruption, which no crash explains.
    """
    if reason in ("incomplete header", "entry runs past the end of the file"):
        return True
    if reason == "bad magic":
        kept = 0
        while kept < len(MAGIC) and offset + kept < len(data) and data[offset + kept] == MAGIC[kept]:
            kept += 1
        return _only_zeros_from(data, offset + kept)
    # An empty entry or a checksum mismatch: the header made it, the payload did not
    # (all of it); zeros may follow where the declared payload ends.
    _, length, _ = HEADER.unpack_from(data, offset)
    return _only_zeros_from(data, offset + HEADER_BYTES + length)


def _only_zeros_from(data: bytes, start: int) -> bool:
    return not data[start:].strip(b"\x00")


class JournalWriter:
    """Appends entries to one journal file; `durable` adds an fsync per commit."""

    def __init__(self, path: str, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.bytes_written = os.fstat(self._fd).st_size
        if durable:
            fsync_directory(os.path.dirname(path))

    def append(self, entry: bytes) -> None:
        """Write one entry; return only when it is on disk if the journal is durable."""
        view = memoryview(entry)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.durable:
            os.fsync(self._fd)
        self.bytes_written += len(entry)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def fsync_directory(path: str) -> None:
    """Make a file's creation or rename in `path` survive a machine crash."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate(path: str, length: int) -> None:
    with open(path, "r+b") as file:
        file.truncate(length)
        file.flush()
        os.fsync(file.fileno())
