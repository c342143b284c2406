"""Opening the server's TCP listeners, with an error an operator can act on."""

from __future__ import annotations

import trio


class ListenError(Exception):
    """A port cannot be listened on (in use, not permitted, no such address)."""


async def open_listeners(host: str, port: int, what: str) -> list[trio.SocketListener]:
    """trio's TCP listeners on host:port, or a ListenError that says which port and why."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        shown = f"[{host}]" if ":" in host else host
        reason = (error.strerror or str(error)).lower()
        raise ListenError(f"cannot listen on {shown}:{port} ({what}): {reason}") from None
