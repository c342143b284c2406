"""Every bound soldout enforces, in one place. Units come last in names.

`Limits` holds the bounds an operator may set (the `[limits]` table of a server's
config file fills one in); it checks each against the others when it is made. The
constants below it are bounds fixed by a format or by the design: the protocol's ids,
the journal's entries, the reservation ids, the server's queues and backoffs. Nothing
here touches trio or sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

# ------------------------------------------------------------ fixed by a format
# Request ids are signed 64-bit integers, so that a client in any language can hold them.
ID_MIN: Final = -(2**63)
ID_MAX: Final = 2**63 - 1
# Anything of the peer's that an error message quotes is cut to this many characters.
ECHO_CHARS_MAX: Final = 64
# A reservation id is "<shard>-<hold number>": a shard below SHARDS_MAX, a hold number
# that fits in a signed 64-bit integer.
SHARDS_MAX: Final = 1024
RESERVATION_SHARD_DIGITS_MAX: Final = len(str(SHARDS_MAX - 1))
RESERVATION_NUMBER_DIGITS_MAX: Final = 18
# A hold lasts at most a year (and a day, for leap years).
HOLD_SECONDS_MAX: Final = 366 * 86400
# One journal entry's payload; a commit larger than this is written as several entries
# in one write. Readers refuse a larger length as damage, so it is part of the format.
JOURNAL_ENTRY_PAYLOAD_BYTES_MAX: Final = 1 << 28
# The largest entry format 1 (read-only) could hold.
LEGACY_JOURNAL_ENTRY_BYTES_MAX: Final = 1 << 30

# ------------------------------------------------------------ fixed by the design
# Left out, a connection's bound on bytes in flight is this share of the server's, so
# it takes this many connections that never read to fill the server's bound.
INFLIGHT_BYTES_SHARES: Final = 16
# Reply frames queued for one connection's writer; beyond it the connection's own
# frame tasks wait, holding their in-flight count, so its reader turns to `busy`.
OUTBOX_FRAMES_MAX: Final = 64
# trio-websocket's queue of received messages: none beyond the one it hands over, so a
# connection whose reader waits for room holds at most two frames outside the bounds.
RECEIVED_FRAMES_QUEUED_MAX: Final = 0
# SKU names whose shard the engine remembers: names that are not SKUs (a client's typos,
# an attacker's noise) cannot grow memory without end.
SKU_SHARD_CACHE_ENTRIES_MAX: Final = 100_000
# Backoff between attempts to reopen a shard's journal after a fault, and to retry a
# snapshot that failed.
RETRY_SECONDS_MIN: Final = 0.1
RETRY_SECONDS_MAX: Final = 5.0
# While shutting down, a peer gets this long to answer the close frame (the grace is
# for answering requests in flight, not for waiting on peers), and once the last
# connection has closed the listener answers 503 this long more.
SHUTDOWN_CLOSE_SECONDS: Final = 0.25
# accept() failing for want of resources is retried after this long (as trio's own
# serve_listeners does); the descriptor budget should make it rare.
ACCEPT_RETRY_SECONDS: Final = 0.1
# Descriptors kept out of the sockets' reach. At most open at once for one shard: its
# journal segment, the next segment and the directory fsync that makes it durable while
# the old one is closed, and a snapshot's temporary file (then its directory fsync),
# which a worker thread writes beside commits.
DESCRIPTORS_PER_SHARD: Final = 4
# The rest of the process: the metrics endpoint's connections, the log, modules imported
# late, the descriptor listing itself, and room for what a library opens unasked.
DESCRIPTORS_SPARE: Final = 48
# Below this many sockets a server is not worth starting: raise the limit instead.
SOCKETS_MIN: Final = 8
# Returning freed memory to the system walks the heap: not more often than this, and
# only after this much was let go.
TRIM_INTERVAL_SECONDS: Final = 1.0
TRIM_FREED_BYTES_MIN: Final = 16 * 1024 * 1024
# Socket reads: trio-websocket's own read size, and what is read at a time (and thrown
# away) while waiting for a closing peer to hang up.
RECEIVE_BYTES: Final = 4096
DRAIN_BYTES: Final = 65536
# What a gateway connection reads at a time: a frame of a hundred requests (about 8 KiB)
# in one read, not two or three, each a system call and a pass through wsproto. The
# buffer is sized to what arrived once read, so an idle connection holds none of it.
GATEWAY_RECEIVE_BYTES: Final = 65536
# The metrics endpoint: scrapers served at once, and the size of a request's head.
METRICS_CONNECTIONS_MAX: Final = 8
METRICS_REQUEST_BYTES_MAX: Final = 16384

# ------------------------------------------------------------ the cluster
# Journal messages read from JetStream per call while a shard's owner replays.
CLUSTER_REPLAY_READ_MESSAGES_MAX: Final = 1024
# How long a node waits for NATS at start before it gives up with one line.
CLUSTER_CONNECT_SECONDS_MAX: Final = 10.0
# How long a batch for another node's shard waits for its answer before it is unavailable.
CLUSTER_REQUEST_SECONDS_MAX: Final = 2.0
# A journal read asks again after this pause when JetStream answers 503 (the consumer
# it just made is not ready to serve yet), within the read's own bound.
CLUSTER_READ_RETRY_SECONDS: Final = 0.05
# Requests a gateway keeps in flight to one remote shard's owner; batches that arrive
# meanwhile wait and go together in the next one (up to batch_requests_max commands), as
# a shard's group commit does: a NATS request costs the same CPU for 1 command as for 1,000.
CLUSTER_FORWARDS_IN_FLIGHT_MAX: Final = 4

# ------------------------------------------------------------ the clients
# What the clients send in one frame unless told otherwise: well under the server's
# batch_requests_max (1000), as SPEC.md section 6 asks; and the calls they keep in flight.
CLIENT_BATCH_REQUESTS_MAX: Final = 100
CLIENT_INFLIGHT_REQUESTS_MAX: Final = 10_000
# The largest reply frame a client reads (4 MiB): replies run longer than requests, so
# a batch's replies may be larger than the frame that asked.
CLIENT_REPLY_FRAME_BYTES_MAX: Final = 4 * 1_048_576
# After a dropped connection: attempts to reconnect, each waiting this much longer than
# the one before, up to this many steps (1 s).
CLIENT_RECONNECT_ATTEMPTS: Final = 20
CLIENT_RECONNECT_DELAY_SECONDS: Final = 0.05
CLIENT_RECONNECT_DELAY_STEPS_MAX: Final = 20
# A reserve answered `unavailable` is sent again with its key up to this many times, the
# pause doubling from the first to the last (0.1 s, 0.2 s, 0.4 s, ... 2 s: about 13 s in
# all, well past a cluster's failover with its default 3 s lease, a loaded one included).
CLIENT_UNAVAILABLE_RETRIES_MAX: Final = 10
CLIENT_UNAVAILABLE_RETRY_SECONDS: Final = 0.1
CLIENT_UNAVAILABLE_RETRY_SECONDS_MAX: Final = 2.0
# How long a client waits for the server's answer to its close frame.
CLIENT_CLOSE_SECONDS_MAX: Final = 2.0
# The admin CLI's register requests in flight at once while it streams a large buyer file.
REGISTER_INFLIGHT_MAX: Final = 8


@dataclass(frozen=True, slots=True)
class Limits:
    # The wire (protocol/ and the gateway).
    frame_bytes_max: int = 1_048_576
    batch_requests_max: int = 1000
    # Requests received on one connection and not yet answered; never below
    # batch_requests_max, or every batch larger than it would be answered busy forever.
    inflight_requests_max: int = 10_000
    # Payload bytes held for one connection's frames, from the moment the gateway takes a
    # frame until its reply is written to the socket (a frame may hold 1 request of 1 MiB,
    # so the request count alone does not bound memory): past it the gateway stops
    # reading that connection. Left out: server_inflight_bytes_max / INFLIGHT_BYTES_SHARES.
    inflight_bytes_max: int | None = None
    connections_max: int = 10_000
    # Names: SKU, buyer, idempotency key, reservation id, order id, in UTF-8 bytes.
    string_bytes_max: int = 256
    # The book.
    qty_max: int = 1000
    stock_max: int = 1_000_000_000
    register_buyers_max: int = 10_000
    # The shard actors: batches waiting in a shard's mailbox (each the commands one
    # caller hands over at once), and the commands a shard decides and commits together.
    mailbox_batches_max: int = 1024
    shard_batch_commands_max: int = 20_000
    # The same bytes as inflight_bytes_max, for all connections together. Past it, a
    # connection takes a frame only when it has none in flight, so that every connection
    # keeps moving, one frame at a time, while others hold the rest.
    server_inflight_bytes_max: int = 268_435_456
    # From the TCP connection to the upgrade request read (and from a close frame sent
    # to the peer's answer): past it the server hangs up.
    handshake_seconds_max: int = 5
    # TCP connections not admitted as websocket connections: waiting for their upgrade
    # request, or reading its refusal. Beyond them new connections wait in the kernel's
    # listen queue, holding no descriptor of ours.
    handshakes_max: int = 1000

    def __post_init__(self) -> None:
        if self.inflight_bytes_max is None and type(self.server_inflight_bytes_max) is int:
            derived = max(1, self.server_inflight_bytes_max // INFLIGHT_BYTES_SHARES)
            object.__setattr__(self, "inflight_bytes_max", derived)
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"limits.{field.name} must be a positive integer, got {value!r}")
        assert self.inflight_bytes_max is not None
        # Each pair: (smaller, larger, what goes wrong otherwise).
        ordered = (
            (
                "batch_requests_max",
                "inflight_requests_max",
                "every batch larger than it would be answered busy forever",
            ),
            (
                "batch_requests_max",
                "shard_batch_commands_max",
                "a shard could not take a whole frame's requests in one batch",
            ),
            ("frame_bytes_max", "inflight_bytes_max", "a frame larger than it would wait for room forever"),
            ("inflight_bytes_max", "server_inflight_bytes_max", "one connection could hold more than the server"),
            (
                "register_buyers_max",
                "shard_batch_commands_max",
                "a register could name more buyers than a shard decides at once",
            ),
            ("qty_max", "stock_max", "a reserve could ask for more units than any SKU holds"),
        )
        for smaller, larger, because in ordered:
            low, high = getattr(self, smaller), getattr(self, larger)
            if low > high:
                raise ValueError(f"limits.{larger} ({high}) is below limits.{smaller} ({low}): {because}")
        if self.frame_bytes_max >= JOURNAL_ENTRY_PAYLOAD_BYTES_MAX:
            raise ValueError(
                f"limits.frame_bytes_max ({self.frame_bytes_max}) must be below the journal's entry bound "
                f"({JOURNAL_ENTRY_PAYLOAD_BYTES_MAX} bytes)"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))


# The clients' defaults must fit the server's defaults.
_SERVER_DEFAULTS = Limits()
if (
    _SERVER_DEFAULTS.batch_requests_max < CLIENT_BATCH_REQUESTS_MAX
    or _SERVER_DEFAULTS.inflight_requests_max < CLIENT_INFLIGHT_REQUESTS_MAX
):
    raise ImportError("the clients' default batch or in-flight bound is above the server's")
if _SERVER_DEFAULTS.frame_bytes_max > CLIENT_REPLY_FRAME_BYTES_MAX:
    raise ImportError("a client could not read a reply frame as large as the server's request frames")
