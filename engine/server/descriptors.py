"""How many sockets a server may hold: the process's descriptor limit, less a reserve.

A journal commit, a snapshot and a segment roll all open files while the server serves;
if sockets could take every descriptor, a crowd of connections would make them fail with
"Too many open files". The gateway accepts a socket only while one of the descriptors
computed here is free, so the reserve is never touched by sockets.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

from engine.server.config import ConfigError
from protocol.limits import DESCRIPTORS_PER_SHARD, DESCRIPTORS_SPARE, SOCKETS_MIN

log = logging.getLogger("soldout.descriptors")


class DescriptorLimitTooLow(ConfigError):
    """The descriptor limit leaves too few descriptors for sockets (stops the start as a bad config does)."""


@dataclass(frozen=True, slots=True)
class SocketBudget:
    descriptor_limit: int
    descriptors_open: int
    reserve: int
    sockets_max: int


def descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def descriptors_open() -> int:
    """Descriptors this process has open now."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            # Listing the directory opens one descriptor of its own.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return DESCRIPTORS_SPARE  # nowhere to count them: assume a spare's worth


def raise_descriptor_limit(wanted: int) -> int:
    """Raise the soft limit toward `wanted` (never past the hard limit); the limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        except (ValueError, OSError) as error:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, ceiling, error)
    return descriptor_limit()


def descriptors_wanted(shards: int, sockets: int) -> int:
    """The descriptor limit at which `sockets` fit beside the reserve (before counting what is open)."""
    return sockets + shards * DESCRIPTORS_PER_SHARD + DESCRIPTORS_SPARE


def socket_budget(shards: int) -> SocketBudget:
    """Sockets that fit now: the limit, less what is open, less the reserve for `shards`.

    Call it once the engine is open (its journals count among the descriptors open).
    """
    limit = descriptor_limit()
    open_now = descriptors_open()
    reserve = shards * DESCRIPTORS_PER_SHARD + DESCRIPTORS_SPARE
    sockets_max = limit - open_now - reserve
    if sockets_max < SOCKETS_MIN:
        raise DescriptorLimitTooLow(
            f"the descriptor limit (RLIMIT_NOFILE {limit}, {open_now} open) leaves {max(sockets_max, 0)} for "
            f"sockets once {reserve} are kept for {shards} shards' journals and snapshots; "
            f"at least {SOCKETS_MIN} are needed: raise it (ulimit -n)"
        )
    return SocketBudget(limit, open_now, reserve, sockets_max)
