"""The one door between soldout (trio) and NATS JetStream (nats-py, asyncio).

`open_nats` runs a trio-asyncio loop for its lifetime and connects nats-py inside it;
every call on the `Nats` it yields is a plain trio coroutine that runs the nats-py
coroutine on that loop (`trio_asyncio.aio_as_trio`), so a trio cancel scope cancels it.
What the cluster needs and nothing more: key-value buckets with compare-and-set (leases),
streams appended with an expected last sequence per subject (a shard's journal, fenced
against a stale owner), an object store (snapshots), and request/reply (remote shards).

It owns: every import of nats, asyncio and trio_asyncio in soldout, and the translation
of nats-py's exceptions into this module's, so that callers see `NatsError` and its
subclasses only. It must never: leak an asyncio object or a nats-py type through its
interface, retry a write on its own (a retried append is the caller's decision, made
safe by its message id), or wait without a bound.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import trio
import trio_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ObjectStoreConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue as NatsKeyValue
from nats.js.object_store import ObjectStore

from protocol.limits import CLUSTER_READ_RETRY_SECONDS

logger = logging.getLogger("soldout.cluster.nats")

T = TypeVar("T")

# JetStream's error codes (the `err_code` of an API error), the ones this module tells apart.
STREAM_NAME_IN_USE = 10058  # a stream of that name exists with a different configuration
WRONG_LAST_SEQUENCE = 10071  # an expected (subject) sequence header did not match
# The headers a JetStream publish carries. The per-subject one is what a shard's journal
# needs: several shards may share one stream, each on its own subject.
MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER = "Nats-Expected-Last-Subject-Sequence"


class NatsError(Exception):
    """NATS failed, or answered with an error this module has no better name for."""


class NatsUnavailable(NatsError):
    """No server of the cluster could be reached in the time allowed."""


class KeyExists(NatsError):
    """`KeyValueBucket.create` found the key already there."""


class WrongRevision(NatsError):
    """A compare-and-set on a key found another revision than the one expected."""


class WrongLastSequence(NatsError):
    """An append's expected last subject sequence did not match: another writer got there first."""


class NoResponders(NatsError):
    """Nobody serves the subject of a request."""


class RequestTimeout(NatsError):
    """A request got no reply in its time."""


async def _call(
    loop: trio_asyncio.TrioEventLoop, function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
) -> T:
    """Runs a nats-py coroutine function on `loop` (the one its client was made on, not
    whichever loop the calling task's context names); nats-py's errors become NatsError."""
    try:
        return await trio_asyncio.aio_as_trio(function, loop=loop)(*args, **kwargs)
    except nats.errors.Error as error:
        raise NatsError(_describe(error)) from error
    except (TimeoutError, OSError) as error:
        raise NatsError(_describe(error)) from error


def _describe(error: BaseException) -> str:
    if isinstance(error, nats.js.errors.APIError):
        # nats-py builds some of its own errors (KeyWrongLastSequenceError) without a code.
        return f"JetStream error {getattr(error, 'err_code', None)}: {getattr(error, 'description', None)}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _err_code(error: BaseException) -> int | None:
    cause = error.__cause__
    return getattr(cause, "err_code", None) if isinstance(cause, nats.js.errors.APIError) else None


def _is(error: BaseException, kind: type[BaseException]) -> bool:
    return isinstance(error.__cause__, kind)


