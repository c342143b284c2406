"""The cluster's NATS adapter against a real three-server JetStream cluster, replicas=3.

Every name a test creates (bucket, stream, subject) is its own, so the tests share one
cluster (started once per session by `tests/nats_cluster.py`) without seeing each other.
"""

from __future__ import annotations

import ast
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats.js.client as nats_client
import nats.js.errors as nats_errors
import pytest
import trio
from nats_cluster import NatsCluster

from engine.cluster.nats import (
    KeyExists,
    Nats,
    NatsError,
    NatsUnavailable,
    NoResponders,
    RequestTimeout,
    WrongLastSequence,
    WrongRevision,
    open_nats,
)

REPLICAS = 3
T = TypeVar("T")
_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


@pytest.fixture
async def nats(nats_cluster: NatsCluster) -> AsyncIterator[Nats]:
    async with open_nats(nats_cluster.urls, name="soldout-test", connect_seconds=10.0) as client:
        yield client


async def test_jetstream_has_three_servers(nats: Nats) -> None:
    assert await nats.jetstream_servers() == 3


def test_every_server_fsyncs_each_write_before_acknowledging_it(nats_cluster: NatsCluster) -> None:
    """What the tests, the bench and the demo measure is a commit on disk at a quorum."""
    for server in nats_cluster.servers:
        config = server.monitor("/varz")["jetstream"]["config"]
        assert config["sync_always"] is True, server.name


# -- key-value ---------------------------------------------------------------------------


async def test_create_writes_a_new_key_once(nats: Nats) -> None:
    bucket = await nats.key_value(unique("kv"), replicas=REPLICAS)
    revision = await bucket.create("shard-0", b"node-a")
    assert revision >= 1
    assert await bucket.get("shard-0") == (b"node-a", revision)
    with pytest.raises(KeyExists):
        await bucket.create("shard-0", b"node-b")
    assert await bucket.get("shard-0") == (b"node-a", revision)


async def test_update_is_a_compare_and_set_on_the_revision(nats: Nats) -> None:
    bucket = await nats.key_value(unique("kv"), replicas=REPLICAS)
    first = await bucket.create("lease", b"a:1")
    second = await bucket.update("lease", b"a:2", last_revision=first)
    assert second > first
    assert await bucket.get("lease") == (b"a:2", second)
    with pytest.raises(WrongRevision):
        await bucket.update("lease", b"b:1", last_revision=first)
    assert await bucket.get("lease") == (b"a:2", second)


async def test_get_of_a_missing_key_is_none(nats: Nats) -> None:
    bucket = await nats.key_value(unique("kv"), replicas=REPLICAS)
    assert await bucket.get("nobody") is None
    assert await bucket.keys() == []


async def test_delete_removes_the_key_and_create_works_again(nats: Nats) -> None:
    bucket = await nats.key_value(unique("kv"), replicas=REPLICAS)
    revision = await bucket.create("lease", b"a")
    await bucket.create("other", b"b")
    assert await bucket.keys() == ["lease", "other"]
    with pytest.raises(WrongRevision):
        await bucket.delete("lease", last_revision=revision + 100)
    assert await bucket.get("lease") == (b"a", revision)
    await bucket.delete("lease", last_revision=revision)
    assert await bucket.get("lease") is None
    assert await bucket.keys() == ["other"]
    assert await bucket.create("lease", b"c") > revision
    await bucket.delete("other")
    assert await bucket.keys() == ["lease"]


async def test_a_bucket_opened_twice_is_the_same_bucket(nats: Nats) -> None:
    name = unique("kv")
    first = await nats.key_value(name, replicas=REPLICAS)
    revision = await first.create("k", b"v")
    second = await nats.key_value(name, replicas=REPLICAS)
    assert await second.get("k") == (b"v", revision)


# -- streams -----------------------------------------------------------------------------


async def new_stream(nats: Nats) -> tuple[str, str]:
    """A fresh stream on `<name>.>`; returns (stream, its prefix for subjects)."""
    name = unique("JOURNAL")
    await nats.ensure_stream(name, [f"{name}.>"], replicas=REPLICAS)
    return name, name


async def test_publish_is_acknowledged_with_increasing_sequences(nats: Nats) -> None:
    stream, prefix = await new_stream(nats)
    first = await nats.publish(f"{prefix}.shard-0", b"r1", msg_id="m1")
    second = await nats.publish(f"{prefix}.shard-1", b"r2", msg_id="m2")
    assert 1 <= first < second
    assert await nats.last_sequence(stream, f"{prefix}.shard-0") == first
    assert await nats.last_sequence(stream, f"{prefix}.shard-1") == second
    assert await nats.last_sequence(stream, f"{prefix}.shard-2") == 0


