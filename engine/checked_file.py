"""Small files that soldout replaces whole: snapshots and manifests.

Each is a 16-byte header — a 4-byte magic naming the kind of file, the payload length
and the payload's CRC-32 — then the payload. It is written to a temporary file,
fsynced and renamed over the old one (then the directory is fsynced), so a reader sees
the old file or the new one, whole; one that fails its check was damaged after.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib

from engine import journal
from engine.journal import JournalCorrupt, fsync_directory

HEADER = struct.Struct("<4sQI")  # magic, payload length, payload CRC-32
TEMPORARY_SUFFIX = ".tmp"


def write_checked_file(path: str, magic: bytes, payload: bytes) -> None:
    """Replace `path` with `payload` atomically; on disk when this returns."""
    assert len(magic) == 4
    temporary = path + TEMPORARY_SUFFIX
    try:
        with open(temporary, "wb") as file:
            file.write(HEADER.pack(magic, len(payload), zlib.crc32(payload)))
            file.write(payload)
            file.flush()
            journal.fsync_system_call(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        # A full disk leaves no half-written temporary behind to fill it further.
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    fsync_directory(os.path.dirname(path))


def read_checked_file(path: str, magic: bytes, what: str) -> bytes:
    """The payload of `path`, checked; JournalCorrupt names the file when it fails."""
    with open(path, "rb") as file:
        data = file.read()
    if len(data) < HEADER.size:
        raise JournalCorrupt(path, 0, f"{what} is shorter than its header ({len(data)} bytes)")
    found, length, checksum = HEADER.unpack_from(data)
    payload = data[HEADER.size :]
    if found != magic:
        raise JournalCorrupt(path, 0, f"not a {what}: bad magic")
    if length != len(payload) or zlib.crc32(payload) != checksum:
        raise JournalCorrupt(path, 0, f"{what} fails its checksum")
    return payload