@contextlib.asynccontextmanager
async def open_nats(
    urls: Sequence[str],
    *,
    name: str,
    connect_seconds: float,
    operation_seconds: float = 5.0,
    close_seconds: float = 5.0,
) -> AsyncIterator[Nats]:
    """Connected to the cluster at `urls` for the block's lifetime, on a trio-asyncio loop.

    `connect_seconds` bounds the first connection; past it, `NatsUnavailable` names the
    URLs. `operation_seconds` bounds each JetStream call and acknowledgement. Once
    connected, the client reconnects on its own (to any server of the cluster) until the
    block ends; a call made while disconnected fails with `NatsError` within its bound.
    """
    assert urls, "open_nats needs at least one server URL"
    assert connect_seconds > 0
    assert operation_seconds > 0
    assert close_seconds > 0
    # trio-asyncio's loop lives in nurseries of its own, which wrap whatever leaves the
    # block (the body's exception, or NatsUnavailable) in exception groups: one exception
    # alone comes out as itself, as if the nurseries were not there.
    single: BaseException | None = None
    try:
        async with trio_asyncio.open_loop() as loop:
            client = await _connect(loop, list(urls), name, connect_seconds)
            try:
                yield Nats(loop, client, operation_seconds)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(close_seconds), contextlib.suppress(NatsError):
                    await _call(loop, client.close)
    except BaseExceptionGroup as group:
        single = _single_exception(group)
        if single is None:
            raise
    if single is not None:
        raise single  # outside the handler, so that the group does not become its context