async def test_ensure_stream_is_idempotent_and_refuses_another_configuration(nats: Nats) -> None:
    stream, prefix = await new_stream(nats)
    await nats.ensure_stream(stream, [f"{prefix}.>"], replicas=REPLICAS)
    with pytest.raises(NatsError, match="different configuration"):
        await nats.ensure_stream(stream, [f"{prefix}.>"], replicas=1)


async def test_a_repeated_msg_id_is_stored_once_and_returns_the_first_sequence(nats: Nats) -> None:
    stream, prefix = await new_stream(nats)
    subject = f"{prefix}.shard-0"
    first = await nats.publish(subject, b"record", msg_id="shard-0:1")
    again = await nats.publish(subject, b"record", msg_id="shard-0:1")
    assert again == first
    assert await nats.read(stream, subject, 1) == [(first, b"record")]


async def test_a_stale_expected_sequence_is_refused(nats: Nats) -> None:
    """The fencing a stale shard owner meets: it appends after the sequence it last saw."""
    stream, prefix = await new_stream(nats)
    subject = f"{prefix}.shard-0"
    other = f"{prefix}.shard-1"
    first = await nats.publish(subject, b"owner-a:1", msg_id="a1", expected_last_subject_sequence=0)
    # Another subject's messages do not move this subject's expected sequence.
    await nats.publish(other, b"x", msg_id="x1")
    second = await nats.publish(subject, b"owner-b:takeover", msg_id="b1", expected_last_subject_sequence=first)
    with pytest.raises(WrongLastSequence):
        await nats.publish(subject, b"owner-a:2", msg_id="a2", expected_last_subject_sequence=first)
    with pytest.raises(WrongLastSequence):
        await nats.publish(subject, b"owner-c:fresh", msg_id="c1", expected_last_subject_sequence=0)
    with pytest.raises(WrongLastSequence):
        await nats.publish(f"{prefix}.shard-2", b"late", msg_id="d1", expected_last_subject_sequence=1)
    assert await nats.read(stream, subject, 1) == [(first, b"owner-a:1"), (second, b"owner-b:takeover")]


async def test_a_retried_append_is_a_duplicate_not_a_wrong_sequence(nats: Nats) -> None:
    """An owner that lost the ack retries with the same id and expected sequence: same answer."""
    stream, prefix = await new_stream(nats)
    subject = f"{prefix}.shard-0"
    first = await nats.publish(subject, b"r1", msg_id="r1", expected_last_subject_sequence=0)
    assert await nats.publish(subject, b"r1", msg_id="r1", expected_last_subject_sequence=0) == first
    assert await nats.last_sequence(stream, subject) == first


async def test_read_returns_one_subject_from_a_sequence_in_batches(nats: Nats) -> None:
    stream, prefix = await new_stream(nats)
    subject = f"{prefix}.shard-0"
    sequences = []
    for index in range(10):
        sequences.append(await nats.publish(subject, b"r%d" % index, msg_id=f"r{index}"))
        await nats.publish(f"{prefix}.shard-1", b"noise", msg_id=f"n{index}")
    everything = await nats.read(stream, subject, 1)
    assert everything == [(sequence, b"r%d" % index) for index, sequence in enumerate(sequences)]
    assert await nats.read(stream, subject, sequences[4]) == everything[4:]
    assert await nats.read(stream, subject, sequences[4] + 1) == everything[5:]
    batches = []
    start = 1
    while batch := await nats.read(stream, subject, start, count_max=3):
        assert len(batch) <= 3
        batches.append(batch)
        start = batch[-1][0] + 1
    assert [len(batch) for batch in batches] == [3, 3, 3, 1]
    assert [message for batch in batches for message in batch] == everything
    assert await nats.read(stream, subject, sequences[-1] + 1) == []
    assert await nats.read(stream, f"{prefix}.shard-9", 1) == []


