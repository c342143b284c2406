"""The engine against the plain model, step by step, with hypothesis choosing the steps.

A real engine (several shards, a data directory, journals and frequent snapshots)
runs in a trio loop on its own thread; each rule hands its call to that loop, waits
for the answer, applies the same operation to the model, and the two replies must be
equal. Time is a MockClock shared by every engine the machine opens: the wall clock
is a fixed epoch plus the clock's time, and a rule jumps it, so holds expire and sale
windows open and close without sleeping. Reopening the data directory is a rule too:
the engine that comes back must answer exactly as the model still does.

After every step the whole state is compared: every SKU's counts through `stock`,
and, read from the shards, every SKU's settings, registered buyers and idempotency
keys, and every hold (its SKU, buyer, qty, expiry, key and state).

A failure prints the shrunk steps and a `@reproduce_failure` line that replays it;
`pytest --hypothesis-seed=<n>` pins the search."""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from model import Model, assert_same_reply, observe_engine

from engine import Engine, EngineConfig, open_engine
from protocol.messages import UNCHANGED, Cancel, Command, Confirm, Reserve, Stock

EPOCH = 1_700_000_000.0
SHARDS = 3
SKUS = ("mi-band", "mi-phone", "mi-tv", "mi-pad")
BUYERS = ("ann", "bob", "cy")
# The last key is 256 UTF-8 bytes: as long as a key may be.
KEYS = ("k1", "k2", "k3", "é" * 128)
# Ids that cannot name a hold here: a shard there is not, a number never handed out, and
# two that are not ids at all.
FOREIGN_RESERVATIONS = ("9-1", "0-999999", "nonsense", "1-")

T = TypeVar("T")


# How long a call waits for the engine before the test fails: no engine call needs a
# fraction of this, so reaching it means the engine hangs, and the test must say so
# rather than hang with it.
ANSWER_SECONDS_MAX = 60.0


class EngineHangs(AssertionError):
    """The engine stopped answering."""


class EngineThread:
    """An engine opened inside `trio.run` on a thread of its own, called from plain code."""

    def __init__(self, config: EngineConfig, clock: trio.testing.MockClock) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self.engine: Engine | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, args=(config, clock), daemon=True)
        self._thread.start()
        if not self._ready.wait(ANSWER_SECONDS_MAX):
            raise EngineHangs("the engine did not finish opening")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self, config: EngineConfig, clock: trio.testing.MockClock) -> None:
        try:
            trio.run(self._serve, config, clock=clock)
        except BaseException as error:  # handed to the test's thread, never lost
            self._error = error
        finally:
            self._ready.set()

    async def _serve(self, config: EngineConfig) -> None:
        self._stop = trio.Event()
        async with open_engine(config) as engine, trio.open_nursery() as nursery:
            self.engine = engine
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, function: Callable[..., Awaitable[T]], *args: Any, **keywords: Any) -> T:
        """Await `function(*args, **keywords)` in the engine's trio loop and return its result."""
        answered = threading.Event()
        outcome: list[Any] = []

        async def call() -> None:
            try:
                outcome.append((True, await function(*args, **keywords)))
            except Exception as error:  # the caller's to see; the engine goes on
                outcome.append((False, error))
            except BaseException as error:
                outcome.append((False, error))
                raise
            finally:
                answered.set()

        assert self._nursery is not None
        self._call_soon(functools.partial(self._nursery.start_soon, call))
        if not answered.wait(ANSWER_SECONDS_MAX):
            raise EngineHangs(f"no answer to {getattr(function, '__name__', function)}{args} in {ANSWER_SECONDS_MAX} s")
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return value

    def run_sync(self, function: Callable[..., T], *args: Any) -> T:
        """Call `function(*args)` in the engine's trio loop, between its tasks' steps."""
        return self.run(_as_async(function), *args)

    def _call_soon(self, function: Callable[[], object]) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(function)
        except trio.RunFinishedError:
            self._thread.join()
            if self._error is not None:
                raise self._error from None
            raise

    def close(self) -> None:
        """Close the engine (its journals too) and wait for its thread to end."""
        if self._thread.is_alive() and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._call_soon(self._stop.set)
        self._thread.join(ANSWER_SECONDS_MAX)
        if self._thread.is_alive():
            raise EngineHangs("the engine did not close")
        if self._error is not None:
            raise self._error