def _single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception a group of groups holds, or None when it holds several."""
    exception: BaseException = group
    while isinstance(exception, BaseExceptionGroup):
        if len(exception.exceptions) != 1:
            return None
        exception = exception.exceptions[0]
    return exception


async def _connect(loop: trio_asyncio.TrioEventLoop, urls: list[str], name: str, connect_seconds: float) -> Client:
    last_error: list[str] = []

    async def on_error(error: Exception) -> None:
        # nats-py's default logs a traceback for every failed attempt and reconnect.
        last_error[:] = [_describe(error)]
        logger.info("nats: %s", _describe(error))

    client = Client()
    unavailable = f"NATS unavailable at {', '.join(urls)} after {connect_seconds:g} s"
    with trio.move_on_after(connect_seconds) as waited:
        try:
            await _call(
                loop,
                client.connect,
                servers=urls,
                name=name,
                connect_timeout=connect_seconds,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                error_cb=on_error,
            )
        except NatsError as error:
            await _close_quietly(loop, client)
            detail = last_error[0] if last_error else str(error)
            raise NatsUnavailable(f"{unavailable}: {detail}") from None
    if waited.cancelled_caught:
        await _close_quietly(loop, client)
        raise NatsUnavailable(f"{unavailable}: {last_error[0] if last_error else 'no answer'}")
    return client


async def _close_quietly(loop: trio_asyncio.TrioEventLoop, client: Client) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(NatsError):
        await _call(loop, client.close)


class Nats:
    """A connected client: JetStream key-value, streams, objects, and request/reply, all trio-facing."""

    def __init__(self, loop: trio_asyncio.TrioEventLoop, client: Client, operation_seconds: float) -> None:
        self._loop = loop  # the loop nats-py runs on: every call goes there, whichever task makes it
        self._client = client
        self._operation_seconds = operation_seconds
        self._jetstream: JetStreamContext = client.jetstream(timeout=operation_seconds)
        self._object_stores: dict[str, ObjectStore] = {}

    # -- key-value ---------------------------------------------------------------------

    async def key_value(self, bucket: str, *, replicas: int) -> KeyValueBucket:
        """The bucket, created with `replicas` copies if it does not exist yet.

        Reads go to the stream's leader (no direct get from a replica), so a `get` after
        an `update` sees it: a lease must be read back as it was written.
        """
        assert replicas >= 1
        try:
            bucket_handle = await _call(
                self._loop, self._jetstream.create_key_value, bucket=bucket, replicas=replicas, history=1, direct=False
            )
        except NatsError as error:
            if _err_code(error) != STREAM_NAME_IN_USE:
                raise
            bucket_handle = await _call(self._loop, self._jetstream.key_value, bucket)
        return KeyValueBucket(self._loop, bucket_handle)

    # -- streams -----------------------------------------------------------------------

    async def ensure_stream(
        self, name: str, subjects: Sequence[str], *, replicas: int, duplicate_window_seconds: float = 120.0
    ) -> None:
        """The stream exists with this configuration (created if missing; an error if it differs).

        A publish repeating a message id within `duplicate_window_seconds` is not stored again.
        """
        assert subjects
        assert replicas >= 1
        assert duplicate_window_seconds > 0
        config = StreamConfig(
            name=name,
            subjects=list(subjects),
            num_replicas=replicas,
            storage=StorageType.FILE,
            duplicate_window=duplicate_window_seconds,
            allow_direct=False,
        )
        try:
            await _call(self._loop, self._jetstream.add_stream, config)
        except NatsError as error:
            if _err_code(error) == STREAM_NAME_IN_USE:
                raise NatsError(f"stream {name} exists with a different configuration") from error
            raise

    async def publish(
        self, subject: str, payload: bytes, *, msg_id: str, expected_last_subject_sequence: int | None = None
    ) -> int:
        """Appends and waits for JetStream's acknowledgement; returns the message's stream sequence.

        With `expected_last_subject_sequence` (0: no message on the subject yet) the append
        is refused with `WrongLastSequence` unless the subject's last message has that
        sequence. A repeated `msg_id` within the stream's duplicate window stores nothing
        and returns the first message's sequence.
        """
        assert msg_id
        headers = {MSG_ID_HEADER: msg_id}
        if expected_last_subject_sequence is not None:
            assert expected_last_subject_sequence >= 0
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER] = str(expected_last_subject_sequence)
        try:
            ack = await _call(self._loop, self._jetstream.publish, subject, payload, headers=headers)
        except NatsError as error:
            if _err_code(error) == WRONG_LAST_SEQUENCE:
                raise WrongLastSequence(f"{subject}: {error}") from error.__cause__
            if _is(error, nats.errors.NoRespondersError) or _is(error, nats.js.errors.NoStreamResponseError):
                # Also what a stream answers while it elects a leader: worth a retry.
                raise NatsError(f"no stream answered on {subject}: none takes it, or it has no leader yet") from (
                    error.__cause__
                )
            raise
        return int(ack.seq)

    async def last_sequence(self, stream: str, subject: str) -> int:
        """The stream sequence of the last message on `subject`; 0 when it has none."""
        try:
            message = await _call(self._loop, self._jetstream.get_last_msg, stream, subject)
        except NatsError as error:
            if _is(error, nats.js.errors.NotFoundError):
                return 0
            raise
        return int(message.seq)

    async def read(
        self, stream: str, subject: str, start_sequence: int, *, count_max: int = 1024
    ) -> list[tuple[int, bytes]]:
        """(sequence, payload) of the messages on `subject` from `start_sequence`, in order.

        At most `count_max`, and none past the subject's last message at the time of the
        call: a replay calls again from the last sequence + 1 until the list is empty.
        """
        assert start_sequence >= 1
        assert count_max >= 1
        last = await self.last_sequence(stream, subject)
        if last < start_sequence:
            return []
        # An ephemeral consumer of this subject alone, from the start sequence, that
        # nobody acknowledges; deleted once read (and by the server if this task dies).
        consumer = f"replay-{uuid.uuid4().hex}"
        config = ConsumerConfig(
            name=consumer,
            filter_subject=subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_sequence,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(self._operation_seconds, 5.0),
        )
        await _call(self._loop, self._jetstream.add_consumer, stream, config)
        messages: list[tuple[int, bytes]] = []
        try:
            subscription = await _call(
                self._loop, self._jetstream.pull_subscribe_bind, consumer=consumer, stream=stream
            )
            deadline = trio.current_time() + self._operation_seconds
            try:
                while len(messages) < count_max:
                    try:
                        batch = await _call(
                            self._loop,
                            subscription.fetch,
                            batch=min(count_max - len(messages), 256),
                            timeout=self._operation_seconds,
                        )
                    except NatsError as error:
                        # 503: the consumer just made has no one to serve it yet. A read
                        # may ask again (it changes nothing), within its bound.
                        if not _is(error, nats.js.errors.ServiceUnavailableError) or trio.current_time() >= deadline:
                            raise
                        await trio.sleep(CLUSTER_READ_RETRY_SECONDS)
                        continue
                    for message in batch:
                        sequence = int(message.metadata.sequence.stream)
                        if sequence > last:
                            return messages
                        messages.append((sequence, message.data))
                    if not batch or messages[-1][0] >= last or batch[-1].metadata.num_pending == 0:
                        return messages
                return messages
            finally:
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self._operation_seconds),
                    contextlib.suppress(NatsError),
                ):
                    await _call(self._loop, subscription.unsubscribe)
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._operation_seconds),
                contextlib.suppress(NatsError),
            ):
                await _call(self._loop, self._jetstream.delete_consumer, stream, consumer)

    async def purge(self, stream: str, subject: str, keep_from_sequence: int) -> None:
        """Removes the messages on `subject` with a sequence below `keep_from_sequence`."""
        assert keep_from_sequence >= 1
        await _call(self._loop, self._jetstream.purge_stream, stream, seq=keep_from_sequence, subject=subject)

    # -- objects -----------------------------------------------------------------------

    async def put_object(self, bucket: str, name: str, data: bytes, *, replicas: int) -> None:
        """Stores `data` under `name`, replacing what was there; the bucket is created if missing."""
        store = await self._object_store(bucket, replicas)
        await _call(self._loop, store.put, name, data)

    async def get_object(self, bucket: str, name: str) -> bytes | None:
        """The object's bytes; None when the bucket or the object does not exist."""
        store = self._object_stores.get(bucket)
        if store is None:
            try:
                store = await _call(self._loop, self._jetstream.object_store, bucket)
            except NatsError as error:
                if _is(error, nats.js.errors.NotFoundError):
                    return None
                raise
            self._object_stores[bucket] = store
        try:
            result = await _call(self._loop, store.get, name)
        except NatsError as error:
            if _is(error, nats.js.errors.NotFoundError):
                return None
            raise
        return bytes(result.data or b"")

    async def delete_object(self, bucket: str, name: str, *, replicas: int) -> None:
        """Removes the object; nothing happens when it does not exist."""
        store = await self._object_store(bucket, replicas)
        try:
            await _call(self._loop, store.delete, name)
        except NatsError as error:
            if not _is(error, nats.js.errors.NotFoundError):
                raise

    async def _object_store(self, bucket: str, replicas: int) -> ObjectStore:
        store = self._object_stores.get(bucket)
        if store is None:
            assert replicas >= 1
            try:
                store = await _call(
                    self._loop, self._jetstream.create_object_store, bucket, config=ObjectStoreConfig(replicas=replicas)
                )
            except NatsError as error:
                if _err_code(error) != STREAM_NAME_IN_USE:
                    raise
                store = await _call(self._loop, self._jetstream.object_store, bucket)
            self._object_stores[bucket] = store
        return store

    # -- request / reply ---------------------------------------------------------------

    async def serve(
        self,
        subject: str,
        handler: Callable[[bytes], Awaitable[bytes]],
        *,
        queue: str = "",
        handlers_max: int = 64,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answers requests on `subject` with `handler` (a trio function), until cancelled.

        Start it with `await nursery.start(nats.serve, subject, handler)`: it reports
        started once subscribed, and serving stops when its cancel scope is cancelled.
        Servers in one `queue` group share the requests. At most `handlers_max` handlers
        run at once; past that, requests wait in the subscription. A handler's exception
        propagates (its request gets no reply, and the caller's request times out).
        """
        assert handlers_max >= 1
        subscription = await _call(self._loop, self._client.subscribe, subject, queue=queue)
        try:
            async with trio.open_nursery() as nursery:
                slots = trio.Semaphore(handlers_max)
                task_status.started()
                while True:
                    await slots.acquire()
                    message = await _call(self._loop, subscription.next_msg, timeout=None)
                    nursery.start_soon(self._answer, message, handler, slots)
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._operation_seconds),
                contextlib.suppress(NatsError),
            ):
                await _call(self._loop, subscription.unsubscribe)

    async def _answer(self, message: Msg, handler: Callable[[bytes], Awaitable[bytes]], slots: trio.Semaphore) -> None:
        try:
            reply = await handler(message.data)
            if message.reply:
                await _call(self._loop, message.respond, reply)
        finally:
            slots.release()

    async def request(self, subject: str, payload: bytes, *, timeout_seconds: float) -> bytes:
        """The reply of whoever serves `subject`; `NoResponders` or `RequestTimeout` otherwise."""
        assert timeout_seconds > 0
        try:
            reply = await _call(self._loop, self._client.request, subject, payload, timeout=timeout_seconds)
        except NatsError as error:
            if _is(error, nats.errors.NoRespondersError):
                raise NoResponders(f"nobody serves {subject}") from error.__cause__
            if _is(error, nats.errors.TimeoutError):
                raise RequestTimeout(f"no reply on {subject} in {timeout_seconds:g} s") from error.__cause__
            raise
        return bytes(reply.data)

    # -- the cluster -------------------------------------------------------------------

    async def jetstream_servers(self) -> int:
        """How many servers the cluster has, as the connected server advertises them to clients.

        A soldout cluster runs JetStream on every server, so this is the most replicas a
        stream, bucket or object store can have.
        """
        await _call(self._loop, self._client.flush, timeout=self._operation_seconds)
        info: dict[str, Any] = self._client._server_info
        if not info.get("jetstream"):
            return 0
        advertised = set(info.get("connect_urls") or [])
        return max(1, len(advertised))


class KeyValueBucket:
    """One JetStream key-value bucket: values are bytes, every write returns its revision."""

    def __init__(self, loop: trio_asyncio.TrioEventLoop, bucket: NatsKeyValue) -> None:
        self._loop = loop
        self._bucket = bucket

    async def create(self, key: str, value: bytes) -> int:
        """Writes `key` only if it has no value (never written, or deleted); `KeyExists` otherwise."""
        try:
            return int(await _call(self._loop, self._bucket.create, key, value))
        except NatsError as error:
            if _is(error, nats.js.errors.KeyWrongLastSequenceError) or _err_code(error) == WRONG_LAST_SEQUENCE:
                raise KeyExists(key) from error.__cause__
            raise

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        """Writes `key` only if its revision is still `last_revision`; `WrongRevision` otherwise."""
        assert last_revision >= 1
        try:
            return int(await _call(self._loop, self._bucket.update, key, value, last=last_revision))
        except NatsError as error:
            if _is(error, nats.js.errors.KeyWrongLastSequenceError) or _err_code(error) == WRONG_LAST_SEQUENCE:
                raise WrongRevision(f"{key}: not at revision {last_revision}") from error.__cause__
            raise

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """(value, revision) of `key`; None when it was never written or was deleted."""
        try:
            entry = await _call(self._loop, self._bucket.get, key)
        except NatsError as error:
            if _is(error, nats.js.errors.NotFoundError):
                return None
            raise
        return bytes(entry.value or b""), int(entry.revision or 0)

    async def delete(self, key: str, last_revision: int | None = None) -> None:
        """Deletes `key`; with `last_revision`, only if it is still at that revision (`WrongRevision`)."""
        assert last_revision is None or last_revision >= 1
        try:
            await _call(self._loop, self._bucket.delete, key, last=last_revision)
        except NatsError as error:
            if _err_code(error) == WRONG_LAST_SEQUENCE:
                raise WrongRevision(f"{key}: not at revision {last_revision}") from error.__cause__
            raise

    async def keys(self) -> list[str]:
        """The keys that have a value now, sorted."""
        try:
            return sorted(await _call(self._loop, self._bucket.keys))
        except NatsError as error:
            if _is(error, nats.js.errors.NoKeysError):
                return []
            raise
