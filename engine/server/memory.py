"""Giving freed memory back to the operating system.

glibc's malloc keeps pages it has freed for reuse, and it raises its mmap threshold
after large frees, so later large buffers come from the heap too: after a crowd of
connections with megabytes in flight has left, the process would stay at its peak size.
`release_free_memory` asks malloc to return what it holds free (malloc_trim); it does
nothing where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import trio

from protocol.limits import TRIM_FREED_BYTES_MIN, TRIM_INTERVAL_SECONDS


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return the heap's free pages to the system now; False where that cannot be done."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class MemoryReturner:
    """Trims soon after large frees, and not more often than every `TRIM_INTERVAL_SECONDS`.

    `freed` is told how many bytes were let go; `run` (a task) does the trimming, after
    the code that let them go has dropped its references.
    """

    def __init__(self) -> None:
        self._freed = 0
        self._due = trio.Event()
        self.trims = 0

    def freed(self, size: int) -> None:
        self._freed += size
        if self._freed >= TRIM_FREED_BYTES_MIN:
            self._freed = 0
            self._due.set()

    async def run(self) -> None:
        while True:
            await self._due.wait()
            self._due = trio.Event()
            if release_free_memory():
                self.trims += 1
            await trio.sleep(TRIM_INTERVAL_SECONDS)
