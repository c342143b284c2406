"""Every bound soldout enforces, in one place.

The codec, the engine and the gateway all read their caps from a `Limits`; the
`[limits]` table of a server's config file fills one in. Units come last in names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# Left out, a connection's bound on bytes in flight is this share of the server's, so
# it takes this many connections that never read to fill the server's bound.
INFLIGHT_BYTES_SHARES = 16


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
    # Names: SKU, buyer, idempotency key, reservation id, counted in UTF-8 bytes.
    string_bytes_max: int = 256
    # The book.
    qty_max: int = 1000
    stock_max: int = 1_000_000_000
    register_buyers_max: int = 10_000
    # The shard actors.
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
        if self.inflight_requests_max < self.batch_requests_max:
            raise ValueError(
                f"limits.inflight_requests_max ({self.inflight_requests_max}) is below "
                f"limits.batch_requests_max ({self.batch_requests_max}): every batch larger than it "
                "would be answered busy forever"
            )
        assert self.inflight_bytes_max is not None
        if self.inflight_bytes_max > self.server_inflight_bytes_max:
            raise ValueError(
                f"limits.inflight_bytes_max ({self.inflight_bytes_max}) is above "
                f"limits.server_inflight_bytes_max ({self.server_inflight_bytes_max})"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))
