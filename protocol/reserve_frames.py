"""The crowd's frames, decoded and checked in one pass of msgspec's C decoder.

Almost every frame of a flash sale is reserves and nothing else: a batch of reserve maps,
or one. Decoding such a payload with msgpack into dicts and then checking each dict in
Python cost about 1 µs per request, a sixth of the server's CPU per reserve; msgspec
decodes it straight into typed records, checking types, ranges and field names as it
goes, in about a quarter of that.

This is a fast path and nothing more. It accepts exactly the payloads whose every request
`CommandParser` would make a `Reserve` of, and gives up (returns None) on anything else:
another op, a missing or unknown field, a wrong type, a value out of range, a name that
is not ASCII (its limit is in UTF-8 bytes, which msgspec does not count), trailing bytes,
bytes that are not msgpack. The codec then decodes the payload the general way, which
finds the problem and answers it with its usual message. So what a peer sees never
depends on which path decoded its frame.

Pure: no I/O.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

import msgspec

from protocol.limits import ID_MAX, ID_MIN
from protocol.messages import Reserve

# The decoded frame: the requests' ids and their commands, in order; and whether the
# payload was an array (answered with an array) or a single map.
ReserveFrame = tuple[list[int], list[Reserve], bool]


class ReserveFrameDecoder:
    """Decodes payloads that are reserves alone; None for any other payload."""

    def __init__(self, string_bytes_max: int, qty_max: int, batch_requests_max: int) -> None:
        request_type = _reserve_request_type(string_bytes_max, qty_max)
        self._decoder = msgspec.msgpack.Decoder(
            Annotated[list[request_type], msgspec.Meta(min_length=1, max_length=batch_requests_max)]  # type: ignore[valid-type]
            | request_type
        )

    def decode(self, payload: bytes) -> ReserveFrame | None:
        try:
            decoded = self._decoder.decode(payload)
        except msgspec.MsgspecError:
            return None
        if type(decoded) is not list:
            decoded = [decoded]
            batch = False
        else:
            batch = True
        ids: list[int] = []
        commands: list[Reserve] = []
        add_id = ids.append
        add_command = commands.append
        for request in decoded:
            sku = request.sku
            buyer = request.buyer
            key = request.key
            # Within the limit in characters is within it in bytes only for ASCII.
            if not (sku.isascii() and buyer.isascii() and (key is None or key.isascii())):
                return None
            add_id(request.id)
            add_command(Reserve(sku, buyer, request.qty, key))
        return ids, commands, batch


@lru_cache(maxsize=8)
def _reserve_request_type(string_bytes_max: int, qty_max: int) -> Any:
    """The reserve map as msgspec sees it, with the bounds of one set of limits."""
    name = Annotated[str, msgspec.Meta(min_length=1, max_length=string_bytes_max)]
    return msgspec.defstruct(
        "ReserveRequest",
        [
            ("id", Annotated[int, msgspec.Meta(ge=ID_MIN, le=ID_MAX)]),
            ("op", Literal["reserve"]),
            ("sku", name),
            ("buyer", name),
            ("qty", Annotated[int, msgspec.Meta(ge=1, le=qty_max)]),
            ("key", name | None, None),  # type: ignore[operator]
        ],
        forbid_unknown_fields=True,
        # Strings and numbers only, so never part of a cycle: the collector need not track them.
        gc=False,
    )
