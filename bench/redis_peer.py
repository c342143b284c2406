"""The peer: Redis 7 holding the stock, with one Lua script doing what soldout's reserve does.

This is what a team would otherwise build for a flash sale, so the bench runs the same
crowd against it. The script (loaded once with SCRIPT LOAD, called with EVALSHA,
pipelined in the bench's batches) takes an op: `reserve`, `confirm`, `cancel` or
`stock`, and answers with soldout's statuses, checked in soldout's order: unknown_sku,
a used idempotency key returns its first hold, limit_exceeded, sold_out.

Each SKU lives in two keys sharing a hash tag (so a Redis Cluster keeps them on one
node): one hash with its counts, settings, units per buyer, idempotency keys and holds,
so that everything a reserve needs comes from one HMGET; and a sorted set of the live
holds scored by their expiry time. Expiry is real and works like soldout's shard: each
call first ends every hold whose time ran out (the hash keeps the earliest expiry, so
the sorted set is read only when one is due), giving its units back to the SKU and to
its buyer (a key with PEXPIRE could not give the units back). The clock is Redis's own
(TIME), unless a call passes `now`, which is how the tests drive expiry without sleeping.

Also here: starting a throwaway redis-server for a run. The bytes the load driver sends
are bench/targets.py's, its loop is bench/driver.py's; nothing here imports either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bench.scenarios import SkuPlan

RESERVE_SCRIPT = r"""
-- soldout's reserve, confirm, cancel and stock for one SKU.
-- KEYS[1] the SKU, one hash: name, stock, held, sold, limit (units per buyer), hold_ms,
--         last (the last hold number), next_expiry (epoch ms; absent with no live hold), and
--         b:<buyer> -> units held + sold (dropped when a buyer's holds all ended),
--         k:<key> -> hold number (idempotency keys, for the SKU's lifetime),
--         h:<number> -> "state:qty:expires_ms:buyer" (state h held, c confirmed, x cancelled, e expired)
-- KEYS[2] live holds: a sorted set of hold numbers scored by expires_ms
-- ARGV[1] op: reserve | confirm | cancel | stock
-- ARGV[2] now in epoch milliseconds, or '' for the Redis server's clock
-- reserve: ARGV[3] buyer, ARGV[4] qty, ARGV[5] idempotency key or ''
-- confirm, cancel: ARGV[3] reservation, ARGV[4] buyer
-- Replies: {status}; reserve ok: {'ok', reservation, expires_ms, remaining};
-- stock ok: {'ok', stock, available, held, sold}.
-- Everything a reserve needs comes from one HMGET, and an ok writes one HSET and one ZADD.
local sku_key, live_key = KEYS[1], KEYS[2]
local op = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end

local buyer_field, extra_field, number
if op == 'reserve' then
  buyer_field = 'b:' .. ARGV[3]
  extra_field = 'k:' .. ARGV[5]
elseif op == 'confirm' or op == 'cancel' then
  number = string.match(ARGV[3], ':(%d+)$')
  buyer_field = 'b:' .. ARGV[4]
  extra_field = 'h:' .. (number or '')
else
  buyer_field, extra_field = 'name', 'name'
end
local sku = redis.call(
  'HMGET', sku_key, 'name', 'stock', 'held', 'sold', 'limit', 'hold_ms', 'last', 'next_expiry',
  buyer_field, extra_field)
local name = sku[1]
if not name then
  return {'unknown_sku'}
end
local stock, held, sold = tonumber(sku[2]), tonumber(sku[3]), tonumber(sku[4])

local function parse(record)
  local state, qty, expires, buyer = string.match(record, '^(%a):(%d+):(%d+):(.*)$')
  return state, tonumber(qty), expires, buyer
end

local function give_back(buyer, qty)
  if redis.call('HINCRBY', sku_key, 'b:' .. buyer, -qty) <= 0 then
    redis.call('HDEL', sku_key, 'b:' .. buyer)
  end
end

-- Expiry: every hold whose time ran out ends now, before this call is decided, as
-- soldout's shard does before a batch. next_expiry spares the sorted set until one is due.
local next_expiry = tonumber(sku[8])
if next_expiry and now >= next_expiry then
  local due = redis.call('ZRANGE', live_key, '-inf', now, 'BYSCORE')
  for _, due_number in ipairs(due) do
    local _, qty, expires, buyer = parse(redis.call('HGET', sku_key, 'h:' .. due_number))
    held = held - qty
    give_back(buyer, qty)
    redis.call('HSET', sku_key, 'h:' .. due_number, 'e:' .. qty .. ':' .. expires .. ':' .. buyer)
  end
  if #due > 0 then
    redis.call('ZREMRANGEBYSCORE', live_key, '-inf', now)
    -- What the expiries changed of this call's own fields.
    sku[9] = redis.call('HGET', sku_key, buyer_field)
    sku[10] = redis.call('HGET', sku_key, extra_field)
  end
  local first = redis.call('ZRANGE', live_key, 0, 0, 'WITHSCORES')
  if first[2] then
    redis.call('HSET', sku_key, 'held', held, 'next_expiry', first[2])
  else
    redis.call('HSET', sku_key, 'held', held)
    redis.call('HDEL', sku_key, 'next_expiry')
  end
end

if op == 'reserve' then
  local buyer, qty, key = ARGV[3], tonumber(ARGV[4]), ARGV[5]
  if key ~= '' and sku[10] then
    local _, hold_qty, expires, hold_buyer = parse(redis.call('HGET', sku_key, 'h:' .. sku[10]))
    if hold_buyer ~= buyer or hold_qty ~= qty then
      return {'invalid', 'key was already used with another buyer or qty'}
    end
    return {'ok', name .. ':' .. sku[10], tonumber(expires), stock - held - sold}
  end
  local units = tonumber(sku[9] or 0)
  if units + qty > tonumber(sku[5]) then
    return {'limit_exceeded'}
  end
  local available = stock - held - sold
  if qty > available then
    return {'sold_out'}
  end
  local hold = tonumber(sku[7]) + 1
  local expires = now + tonumber(sku[6])
  local record = 'h:' .. qty .. ':' .. expires .. ':' .. buyer
  if key ~= '' then
    redis.call('HSET', sku_key, 'held', held + qty, 'last', hold, buyer_field, units + qty, 'h:' .. hold, record,
      'k:' .. key, hold)
  else
    redis.call('HSET', sku_key, 'held', held + qty, 'last', hold, buyer_field, units + qty, 'h:' .. hold, record)
  end
  if not next_expiry or expires < next_expiry then
    redis.call('HSET', sku_key, 'next_expiry', expires)
  end
  redis.call('ZADD', live_key, expires, hold)
  return {'ok', name .. ':' .. hold, expires, available - qty}
end

if op == 'confirm' or op == 'cancel' then
  local reservation, buyer = ARGV[3], ARGV[4]
  local record = sku[10]
  if not number or reservation ~= name .. ':' .. number or not record then
    return {'not_found'}
  end
  local state, qty, expires, hold_buyer = parse(record)
  -- A wrong buyer learns nothing: the answer is the same as for an unknown id.
  if hold_buyer ~= buyer then
    return {'not_found'}
  end
  if state == 'h' then
    if op == 'confirm' then
      state = 'c'
      redis.call('HSET', sku_key, 'held', held - qty, 'sold', sold + qty, 'h:' .. number,
        state .. ':' .. qty .. ':' .. expires .. ':' .. buyer)
    else
      state = 'x'
      redis.call('HSET', sku_key, 'held', held - qty, 'h:' .. number,
        state .. ':' .. qty .. ':' .. expires .. ':' .. buyer)
      give_back(buyer, qty)
    end
    redis.call('ZREM', live_key, number)
    return {'ok'}
  end
  if (state == 'c' and op == 'confirm') or (state == 'x' and op == 'cancel') then
    return {'ok'}
  end
  if state == 'e' then
    return {'expired'}
  end
  return {'conflict'}
end

if op == 'stock' then
  return {'ok', stock, stock - held - sold, held, sold}
end
return {'invalid', 'unknown op ' .. tostring(op)}
"""

SCRIPT_KEYS = 2
REDIS_MISSING = (
    "redis-server is not installed, so the bench cannot start a Redis peer.\n"
    "Install it with `make bench-peer` (or `apt-get install redis-server`), "
    "or point the bench at a running Redis 7 with --redis-url redis://HOST:PORT."
)
START_SECONDS_MAX = 20.0


class RedisPeerError(Exception):
    """The Redis peer cannot run; the message says what to do."""


def sku_keys(prefix: str, sku: str) -> tuple[str, str]:
    """The script's KEYS for one SKU; the {hash tag} keeps both on one Redis Cluster node."""
    base = f"{prefix}{{{sku}}}"
    return (f"{base}:sku", f"{base}:live")


def load_script(client: Any) -> str:
    """SCRIPT LOAD, once per run; returns the SHA that EVALSHA calls name."""
    return client.script_load(RESERVE_SCRIPT)


def put_skus(client: Any, prefix: str, skus: Sequence[SkuPlan]) -> None:
    """A fresh SKU for each plan: its keys cleared, its settings and counts set."""
    pipeline = client.pipeline(transaction=False)
    for plan in skus:
        keys = sku_keys(prefix, plan.sku)
        pipeline.delete(*keys)
        pipeline.hset(
            keys[0],
            mapping={
                "name": plan.sku,
                "stock": plan.stock,
                "held": 0,
                "sold": 0,
                "limit": plan.per_buyer_limit,
                "hold_ms": int(plan.hold_seconds * 1000),
                "last": 0,
            },
        )
    pipeline.execute()


@dataclass(frozen=True, slots=True)
class StockCounts:
    stock: int
    available: int
    held: int
    sold: int


def read_stock(client: Any, sha: str, prefix: str, skus: Sequence[SkuPlan]) -> list[StockCounts | None]:
    """Each SKU's counts through the script's own `stock` op (which first ends due holds)."""
    pipeline = client.pipeline(transaction=False)
    for plan in skus:
        pipeline.evalsha(sha, SCRIPT_KEYS, *sku_keys(prefix, plan.sku), "stock", "")
    counts: list[StockCounts | None] = []
    for reply in pipeline.execute():
        status = _text(reply[0])
        counts.append(StockCounts(*(int(value) for value in reply[1:5])) if status == "ok" else None)
    return counts


def delete_run_keys(client: Any, prefix: str) -> int:
    """Remove every key of one bench run from a Redis the bench did not start."""
    deleted = 0
    batch = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- a throwaway redis-server


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_server_arguments(executable: str, port: int, directory: str, *, durable: bool) -> list[str]:
    """Loopback only; durable: every write appended and fsynced before the reply, as soldout's durable mode."""
    arguments = [
        executable,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        directory,
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        os.path.join(directory, "redis.log"),
    ]
    if durable:
        arguments += ["--appendonly", "yes", "--appendfsync", "always"]
    else:
        arguments += ["--appendonly", "no"]
    return arguments


@contextlib.contextmanager
def running_redis_server(*, durable: bool, directory: str | None = None) -> Iterator[str]:
    """Start a redis-server on a free loopback port; yields its URL; stops it after."""
    import redis

    executable = find_redis_server()
    if executable is None:
        raise RedisPeerError(REDIS_MISSING)
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="soldout-redis-"))
        port = free_port()
        process = subprocess.Popen(
            redis_server_arguments(executable, port, directory, durable=durable),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + START_SECONDS_MAX
            while True:
                if process.poll() is not None:
                    error = process.stderr.read().decode(errors="replace") if process.stderr else ""
                    log = _read_log(directory)
                    raise RedisPeerError(f"redis-server exited at start ({process.returncode}): {error}{log}")
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RedisPeerError(f"redis-server did not answer on port {port}") from None
                    time.sleep(0.02)
            client.close()
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()


def _read_log(directory: str) -> str:
    try:
        with open(os.path.join(directory, "redis.log")) as log:
            return log.read()[-2000:]
    except OSError:
        return ""