async def test_a_read_asks_again_when_its_new_consumer_is_not_ready_yet(
    nats: Nats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetStream answers a fetch 503 while the consumer just made has no one to serve it:
    the read asks again within its bound instead of failing a takeover's replay."""
    stream, prefix = await new_stream(nats)
    subject = f"{prefix}.shard-0"
    sequence = await nats.publish(subject, b"only", msg_id="only")
    fetch = nats_client.JetStreamContext.PullSubscription.fetch
    refusals = [2]

    async def not_ready_at_first(self: Any, *args: Any, **kwargs: Any) -> Any:
        if refusals[0]:
            refusals[0] -= 1
            raise nats_errors.ServiceUnavailableError
        return await fetch(self, *args, **kwargs)

    monkeypatch.setattr(nats_client.JetStreamContext.PullSubscription, "fetch", not_ready_at_first)
    assert await nats.read(stream, subject, 1) == [(sequence, b"only")]
    assert refusals == [0]


async def test_purge_keeps_the_subject_from_a_sequence(nats: Nats) -> None:
    stream, prefix = await new_stream(nats)
    subject = f"{prefix}.shard-0"
    other = f"{prefix}.shard-1"
    sequences = [await nats.publish(subject, b"r%d" % index, msg_id=f"r{index}") for index in range(5)]
    kept_other = await nats.publish(other, b"other", msg_id="o")
    await nats.purge(stream, subject, keep_from_sequence=sequences[3])
    assert await nats.read(stream, subject, 1) == [(sequences[3], b"r3"), (sequences[4], b"r4")]
    assert await nats.read(stream, other, 1) == [(kept_other, b"other")]
    assert await nats.last_sequence(stream, subject) == sequences[4]


async def test_publish_to_a_subject_no_stream_takes_fails(nats: Nats) -> None:
    with pytest.raises(NatsError, match="no stream answered"):
        await nats.publish(unique("nowhere."), b"x", msg_id="x")


# -- objects -----------------------------------------------------------------------------


async def test_objects_are_put_replaced_and_got(nats: Nats) -> None:
    bucket = unique("snapshots")
    assert await nats.get_object(bucket, "shard-0") is None
    snapshot = bytes(range(256)) * 2000  # several chunks
    await nats.put_object(bucket, "shard-0", snapshot, replicas=REPLICAS)
    assert await nats.get_object(bucket, "shard-0") == snapshot
    await nats.put_object(bucket, "shard-0", b"newer", replicas=REPLICAS)
    assert await nats.get_object(bucket, "shard-0") == b"newer"
    assert await nats.get_object(bucket, "shard-1") is None
    await nats.put_object(bucket, "empty", b"", replicas=REPLICAS)
    assert await nats.get_object(bucket, "empty") == b""


# -- request / reply ---------------------------------------------------------------------


async def test_a_request_is_answered_by_the_trio_handler(nats: Nats) -> None:
    subject = unique("shard.requests.")
    seen = []

    async def handler(payload: bytes) -> bytes:
        await trio.lowlevel.checkpoint()  # a trio checkpoint: the handler runs on trio's side
        seen.append(payload)
        return payload.upper()

    async with trio.open_nursery() as nursery:
        await nursery.start(nats.serve, subject, handler)
        replies = [await nats.request(subject, b"reserve-%d" % index, timeout_seconds=5.0) for index in range(3)]
        nursery.cancel_scope.cancel()
    assert replies == [b"RESERVE-0", b"RESERVE-1", b"RESERVE-2"]
    assert seen == [b"reserve-0", b"reserve-1", b"reserve-2"]
    with pytest.raises(NoResponders):
        await nats.request(subject, b"after", timeout_seconds=5.0)


async def test_concurrent_requests_are_handled_concurrently(nats: Nats) -> None:
    subject = unique("shard.requests.")
    arrived = trio.Event()
    waiting = 0

    async def handler(payload: bytes) -> bytes:
        nonlocal waiting
        waiting += 1
        if waiting == 2:
            arrived.set()
        await arrived.wait()  # neither answers until both are being handled
        return payload

    replies: dict[bytes, bytes] = {}

    async def ask(payload: bytes) -> None:
        replies[payload] = await nats.request(subject, payload, timeout_seconds=10.0)

    async with trio.open_nursery() as nursery:
        await nursery.start(nats.serve, subject, handler)
        async with trio.open_nursery() as askers:
            askers.start_soon(ask, b"a")
            askers.start_soon(ask, b"b")
        nursery.cancel_scope.cancel()
    assert replies == {b"a": b"a", b"b": b"b"}


async def test_a_request_nobody_serves_raises_no_responders(nats: Nats) -> None:
    with pytest.raises(NoResponders):
        await nats.request(unique("nobody.home."), b"x", timeout_seconds=5.0)


async def test_a_slow_handler_makes_the_request_time_out(nats: Nats) -> None:
    subject = unique("shard.slow.")
    release = trio.Event()

    async def handler(payload: bytes) -> bytes:
        await release.wait()
        return payload

    async with trio.open_nursery() as nursery:
        await nursery.start(nats.serve, subject, handler)
        with pytest.raises(RequestTimeout):
            await nats.request(subject, b"x", timeout_seconds=0.2)
        release.set()
        nursery.cancel_scope.cancel()


# -- connecting --------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_unreachable_cluster_raises_nats_unavailable_in_one_line() -> None:
    urls = [f"nats://127.0.0.1:{closed_port()}", f"nats://127.0.0.1:{closed_port()}"]
    with trio.fail_after(10.0):  # the bound is the adapter's; this only keeps a bug from hanging the suite
        with pytest.raises(NatsUnavailable) as raised:
            async with open_nats(urls, name="soldout-test", connect_seconds=1.0):
                pytest.fail("connected to nothing")
    message = str(raised.value)
    assert "\n" not in message
    assert all(url in message for url in urls)


async def test_an_error_in_the_block_comes_out_as_itself(nats_cluster: NatsCluster) -> None:
    """trio-asyncio's own nurseries do not wrap the caller's exception in a group."""

    async def create_twice() -> None:
        async with open_nats(nats_cluster.urls, name="soldout-test", connect_seconds=10.0) as nats:
            bucket = await nats.key_value(unique("kv"), replicas=REPLICAS)
            await bucket.create("k", b"v")
            await bucket.create("k", b"v")

    with pytest.raises(KeyExists):
        await create_twice()


# -- a server dies -----------------------------------------------------------------------


async def test_publish_is_acknowledged_with_one_of_three_servers_killed(nats_cluster: NatsCluster) -> None:
    # Short operations, so that an append the dead leader swallowed is retried soon.
    async with open_nats(nats_cluster.urls, name="soldout-test", connect_seconds=10.0, operation_seconds=1.0) as nats:
        await appends_survive_the_stream_leader_killed(nats_cluster, nats)


async def appends_survive_the_stream_leader_killed(nats_cluster: NatsCluster, nats: Nats) -> None:
    stream, prefix = await new_stream(nats)
    subject = f"{prefix}.shard-0"
    before = await nats.publish(subject, b"before", msg_id="before")
    leader = await trio.to_thread.run_sync(nats_cluster.wait_stream_leader, stream)
    victim = nats_cluster.index_of(leader)
    nats_cluster.kill_server(victim)
    try:
        after = await once_answered(
            lambda: nats.publish(subject, b"after", msg_id="after", expected_last_subject_sequence=before)
        )
        assert after > before
        # Two of three servers hold the stream: its new leader has both appends.
        assert await trio.to_thread.run_sync(nats_cluster.wait_stream_leader, stream, leader) != leader
        assert await once_answered(lambda: nats.read(stream, subject, 1)) == [(before, b"before"), (after, b"after")]
    finally:
        await trio.to_thread.run_sync(nats_cluster.restart_server, victim)


async def once_answered(call: Callable[[], Awaitable[T]], seconds: float = 30.0) -> T:
    """The result of `call`, retried while the cluster fails it (a new leader is being elected).

    The stream and the JetStream meta group each elect a new leader after a server dies,
    in a few seconds; a retried append is safe because it repeats its message id.
    """
    with trio.fail_after(seconds):
        while True:
            try:
                return await call()
            except NatsError:
                await trio.sleep(0.1)


# -- the layout --------------------------------------------------------------------------

REPOSITORY = Path(__file__).resolve().parent.parent
ADAPTER = "engine/cluster/nats.py"
# Where asyncio was already at home before the cluster: the asyncio client for frontends,
# and the bench's runs of that client and of the Redis peer (redis-py's asyncio connection).
ASYNCIO_ELSEWHERE = {"protocol/aio.py", "bench/clients.py", "bench/driver.py"}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_adapter_imports_nats_asyncio_or_trio_asyncio() -> None:
    packages = ("engine", "protocol", "bench")
    imports = {
        str(path.relative_to(REPOSITORY)): imported_packages(path)
        for package in packages
        for path in (REPOSITORY / package).rglob("*.py")
    }
    assert imports[ADAPTER] >= {"nats", "trio_asyncio"}
    allowed = {ADAPTER: {"nats", "asyncio", "trio_asyncio"}} | {path: {"asyncio"} for path in ASYNCIO_ELSEWHERE}
    offenders = {
        path: sorted(found & {"nats", "asyncio", "trio_asyncio"} - allowed.get(path, set()))
        for path, found in imports.items()
        if found & {"nats", "asyncio", "trio_asyncio"} - allowed.get(path, set())
    }
    assert offenders == {}


async def test_a_call_runs_on_its_clients_loop_from_any_task(nats_cluster: NatsCluster) -> None:
    """A task whose context names another client's loop, or none (it was started before
    the client's block), still reaches NATS through that client's own loop."""
    jobs_in, jobs_out = trio.open_memory_channel[Callable[[], Awaitable[None]]](0)
    answers: list[int] = []

    async def outsider() -> None:  # started before any open_nats: no trio-asyncio loop in its context
        async for job in jobs_out:
            await job()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outsider)
        async with (
            open_nats(nats_cluster.urls, name="soldout-test-a", connect_seconds=10.0) as first,
            open_nats(nats_cluster.urls, name="soldout-test-b", connect_seconds=10.0) as second,
        ):
            answers.append(await first.jetstream_servers())  # here the context names `second`'s loop

            async def job() -> None:
                answers.append(await first.jetstream_servers())
                answers.append(await second.jetstream_servers())

            await jobs_in.send(job)
            await jobs_in.send(trio.lowlevel.checkpoint)  # taken only once the first job is done
        await jobs_in.aclose()
    assert answers == [3, 3, 3]
