"""In-process cluster nodes on a trio loop of their own thread, driven from plain test code.

`ClusterLoop` runs a real-clock trio loop (NATS needs real I/O) on a thread; nodes join
and leave it by name, each with its own NATS connection, all sharing one
`SettableWallClock` (wire_helpers): the engines' epoch seconds stand still until the test moves them,
so hold expiry and sale windows follow the test, not the machine's speed.

The session's journal stream and owner bucket are shared by every cluster test, so the
books the nodes recover hold other tests' SKUs: callers use SKU names of their own, and
unique node names (`unique_name`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio
from model import View, observe_engine

from engine.api import Engine
from engine.cluster.leases import fair_shares
from engine.cluster.nats import open_nats
from engine.cluster.node import ClusterNode, open_cluster_engine
from engine.config import EngineConfig

T = TypeVar("T")

REPLICAS = 3
# Longer than the other in-process tests' lease: a test thread busy with hypothesis and
# a loaded machine must never delay a renewal past two thirds of it.
LEASE_SECONDS = 2.0
SETTLE_SECONDS = 60.0
ANSWER_SECONDS_MAX = 60.0  # no call needs a fraction of this: reaching it means a hang
_names = itertools.count()


def unique_name(prefix: str) -> str:
    """A name no other cluster test of the session uses."""
    return f"{prefix}{next(_names)}"


class Hangs(AssertionError):
    """The loop stopped answering."""


class ClusterLoop:
    """A trio loop on its own thread hosting cluster nodes; `run` awaits a call in it."""

    def __init__(self, urls: Sequence[str], config: EngineConfig) -> None:
        self.urls = list(urls)
        self.config = config
        self.nodes: dict[str, tuple[Engine, ClusterNode]] = {}
        # Each node's task context: its NATS connection's asyncio loop is found there, and
        # a task started for a node's engine (a batch forwarded to a shard's owner) needs it.
        self._contexts: dict[str, contextvars.Context] = {}
        self._leaving: dict[str, tuple[trio.Event, trio.Event]] = {}
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(ANSWER_SECONDS_MAX):
            raise Hangs("the cluster loop did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as error:  # handed to the test's thread, never lost
            self._error = error
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            # Nodes leave cleanly (handing their shards off) before the loop ends.
            for name in list(self.nodes):
                await self._leave(name)
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ calling in

    def run(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await `function(*args)` in the loop and return its result (or raise its error)."""
        answered = threading.Event()
        outcome: list[tuple[bool, Any]] = []

        async def call() -> None:
            try:
                outcome.append((True, await function(*args)))
            except BaseException as error:  # the caller's to see; the loop goes on
                outcome.append((False, error))
            finally:
                answered.set()

        assert self._token is not None
        assert self._nursery is not None
        self._token.run_sync_soon(functools.partial(self._nursery.start_soon, call))
        if not answered.wait(ANSWER_SECONDS_MAX * 2):
            raise Hangs(f"no answer from {getattr(function, '__name__', function)} in {ANSWER_SECONDS_MAX * 2} s")
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return value  # type: ignore[no-any-return]

    def run_sync(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the loop, between its tasks' steps (to read the books)."""

        async def call() -> T:
            return function(*args)

        return self.run(call)

    def close(self) -> None:
        if self._thread.is_alive() and self._stop is not None and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._stop.set)
        self._thread.join(ANSWER_SECONDS_MAX * 2)
        if self._thread.is_alive():
            raise Hangs("the cluster loop did not close")
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------ nodes (call these through `run`)

    async def join(self, name: str) -> None:
        """Start node `name`; it takes shards as the lease plan says (see `settle`)."""
        assert self._nursery is not None
        await self._nursery.start(self._host, name)

    async def leave(self, name: str) -> None:
        await self._leave(name)

    async def _leave(self, name: str) -> None:
        stop, left = self._leaving[name]
        stop.set()
        await left.wait()

    async def _host(self, name: str, *, task_status: trio.TaskStatus[None]) -> None:
        stop, left = trio.Event(), trio.Event()
        self._leaving[name] = (stop, left)
        try:
            async with (
                open_nats(self.urls, name=name, connect_seconds=10.0) as nats,
                open_cluster_engine(nats, self.config, name, replicas=REPLICAS, lease_seconds=LEASE_SECONDS) as (
                    engine,
                    node,
                ),
            ):
                self.nodes[name] = (engine, node)
                self._contexts[name] = contextvars.copy_context()
                task_status.started()
                await stop.wait()
                del self.nodes[name]  # before it hands off: no one sends it more work
        finally:
            self.nodes.pop(name, None)
            self._contexts.pop(name, None)
            left.set()

    async def on(self, name: str, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await `function(*args)` in a task of node `name`'s context (to call its engine)."""
        assert self._nursery is not None
        done = trio.Event()
        outcome: list[tuple[bool, Any]] = []

        async def call() -> None:
            try:
                outcome.append((True, await function(*args)))
            except Exception as error:  # the caller's to see
                outcome.append((False, error))
            finally:
                done.set()

        self._contexts[name].run(self._nursery.start_soon, call)
        await done.wait()
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return value  # type: ignore[no-any-return]

    async def settle(self) -> None:
        """Until the live nodes serve every shard between them, each exactly its fair share,
        and each sees exactly these nodes live (a newcomer counts a departed node's stale
        heartbeat as live for a lease, and would move shards again once it stops)."""
        shards = self.config.shards
        with trio.fail_after(SETTLE_SECONDS):
            while not self._settled(shards):  # noqa: ASYNC110 (the lease keepers move it, no event)
                await trio.sleep(0.05)

    def _settled(self, shards: int) -> bool:
        names = sorted(self.nodes)
        shares = fair_shares(shards, names)
        served: list[int] = []
        for name, (engine, node) in self.nodes.items():
            assert node.keeper is not None
            local = [shard for shard in range(shards) if engine.is_local(shard)]
            if sorted(node.keeper.live_nodes) != names or len(local) != shares[name]:
                return False
            if sorted(node.keeper.held) != local:
                return False
            served.extend(local)
        return sorted(served) == list(range(shards))

    def observe(self, skus: Callable[[str], bool]) -> View:
        """Every SKU for which `skus(name)` holds, and their holds, from every node's books
        (call through `run_sync`)."""
        whole = View()
        for engine, _ in self.nodes.values():
            whole.update(observe_engine(engine))
        return View(
            skus={sku: state for sku, state in whole.skus.items() if skus(sku)},
            holds={number: hold for number, hold in whole.holds.items() if skus(hold[0])},
        )