def _as_async(function: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    async def call(*args: Any) -> T:
        return function(*args)

    return call


# A reservation is picked as the n-th most recent id the engine handed out (one that
# no engine of ours hands out while there is none yet), or in a batch sometimes as such
# a foreign id.
recent_choices = st.integers(1, 12)
reservation_choices = st.one_of(recent_choices, recent_choices, st.sampled_from(FOREIGN_RESERVATIONS))
buyer_choices = st.sampled_from(BUYERS)
sku_choices = st.sampled_from(SKUS)
key_choices = st.sampled_from((None, None, *KEYS))
qty_choices = st.sampled_from((1, 1, 1, 2, 2, 3))
own_buyer_choices = st.sampled_from((True, True, True, False))
# A SKU's settings; sale windows are relative to the moment put_sku runs.
sku_settings = st.fixed_dictionaries(
    {
        "stock": st.integers(0, 6),
        "per_buyer_limit": st.integers(1, 3),
        "hold_seconds": st.sampled_from([5, 30, 100.5]),
        "opens_in": st.sampled_from([None, None, None, -10.0, 20.0]),
        "closes_in": st.sampled_from([None, None, None, 15.0, 60.0, -5.0]),
        "registration_required": st.sampled_from([False, False, True]),
    }
)

order_choices = st.sampled_from((None, None, "po-1", "po-2"))
# A change of some settings only: put_sku leaves the others as they are.
partial_settings = st.fixed_dictionaries(
    {},
    optional={
        "stock": st.integers(0, 6),
        "per_buyer_limit": st.integers(1, 3),
        "hold_seconds": st.sampled_from([5, 30, 100.5]),
        "opens_in": st.sampled_from([None, -10.0, 20.0]),
        "closes_in": st.sampled_from([None, 15.0, 60.0]),
        "registration_required": st.booleans(),
    },
)

# Values each argument must refuse with `invalid`.
BAD_NAMES = ("", "x" * 300, "é" * 129, 7, None)
BAD_VALUES = {
    "sku": BAD_NAMES,
    "buyer": BAD_NAMES,
    "key": ("", "x" * 300, "é" * 129, 7),
    "qty": (0, -1, 1001, True, 1.0, "1", None),
    "reservation": BAD_NAMES,
    "buyers": ("ann", None, ["ann", ""], ["ann", None], ["x" * 300]),
    "stock": (-1, 1.5, "3", True, None, 1_000_000_001),
    "per_buyer_limit": (0, -1, 2.0, None, False),
    "hold_seconds": (0, -3, math.inf, math.nan, "5", None, True, 366 * 86400 + 1),
    "opens_at": (-1.0, math.inf, "now", True),
    "closes_at": (-1.0, math.nan, "later", False),
    "registration_required": ("yes", 1, None),
}
BAD_ARGUMENTS = (
    ("put_sku", ("sku", "stock", "per_buyer_limit", "hold_seconds", "opens_at", "closes_at", "registration_required")),
    ("register", ("sku", "buyers")),
    ("reserve", ("sku", "buyer", "qty", "key")),
    ("confirm", ("reservation", "buyer")),
    ("cancel", ("reservation", "buyer")),
    ("stock", ("sku",)),
)
bad_argument_choices = st.sampled_from(
    [(operation, argument) for operation, arguments in BAD_ARGUMENTS for argument in arguments]
)


class EngineAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="soldout-stateful-")
        self.clock = trio.testing.MockClock()
        self.model = Model(shards=SHARDS)
        self.reservations: list[str] = []  # every id the engine handed out, for confirm and cancel
        self.engine_thread: EngineThread | None = None
        self.config: EngineConfig | None = None

    def now(self) -> float:
        return EPOCH + self.clock.current_time()

    @initialize(
        snapshot_records_min=st.sampled_from([1, 4, 100_000]),
        first_skus=st.lists(sku_settings, min_size=len(SKUS) - 1, max_size=len(SKUS) - 1),
    )
    def open(self, snapshot_records_min: int, first_skus: list[dict[str, Any]]) -> None:
        """Open the engine with all SKUs but the last on sale; the last may come later."""
        self.config = EngineConfig(
            shards=SHARDS,
            data_dir=self.directory,
            durable=False,
            wall_clock=self.now,
            snapshot_records_min=snapshot_records_min,
        )
        self.engine_thread = EngineThread(self.config, self.clock)
        for sku, setup in zip(SKUS, first_skus, strict=False):
            self.put_sku(sku, setup)

    @property
    def engine(self) -> Engine:
        assert self.engine_thread is not None
        assert self.engine_thread.engine is not None
        return self.engine_thread.engine

    def call(self, function: Callable[..., Awaitable[T]], *args: Any, **keywords: Any) -> T:
        assert self.engine_thread is not None
        return self.engine_thread.run(function, *args, **keywords)

    def teardown(self) -> None:
        try:
            if self.engine_thread is not None:
                self.engine_thread.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def sku_name(self, sku: str) -> str:
        """The engine's name for one of SKUS (a run sharing its engine with others names its own)."""
        return sku

    def pick_reservation(self, choice: int | str) -> str:
        if isinstance(choice, str):
            return choice
        if not self.reservations:
            return FOREIGN_RESERVATIONS[choice % len(FOREIGN_RESERVATIONS)]
        return self.reservations[-1 - (choice - 1) % len(self.reservations)]

    def remember(self, reservation: str | None) -> None:
        if reservation is not None and reservation not in self.reservations:
            self.reservations.append(reservation)

    # ------------------------------------------------------------ one operation each

    def _put_sku(self, arguments: dict[str, Any]) -> None:
        keywords = {name: value for name, value in arguments.items() if name != "sku"}
        actual = self.call(self.engine.put_sku, arguments["sku"], **keywords)
        expected = self.model.put_sku(**arguments, now=self.now())
        assert_same_reply(actual, expected, ("put_sku", arguments))

    def _register(self, sku: Any, buyers: Any) -> None:
        actual = self.call(self.engine.register, sku, buyers)
        expected = self.model.register(sku, buyers, self.now())
        assert_same_reply(actual, expected, ("register", sku, buyers))

    def _reserve(self, sku: Any, buyer: Any, qty: Any, key: Any) -> None:
        actual = self.call(self.engine.reserve, sku, buyer=buyer, qty=qty, key=key)
        expected = self.model.reserve(sku, buyer, qty, key, self.now(), new_reservation=actual.reservation)
        assert_same_reply(actual, expected, ("reserve", sku, buyer, qty, key))
        self.remember(actual.reservation)

    def _end_hold(self, ending: str, reservation: Any, buyer: Any, order: Any = None) -> None:
        if ending == "confirm":
            actual = self.call(self.engine.confirm, reservation, buyer=buyer, order=order)
            expected = self.model.confirm(reservation, buyer, self.now(), order)
        else:
            actual = self.call(self.engine.cancel, reservation, buyer=buyer)
            expected = self.model.cancel(reservation, buyer, self.now())
        assert_same_reply(actual, expected, (ending, reservation, buyer))

    def _stock(self, sku: Any) -> None:
        actual = self.call(self.engine.stock, sku)
        assert_same_reply(actual, self.model.stock(sku, self.now()), ("stock", sku))

    def _buyer_for(self, reservation: str, buyer: str, own_buyer: bool) -> str:
        """Mostly the hold's own buyer, so that holds do end; sometimes another one."""
        return self.model.holds[reservation].buyer if own_buyer and self.model.knows(reservation) else buyer

    # ------------------------------------------------------------ rules

    @rule(sku=sku_choices, setup=sku_settings)
    def put_sku(self, sku: str, setup: dict[str, Any]) -> None:
        """Create or restock; a restock below held + sold, or a limit below a buyer's units, is invalid."""
        now = self.now()
        opens_in, closes_in = setup["opens_in"], setup["closes_in"]
        arguments = {name: value for name, value in setup.items() if name not in ("opens_in", "closes_in")}
        arguments["opens_at"] = None if opens_in is None else now + opens_in
        arguments["closes_at"] = None if closes_in is None else now + closes_in
        self._put_sku({"sku": self.sku_name(sku), **arguments})

    @rule(sku=sku_choices, buyers=st.lists(buyer_choices, max_size=3))
    def register(self, sku: str, buyers: list[str]) -> None:
        self._register(self.sku_name(sku), buyers)

    @rule(sku=sku_choices, buyer=buyer_choices, qty=qty_choices, key=key_choices)
    def reserve(self, sku: str, buyer: str, qty: int, key: str | None) -> None:
        self._reserve(self.sku_name(sku), buyer, qty, key)

    @precondition(lambda self: any(hold.key is not None for hold in self.model.holds.values()))
    @rule(which=st.integers(0, 1000), change=st.sampled_from([None, None, "qty", "buyer"]))
    def reserve_again_with_a_used_key(self, which: int, change: str | None) -> None:
        """A retry with a used key: the first hold again, or `invalid` when it differs."""
        keyed = [hold for hold in self.model.holds.values() if hold.key is not None]
        hold = keyed[which % len(keyed)]
        buyer = BUYERS[(BUYERS.index(hold.buyer) + 1) % len(BUYERS)] if change == "buyer" else hold.buyer
        qty = hold.qty % 3 + 1 if change == "qty" else hold.qty
        self._reserve(hold.sku, buyer, qty, hold.key)

    @rule(choice=recent_choices, buyer=buyer_choices, own_buyer=own_buyer_choices, order=order_choices)
    def confirm(self, choice: int | str, buyer: str, own_buyer: bool, order: str | None) -> None:
        reservation = self.pick_reservation(choice)
        self._end_hold("confirm", reservation, self._buyer_for(reservation, buyer, own_buyer), order)

    @rule(sku=sku_choices, change=partial_settings)
    def change_some_settings(self, sku: str, change: dict[str, Any]) -> None:
        """put_sku naming a few settings: the others keep their values (a new SKU needs a stock)."""
        sku = self.sku_name(sku)
        now = self.now()
        arguments = dict(change)
        for name, offset_name in (("opens_at", "opens_in"), ("closes_at", "closes_in")):
            if offset_name in arguments:
                offset = arguments.pop(offset_name)
                arguments[name] = None if offset is None else now + offset
        actual = self.call(self.engine.put_sku, sku, **arguments)
        expected = self.model.put_sku(
            sku,
            arguments.get("stock", UNCHANGED),
            arguments.get("per_buyer_limit", UNCHANGED),
            arguments.get("hold_seconds", UNCHANGED),
            arguments.get("opens_at", UNCHANGED),
            arguments.get("closes_at", UNCHANGED),
            arguments.get("registration_required", UNCHANGED),
            now,
        )
        assert_same_reply(actual, expected, ("put_sku", sku, arguments))

    @rule(choice=reservation_choices, buyer=buyer_choices, own_buyer=own_buyer_choices)
    def look_up_a_hold(self, choice: int | str, buyer: str, own_buyer: bool) -> None:
        reservation = self.pick_reservation(choice)
        buyer = self._buyer_for(reservation, buyer, own_buyer)
        actual = self.call(self.engine.hold, reservation, buyer=buyer)
        assert_same_reply(actual, self.model.hold(reservation, buyer, self.now()), ("hold", reservation, buyer))

    @rule(sku=sku_choices)
    def get_sku(self, sku: str) -> None:
        sku = self.sku_name(sku)
        actual = self.call(self.engine.get_sku, sku)
        assert_same_reply(actual, self.model.get_sku(sku, self.now()), ("get_sku", sku))

    @rule(choice=recent_choices, buyer=buyer_choices, own_buyer=own_buyer_choices)
    def cancel(self, choice: int | str, buyer: str, own_buyer: bool) -> None:
        reservation = self.pick_reservation(choice)
        self._end_hold("cancel", reservation, self._buyer_for(reservation, buyer, own_buyer))

    @rule(bad=bad_argument_choices, which=st.integers(0, 7), sku=sku_choices, buyer=buyer_choices)
    def bad_argument(self, bad: tuple[str, str], which: int, sku: str, buyer: str) -> None:
        """One argument of an otherwise good operation is bad: `invalid`, and nothing changes."""
        operation, argument = bad
        values = BAD_VALUES[argument]
        arguments: dict[str, Any] = {
            "sku": self.sku_name(sku),
            "buyer": buyer,
            "buyers": [buyer],
            "qty": 1,
            "key": None,
            "reservation": self.pick_reservation(1),
            "stock": 6,
            "per_buyer_limit": 3,
            "hold_seconds": 30,
            "opens_at": None,
            "closes_at": None,
            "registration_required": False,
        }
        arguments[argument] = values[which % len(values)]
        if operation == "put_sku":
            names = ("sku", "stock", "per_buyer_limit", "hold_seconds", "opens_at", "closes_at")
            self._put_sku({name: arguments[name] for name in (*names, "registration_required")})
        elif operation == "register":
            self._register(arguments["sku"], arguments["buyers"])
        elif operation == "reserve":
            self._reserve(arguments["sku"], arguments["buyer"], arguments["qty"], arguments["key"])
        elif operation == "stock":
            self._stock(arguments["sku"])
        else:
            self._end_hold(operation, arguments["reservation"], arguments["buyer"])

    @rule(
        commands=st.lists(
            st.one_of(
                st.tuples(st.just("reserve"), sku_choices, buyer_choices, qty_choices, key_choices),
                st.tuples(st.just("confirm"), reservation_choices, buyer_choices, own_buyer_choices),
                st.tuples(st.just("cancel"), reservation_choices, buyer_choices, own_buyer_choices),
                st.tuples(st.just("stock"), sku_choices),
            ),
            min_size=1,
            max_size=6,
        )
    )
    def batch(self, commands: list[tuple[Any, ...]]) -> None:
        """The batch entry point: replies in request order, decided at one moment."""
        built: list[Command] = []
        for command in commands:
            if command[0] == "reserve":
                built.append(Reserve(self.sku_name(command[1]), *command[2:]))
            elif command[0] == "stock":
                built.append(Stock(self.sku_name(command[1])))
            else:
                reservation = self.pick_reservation(command[1])
                buyer = self._buyer_for(reservation, command[2], own_buyer=command[3])
                ending = Confirm if command[0] == "confirm" else Cancel
                built.append(ending(reservation, buyer))
        replies = self.call(self.engine.execute, built)
        assert len(replies) == len(built)
        now = self.now()
        for command, actual in zip(built, replies, strict=True):
            if isinstance(command, Reserve):
                expected = self.model.reserve(*_fields(command), now, new_reservation=actual.reservation)
                self.remember(actual.reservation)
            elif isinstance(command, Stock):
                expected = self.model.stock(command.sku, now)
            elif isinstance(command, Confirm):
                expected = self.model.confirm(command.reservation, command.buyer, now)
            else:
                expected = self.model.cancel(command.reservation, command.buyer, now)
            assert_same_reply(actual, expected, ("batch", command))

    @rule(seconds=st.sampled_from([0.5, 3.0, 10.0, 40.0]))
    def advance_time(self, seconds: float) -> None:
        """Holds run out and sale windows open and close as the clock moves."""
        assert self.engine_thread is not None
        self.engine_thread.run_sync(self.clock.jump, seconds)

    @rule(which=st.integers(0, 100), offset=st.sampled_from([0.0, -0.25, 0.25]))
    def advance_time_to_a_deadline(self, which: int, offset: float) -> None:
        """Land on, just before or just after a hold's expiry or a sale window's edge.

        All times are multiples of 0.25 s near 1.7e9, where floats are exact, so
        "on" is exactly on: a hold expires at its `expires_at`, a window closes at
        its `closes_at`.
        """
        now = self.now()
        deadlines = sorted(
            {hold.expires_at for hold in self.model.holds.values() if hold.state == "held"}
            | {moment for sku in self.model.skus.values() for moment in (sku.opens_at, sku.closes_at) if moment}
        )
        targets = [deadline + offset for deadline in deadlines if deadline + offset > now]
        if targets:
            self.advance_time(targets[which % len(targets)] - now)
            assert self.now() == targets[which % len(targets)]

    @rule(closed_for=st.sampled_from([0.0, 0.0, 7.0, 50.0]))
    def reopen(self, closed_for: float) -> None:
        """Close the engine and open the same data directory: nothing may change but time.

        Holds that ran out while it was closed expire as it opens.
        """
        assert self.engine_thread is not None
        assert self.config is not None
        self.engine_thread.close()
        self.engine_thread = None
        self.clock.jump(closed_for)
        self.engine_thread = EngineThread(self.config, self.clock)

    # ------------------------------------------------------------ invariants

    @invariant()
    def same_state_as_the_model(self) -> None:
        if self.engine_thread is None:
            return
        now = self.now()
        self.model.expire(now)
        self.model.check_invariants()
        for sku in map(self.sku_name, SKUS):
            actual = self.call(self.engine.stock, sku)
            assert_same_reply(actual, self.model.stock(sku, now), ("stock", sku))
            if actual.ok:
                assert actual.held + actual.sold <= actual.stock
                assert actual.available == actual.stock - actual.held - actual.sold
        # The books may still hold a hold past its time until their next batch; the
        # stock calls above were that batch for every SKU, so now they agree.
        actual, expected = self.engine_thread.run_sync(observe_engine, self.engine), self.model.view()
        assert actual.skus == expected.skus, "the engine's SKUs differ from the model's"
        assert actual.holds == expected.holds, "the engine's holds differ from the model's"


def _fields(command: Reserve) -> tuple[Any, Any, Any, Any]:
    return command.sku, command.buyer, command.qty, command.key


EngineAgainstModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineAgainstModel = EngineAgainstModel.TestCase
