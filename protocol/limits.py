"""Every bound soldout enforces, in one place.

The codec, the engine and the gateway all read their caps from a `Limits`; the
`[limits]` table of a server's config file fills one in. Units come last in names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Limits:
    # The wire (protocol/ and the gateway).
    frame_bytes_max: int = 1_048_576
    batch_requests_max: int = 1000
    inflight_requests_max: int = 10_000
    # Payload bytes of the frames in flight on one connection: past it the gateway
    # stops reading that connection until replies go out (a frame may hold 1 request
    # of 1 MiB, so the request count alone does not bound memory).
    inflight_bytes_max: int = 67_108_864
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

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"limits.{field.name} must be a positive integer, got {value!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))
