"""A shard another process owns: the second kind of shard the engine routes to.

The engine hands a `RemoteShard` a batch exactly as it hands one to a local `Shard`; the
remote shard sends it to the owner as one protocol v1 batch frame (the commands as
request maps, ids their positions) over a `ShardTransport`, and resolves the batch with
the replies that come back. The owner answers through `Engine.answer_remote`, the same
batch entry point the gateway uses. A batch the owner cannot be reached for (no owner
during a hand-over, no answer in time) is answered `unavailable`: it may or may not have
been decided, and a retry with the same idempotency key returns the first answer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import trio

from engine.shard import Batch
from protocol.codec import ClientCodec, LocalProtocolError, RemoteProtocolError, reply_from_map, request_map
from protocol.limits import CLUSTER_FORWARDS_IN_FLIGHT_MAX, Limits
from protocol.messages import UNAVAILABLE, AnyReply, Command, status_reply
from protocol.parser import OPS

log = logging.getLogger("soldout.remote")

UNREACHABLE_ERROR = "the shard's owner did not answer; the outcome is unknown: retry with the same key"


class ShardUnreachable(Exception):
    """No owner answered for the shard (none owns it now, or it did not answer in time)."""


class ShardTransport(Protocol):
    async def request(self, shard: int, payload: bytes) -> bytes:
        """Send `payload` to `shard`'s owner and return its answer; raises ShardUnreachable."""
        ...


class RemoteShard:
    """`hand_over` forwards a batch to the shard's owner; the batch is resolved when it answers.

    At most `CLUSTER_FORWARDS_IN_FLIGHT_MAX` requests are in flight to the owner; batches
    handed over meanwhile wait, and each request takes every whole batch waiting, up to
    `batch_requests_max` commands (a batch larger than that goes alone, in parts). Under
    load a request carries many callers' batches, and its fixed cost is shared by them.
    """

    def __init__(self, index: int, transport: ShardTransport, nursery: trio.Nursery, limits: Limits) -> None:
        self.index = index
        self._transport = transport
        self._nursery = nursery
        self._codec = ClientCodec(limits)
        self._part_requests_max = limits.batch_requests_max
        self._waiting: deque[Batch] = deque()
        self._forwarders = 0

    async def hand_over(self, batch: Batch) -> None:
        # As for a local shard: a caller already cancelled hands nothing over.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._waiting.append(batch)
        if self._forwarders < CLUSTER_FORWARDS_IN_FLIGHT_MAX:
            self._forwarders += 1
            self._nursery.start_soon(self._forward_waiting)

    async def _forward_waiting(self) -> None:
        try:
            while self._waiting:
                await self._forward(self._take_waiting())
        finally:
            self._forwarders -= 1

    def _take_waiting(self) -> list[Batch]:
        """The next request's batches: the first waiting, and those after it that fit."""
        waiting = self._waiting
        batches = [waiting.popleft()]
        commands = len(batches[0].commands)
        while waiting and commands + len(waiting[0].commands) <= self._part_requests_max:
            commands += len(waiting[0].commands)
            batches.append(waiting.popleft())
        return batches

    async def _forward(self, batches: list[Batch]) -> None:
        commands = [command for batch in batches for command in batch.commands]
        replies: list[AnyReply] = []
        step = self._part_requests_max
        try:
            for start in range(0, len(commands), step):
                replies.extend(await self._forward_part(commands[start : start + step]))
        except Exception:
            # A fault in forwarding is these batches', not the engine's: their callers hear
            # `unavailable` (the outcome is unknown) and every other batch goes on.
            log.exception("shard %d: forwarding a batch to its owner failed", self.index)
            replies = [status_reply(command, UNAVAILABLE, UNREACHABLE_ERROR) for command in commands]
        start = 0
        for batch in batches:
            end = start + len(batch.commands)
            batch.resolve(replies[start:end])
            start = end

    async def _forward_part(self, commands: Sequence[Command]) -> list[AnyReply]:
        maps = [request_map(position, command) for position, command in enumerate(commands)]
        try:
            answer = await self._transport.request(self.index, self._codec.encode_batch(maps))
            received = self._codec.decode_replies(answer)
        except (ShardUnreachable, RemoteProtocolError, LocalProtocolError):
            return [status_reply(command, UNAVAILABLE, UNREACHABLE_ERROR) for command in commands]
        by_position = {reply.get("id"): reply for reply in received}
        replies = []
        for position, (command, fields) in enumerate(zip(commands, maps, strict=True)):
            reply = by_position.get(position)
            if reply is None or fields["op"] not in OPS:
                # An owner that lost a reply broke the protocol: nothing of it is known.
                replies.append(status_reply(command, UNAVAILABLE, UNREACHABLE_ERROR))
            else:
                replies.append(reply_from_map(fields["op"], reply))
        return replies
