"""The Redis peer's Lua script against a real redis-server, started by the test.

The script must do what soldout's reserve does, or the side-by-side bench compares
unlike things. Time is passed in (the script's `now` argument), so expiry is driven
without sleeping. `make test` installs redis-server when it is missing; a machine
without it fails here, saying so.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from bench.redis_peer import (
    REDIS_MISSING,
    SCRIPT_KEYS,
    StockCounts,
    delete_run_keys,
    load_script,
    put_skus,
    read_stock,
    running_redis_server,
    sku_keys,
)
from bench.scenarios import SkuPlan

PREFIX = "test:"
NOW = 1_700_000_000_000  # epoch milliseconds
HOLD_SECONDS = 2.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.fail(REDIS_MISSING)
    directory = tmp_path_factory.mktemp("redis")
    with running_redis_server(durable=False, directory=str(directory)) as url:
        yield url


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url, decode_responses=True)
    connection.flushdb()
    yield connection
    connection.close()


@pytest.fixture
def sale(client: redis.Redis) -> Callable[..., Callable[..., list[Any]]]:
    """Puts a SKU; returns a function that calls the script on it."""
    sha = load_script(client)

    def put(sku: str = "MI-BAND", *, stock: int = 10, per_buyer_limit: int = 1) -> Callable[..., list[Any]]:
        put_skus(client, PREFIX, [SkuPlan(sku, stock, per_buyer_limit, HOLD_SECONDS)])

        def call(op: str, *arguments: Any, now: int = NOW, on: str = sku) -> list[Any]:
            return client.evalsha(sha, SCRIPT_KEYS, *sku_keys(PREFIX, on), op, now, *arguments)

        return call

    return put


def stock_of(call: Callable[..., list[Any]], now: int = NOW) -> StockCounts:
    reply = call("stock", now=now)
    assert reply[0] == "ok", reply
    return StockCounts(*reply[1:5])


def test_reserve_ok_holds_a_unit_until_its_expiry(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    call = sale(stock=10)
    reply = call("reserve", "u1", 1, "k1")
    assert reply == ["ok", "MI-BAND:1", NOW + int(HOLD_SECONDS * 1000), 9]
    assert stock_of(call) == StockCounts(stock=10, available=9, held=1, sold=0)


def test_sold_out_when_no_unit_is_left(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    call = sale(stock=2)
    assert [call("reserve", f"u{n}", 1, f"k{n}")[0] for n in range(4)] == ["ok", "ok", "sold_out", "sold_out"]
    assert stock_of(call) == StockCounts(stock=2, available=0, held=2, sold=0)


def test_limit_exceeded_counts_units_per_buyer(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    call = sale(stock=10, per_buyer_limit=2)
    assert call("reserve", "u1", 2, "k1")[0] == "ok"
    assert call("reserve", "u1", 1, "k2") == ["limit_exceeded"]
    assert call("reserve", "u2", 3, "k3") == ["limit_exceeded"]
    assert stock_of(call).held == 2


def test_limit_is_checked_before_stock(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    # soldout's order of precedence: limit_exceeded comes before sold_out.
    call = sale(stock=1)
    assert call("reserve", "u1", 1, "k1")[0] == "ok"
    assert call("reserve", "u1", 1, "k2") == ["limit_exceeded"]


def test_unknown_sku(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    call = sale()
    assert call("reserve", "u1", 1, "k1", on="NO-SUCH-SKU") == ["unknown_sku"]
    assert call("stock", on="NO-SUCH-SKU") == ["unknown_sku"]


def test_a_reused_key_returns_the_first_hold(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    call = sale(stock=5)
    first = call("reserve", "u1", 1, "k1")
    again = call("reserve", "u1", 1, "k1", now=NOW + 500)
    assert first[0] == "ok"
    assert again[:3] == first[:3]  # the same hold, the same expiry
    assert again[3] == 4
    assert stock_of(call).held == 1
    assert call("reserve", "u2", 1, "k1") == ["invalid", "key was already used with another buyer or qty"]
    assert stock_of(call).held == 1


def test_expiry_gives_units_back_to_the_sku_and_the_buyer(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    call = sale(stock=1)
    hold = call("reserve", "u1", 1, "k1")
    expires_at = hold[2]
    assert call("reserve", "u2", 1, "k2", now=expires_at - 1) == ["sold_out"]
    # At its expiry time the hold has ended: its unit is on sale again.
    assert call("reserve", "u2", 1, "k2", now=expires_at)[0] == "ok"
    assert stock_of(call, now=expires_at) == StockCounts(stock=1, available=0, held=1, sold=0)
    assert call("confirm", hold[1], "u1", now=expires_at + 1) == ["expired"]
    # u1's unit came back to u1 as well: only the stock stops it now, not the limit.
    assert call("reserve", "u1", 1, "k3", now=expires_at + 1) == ["sold_out"]


def test_expiry_happens_in_a_stock_call_too(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    call = sale(stock=3)
    for number in range(3):
        assert call("reserve", f"u{number}", 1, f"k{number}", now=NOW + number)[0] == "ok"
    later = NOW + int(HOLD_SECONDS * 1000) + 1
    assert stock_of(call, now=later) == StockCounts(stock=3, available=2, held=1, sold=0)
    assert stock_of(call, now=later + 10) == StockCounts(stock=3, available=3, held=0, sold=0)


def test_an_ended_hold_never_expires_and_the_next_one_still_does(
    sale: Callable[..., Callable[..., list[Any]]],
) -> None:
    call = sale(stock=3)
    first = call("reserve", "u1", 1, "k1")[1]
    assert call("reserve", "u2", 1, "k2", now=NOW + 100)[0] == "ok"
    assert call("confirm", first, "u1", now=NOW + 50) == ["ok"]
    hold_ms = int(HOLD_SECONDS * 1000)
    # The confirmed hold's expiry passes: nothing changes, the sold unit stays sold.
    assert stock_of(call, now=NOW + hold_ms + 50) == StockCounts(stock=3, available=1, held=1, sold=1)
    assert stock_of(call, now=NOW + hold_ms + 100) == StockCounts(stock=3, available=2, held=0, sold=1)
    assert call("confirm", first, "u1", now=NOW + hold_ms + 200) == ["ok"]


def test_confirm_sells_and_cancel_gives_back(sale: Callable[..., Callable[..., list[Any]]]) -> None:
    call = sale(stock=2)
    first = call("reserve", "u1", 1, "k1")[1]
    second = call("reserve", "u2", 1, "k2")[1]
    assert call("confirm", first, "u1") == ["ok"]
    assert call("confirm", first, "u1") == ["ok"]  # a retry of what already happened
    assert call("cancel", first, "u1") == ["conflict"]
    assert call("cancel", second, "u1") == ["not_found"]  # another buyer's hold
    assert call("cancel", second, "u2") == ["ok"]
    assert call("confirm", second, "u2") == ["conflict"]
    assert call("confirm", "MI-BAND:99", "u2") == ["not_found"]
    assert call("confirm", "OTHER:1", "u1") == ["not_found"]
    assert stock_of(call) == StockCounts(stock=2, available=1, held=0, sold=1)
    # The confirmed unit still counts against u1's limit; u2's cancelled one does not.
    assert call("reserve", "u1", 1, "k3") == ["limit_exceeded"]
    assert call("reserve", "u2", 1, "k4")[0] == "ok"


def test_the_clock_defaults_to_the_redis_server(client: redis.Redis) -> None:
    sha = load_script(client)
    put_skus(client, PREFIX, [SkuPlan("MI-BAND", 1, 1, HOLD_SECONDS)])
    seconds, microseconds = client.time()
    reply = client.evalsha(sha, SCRIPT_KEYS, *sku_keys(PREFIX, "MI-BAND"), "reserve", "", "u1", 1, "k1")
    assert reply[0] == "ok"
    now = seconds * 1000 + microseconds // 1000
    assert now + int(HOLD_SECONDS * 1000) <= reply[2] <= now + int(HOLD_SECONDS * 1000) + 60_000


def test_read_stock_and_delete_run_keys(client: redis.Redis) -> None:
    sha = load_script(client)
    plans = [SkuPlan("A", 3, 1, HOLD_SECONDS), SkuPlan("B", 5, 1, HOLD_SECONDS)]
    put_skus(client, PREFIX, plans)
    client.evalsha(sha, SCRIPT_KEYS, *sku_keys(PREFIX, "B"), "reserve", "", "u1", 1, "k1")
    counts = read_stock(client, sha, PREFIX, [*plans, SkuPlan("C", 1, 1, HOLD_SECONDS)])
    assert counts == [StockCounts(3, 3, 0, 0), StockCounts(5, 4, 1, 0), None]
    client.set("unrelated", "stays")
    assert delete_run_keys(client, PREFIX) > 0
    assert client.keys(f"{PREFIX}*") == []
    assert client.get("unrelated") == "stays"
