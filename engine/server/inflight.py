"""Bytes held for frames in flight, against a bound: one per connection, one per server.

A reader takes a frame's bytes before it decodes the frame and the writer gives them back
once the reply is on the socket, so what a peer that sends and never reads can pin is
bounded. Readers that wait for room wait in line, first come first served, so a large
frame is not passed over forever by small ones.
"""

from __future__ import annotations

from collections import deque

import trio


class _Turn:
    __slots__ = ("granted", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.granted = trio.Event()


class InflightBytes:
    def __init__(self, bytes_max: int) -> None:
        assert bytes_max >= 1
        self.bytes_max = bytes_max
        self.used = 0
        self._line: deque[_Turn] = deque()

    def _fits(self, size: int) -> bool:
        # A frame alone always fits: a bound below one frame must not stop a connection.
        return self.used == 0 or self.used + size <= self.bytes_max

    async def take(self, size: int) -> None:
        """Wait until `size` more bytes fit, then hold them."""
        assert size >= 0
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._line and self._fits(size):
            # No yield when there is room: a reader takes a frame's bytes right after
            # receiving it, and receiving yields already.
            self.used += size
            return
        turn = _Turn(size)
        self._line.append(turn)
        try:
            await turn.granted.wait()
        except BaseException:
            if turn.granted.is_set():
                self.release(size)  # granted as it was cancelled: give it back
            else:
                self._line.remove(turn)
                self._serve_line()  # the next in line may fit now
            raise

    def add(self, size: int) -> None:
        """Hold `size` more bytes at once, over the bound if need be: for memory that exists already."""
        assert size >= 0
        self.used += size

    def release(self, size: int) -> None:
        assert 0 <= size <= self.used, (size, self.used)
        self.used -= size
        self._serve_line()

    def _serve_line(self) -> None:
        while self._line and self._fits(self._line[0].size):
            turn = self._line.popleft()
            self.used += turn.size
            turn.granted.set()

    @property
    def waiting(self) -> int:
        return len(self._line)
