"""RedisStore: the UsageStore in Redis, shared by every gateway that uses the same Redis and prefix.

Same semantics as MemoryStore (policy/store.py says what they are); only where the numbers live
differs. Per key fingerprint (never the virtual key), under `<prefix><fingerprint>:`:

    rpm    sorted set: one member per admitted request, scored by its time (sliding log)
    tpm    sorted set: "<id>:<tokens>" per finished request, scored by when it ended
    held   hash: ticket -> "<tokens> <usd> <expires>", the reservations in flight
    spend  hash: t / u (lifetime tokens / dollars), h<hour> / u<hour> (hourly buckets)

Every admission is ONE round trip: the RESERVE script checks budgets, tpm, max_parallel and rpm
and reserves, atomically (Redis runs a script alone). Settling, releasing and counting are one
script call each, sent in the background: the response never waits for Redis. Every key has
a TTL (rpm and tpm a minute, held the reservation bound, spend the longest budget period) so
nothing grows without bound, and a key that is never used again disappears.

Target cooldowns (policy/targets.py) are read from this process's CooldownTable, never from Redis
on the request path. A new cooldown is also written to the hash `<prefix>cooldowns` (target id ->
until; the later until wins, ended entries are dropped) in the background, and every
COOLDOWN_SYNC seconds each gateway pulls the hash and merges the entries still running: a target
one gateway found dead is skipped by all within about half a second. Redis down: cooldowns keep
working in each process; the live ones are written again once Redis is back.

Redis unreachable: reserve() raises StoreUnavailable (the gateway answers 503 store_unavailable
for keys with limits; keys without limits never ask the store), one log line when the outage
starts and one when it ends. The client reconnects by itself on the next request; no restart.
Spend lives in Redis; when Redis starts empty (no `<prefix>seeded` marker), the first gateway
to connect loads the usage ledger's buckets into it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from addon.policy.store import (
    BUCKET, MINUTE, PARALLEL_RETRY, RESERVATION_TTL, RETENTION_HOURS, CooldownTable, Demand, Limits, Spend,
    StoreUnavailable, Verdict,
)
from addon.usage.metrics import count_store_error

log = logging.getLogger("gateway")

TIMEOUT = 1.0  # seconds for a connect or a reply: a Redis that does not answer is an outage
SPEND_TTL = (RETENTION_HOURS + 1) * BUCKET  # seconds: the longest budget period, and an hour
SEED_BATCH = 1000  # ledger buckets per round trip when Redis is seeded
COOLDOWN_SYNC = 0.5  # seconds between two pulls of the shared cooldowns
COOLDOWN_KEPT = 60.0  # seconds an ended cooldown no request looked at stays in the local table

# KEYS: rpm, tpm, held, spend. ARGV: now, rpm, tpm, budget_tokens, budget_usd, period, max_parallel,
# demand tokens, demand usd, ticket, reservation ttl ("" = no limit of that kind; ticket "" = hold
# nothing). Returns {""} + ticket when admitted, or {refused, wait, used} (numbers as strings:
# Redis turns Lua numbers into integers).
RESERVE = """
local now = tonumber(ARGV[1])
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local budget_tokens, budget_usd, period = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local max_parallel = tonumber(ARGV[7])
local want_tokens, want_usd = tonumber(ARGV[8]), tonumber(ARGV[9])
local ticket, ttl = ARGV[10], tonumber(ARGV[11])
local minute, bucket = 60, 3600

local function fits(used, demand, limit) return used < limit and used + demand <= limit end

-- reservations in flight (expired ones dropped: a killed worker's)
local held_tokens, held_usd, held_count = 0, 0, 0
local held = redis.call('HGETALL', KEYS[3])
for i = 1, #held, 2 do
  local t, u, expires = string.match(held[i + 1], '(%S+) (%S+) (%S+)')
  if tonumber(expires) <= now then
    redis.call('HDEL', KEYS[3], held[i])
  else
    held_tokens = held_tokens + tonumber(t); held_usd = held_usd + tonumber(u); held_count = held_count + 1
  end
end

if budget_tokens or budget_usd then
  local tokens, usd = 0, 0
  if period then
    local first = math.floor((now - period) / bucket)
    local spend = redis.call('HGETALL', KEYS[4])
    for i = 1, #spend, 2 do
      local kind, hour = string.sub(spend[i], 1, 1), tonumber(string.sub(spend[i], 2))
      if hour and hour >= first then
        if kind == 'h' then tokens = tokens + tonumber(spend[i + 1]) else usd = usd + tonumber(spend[i + 1]) end
      end
    end
  else
    tokens = tonumber(redis.call('HGET', KEYS[4], 't') or '0')
    usd = tonumber(redis.call('HGET', KEYS[4], 'u') or '0')
  end
  if budget_tokens and not fits(tokens + held_tokens, want_tokens, budget_tokens) then
    return {'budget_tokens', '0', tostring(tokens + held_tokens)}
  end
  if budget_usd and not fits(usd + held_usd, want_usd, budget_usd) then
    return {'budget_usd', '0', string.format('%.17g', usd + held_usd)}
  end
end

if tpm then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - minute)
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
  local demand = held_tokens + want_tokens
  local alone = held_count == 0
  local function ok(u) return u < tpm and (u + demand <= tpm or (u == 0 and alone)) end
  if not ok(used) then
    local wait = nil
    for i = 1, #entries, 2 do
      used = used - tonumber(string.match(entries[i], ':(%d+)$'))
      if ok(used) then wait = tonumber(entries[i + 1]) + minute - now; break end
    end
    return {'tpm', string.format('%.17g', wait or ARGV[12]), tostring(used + held_tokens)}
  end
end

if max_parallel and held_count >= max_parallel then
  return {'max_parallel', ARGV[12], tostring(held_count)}
end

if rpm then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - minute)
  local count = redis.call('ZCARD', KEYS[1])
  if count >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
    return {'rpm', string.format('%.17g', tonumber(oldest[2]) + minute - now), tostring(rpm)}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[13])
  redis.call('EXPIRE', KEYS[1], minute + 1)
end

if ticket == '' then return {''} end
redis.call('HSET', KEYS[3], ticket, string.format('%d %.17g %.17g', want_tokens, want_usd, now + ttl))
redis.call('EXPIRE', KEYS[3], math.ceil(ttl) + 1)
return {'', ticket}
"""

# KEYS: held, tpm, spend. ARGV: ticket ("" = none to drop), tokens, usd, when, id, spend ttl,
# retention hours, tpm ("1": count the tokens in the tpm window too)
COUNT = """
if ARGV[1] ~= '' then redis.call('HDEL', KEYS[1], ARGV[1]) end
local tokens, usd, when = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tokens > 0 and ARGV[8] == '1' then
  redis.call('ZADD', KEYS[2], when, ARGV[5] .. ':' .. ARGV[2])
  redis.call('EXPIRE', KEYS[2], 61)
end
if tokens > 0 or usd > 0 then
  local hour = math.floor(when / 3600)
  if redis.call('HEXISTS', KEYS[3], 'h' .. hour) == 0 then
    -- a new hour: drop buckets older than any budget period can reach
    local oldest = hour - tonumber(ARGV[7])
    for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
      local h = tonumber(string.sub(field, 2))
      if h and h < oldest then redis.call('HDEL', KEYS[3], field) end
    end
  end
  redis.call('HINCRBY', KEYS[3], 'h' .. hour, tokens)
  redis.call('HINCRBYFLOAT', KEYS[3], 'u' .. hour, usd)
  redis.call('HINCRBY', KEYS[3], 't', tokens)
  redis.call('HINCRBYFLOAT', KEYS[3], 'u', usd)
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
return 1
"""


# KEYS: the cooldowns hash. ARGV: target id, until, now. Keeps the later until of the two; drops
# ended entries; the hash expires with its last cooldown.
COOL = """
local wanted, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if wanted > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
local last = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local u = tonumber(entries[i + 1]) or 0
  if u <= now then redis.call('HDEL', KEYS[1], entries[i]) elseif u > last then last = u end
end
if last > 0 then redis.call('EXPIRE', KEYS[1], math.ceil(last - now) + 1) end
return 1
"""


def masked_url(url: str) -> str:
    """A Redis URL for a log line: the password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> None:
    """Raise ValueError with one clear line for a URL redis-py cannot use."""
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis_url {masked_url(url)!r} must start with redis://, rediss:// or unix://")
    try:
        aioredis.ConnectionPool.from_url(url)
    except ValueError as e:
        raise ValueError(f"redis_url {masked_url(url)!r}: {e}") from None


class RedisStore(CooldownTable):
    """The shared store. Methods are called from mitmproxy's event loop only."""

    def __init__(self, url: str, prefix: str = "llmgw:") -> None:
        super().__init__()
        self.url, self.prefix = url, prefix
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._reserve = self.redis.register_script(RESERVE)
        self._count = self.redis.register_script(COUNT)
        self._cool = self.redis.register_script(COOL)
        self.syncing: asyncio.Task | None = None  # pulling the shared cooldowns (start_cooldown_sync)
        self.cooldowns_unshared = False  # a cooldown may be missing in Redis: write ours again once it answers
        # tickets and request ids unique across gateways: this process, and a counter
        self._ids = (f"{os.getpid()}-{os.urandom(3).hex()}-{n}" for n in itertools.count(1))
        self.down = False  # in an outage (logged once)
        self.seeding: asyncio.Task | None = None  # loading the ledger into an empty Redis (admissions wait)
        self._tasks: set[asyncio.Task] = set()  # settles in flight (kept referenced)
        self._asks: list[tuple] = []  # admissions of this event-loop turn, not yet sent
        self._pending: list[tuple] = []  # settle / release / add_usage calls not yet sent
        self.seeds: list[tuple] = []  # ledger rows to load if Redis is empty (seed_spend/seed_tokens)
        self.before_read = None  # (MemoryStore's hook; usage here is counted when each flow ends)

    def keys(self, key: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}{key}:"
        return base + "rpm", base + "tpm", base + "held", base + "spend"

    # --- admission -----------------------------------------------------------------------

    async def reserve(self, key: str, limits: Limits, demand: Demand, now: float) -> Verdict:
        if self.seeding is not None:
            await self.seeding
            self.seeding = None
        ticket = next(self._ids) if limits.reserves else ""
        args = [now, *("" if v is None else v for v in limits), demand.tokens, repr(demand.usd), ticket,
                RESERVATION_TTL, PARALLEL_RETRY, ticket or next(self._ids)]
        future = asyncio.get_running_loop().create_future()
        if not self._asks:
            self.background(self.ask())
        self._asks.append((key, args, future))
        try:
            answer = await future
        except (RedisError, OSError) as e:
            self.outage(e, "reserve")
            raise StoreUnavailable(str(e)) from None
        self.up()
        if answer[0] == "":
            return Verdict(answer[1] if len(answer) > 1 else None)
        return Verdict(None, answer[0], float(answer[1]), float(answer[2]))

    async def ask(self) -> None:
        """Send the admissions of one event-loop turn: one script call, or with several requests
        arriving together, one pipeline (measured: ~50 us of gateway CPU each instead of ~230 us
        for as many calls in parallel, at 64 at once)."""
        await asyncio.sleep(0)  # the other admissions of this turn join
        asks, self._asks = self._asks, []
        try:
            if len(asks) == 1:
                key, args, _ = asks[0]
                answers = [await self._reserve(keys=self.keys(key), args=args)]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, args, _ in asks:
                        await self._reserve(keys=self.keys(key), args=args, client=pipe)
                    answers = await pipe.execute(raise_on_error=False)
        except BaseException as e:  # Redis down, or cancelled at shutdown: every admission fails closed
            for _, _, future in asks:
                if not future.done():
                    future.set_exception(e if isinstance(e, (RedisError, OSError)) else ConnectionError("store shut down"))
            return
        for (key, args, future), answer in zip(asks, answers):
            if isinstance(answer, Exception):
                if not future.done():
                    future.set_exception(answer)
            elif not future.done():
                future.set_result(answer)
            elif answer[0] == "" and len(answer) > 1:  # granted to a request that is gone meanwhile
                self.release(key, answer[1])

    async def spend(self, key: str, period: int | None, now: float) -> Spend:
        """Tokens and dollars spent in the last `period` seconds (None: ever); for metrics."""
        try:
            fields = await self.redis.hgetall(self.keys(key)[3])
        except (RedisError, OSError) as e:
            self.outage(e, "spend")
            raise StoreUnavailable(str(e)) from None
        if period is None:
            return Spend(int(fields.get("t", 0)), float(fields.get("u", 0.0)))
        first = int((now - period) // BUCKET)
        tokens, usd = 0, 0.0
        for name, value in fields.items():
            if name[1:].isdigit() and int(name[1:]) >= first:
                if name[0] == "h":
                    tokens += int(value)
                else:
                    usd += float(value)
        return Spend(tokens, usd)

    def settle(self, key: str, ticket: str, tokens: int, usd: float, when: float) -> None:
        self.queue(key, ticket, tokens, usd, when)

    def release(self, key: str, ticket: str) -> None:
        self.queue(key, ticket, 0, 0.0, 0.0)

    def add_usage(self, key: str, tokens: int, usd: float, when: float) -> None:
        self.queue(key, "", tokens, usd, when)

    def queue(self, key: str, ticket: str, tokens: int, usd: float, when: float) -> None:
        """Settling, releasing and counting never make a hook wait: they are sent in the
        background, those of one event-loop turn in one pipeline (accounting.py counts
        requests without a reservation in batches)."""
        if not self._pending:
            self.background(self.flush())
        self._pending.append((key, ticket, tokens, usd, when))

    async def flush(self) -> None:
        await asyncio.sleep(0)  # the rest of this turn's counts join
        pending, self._pending = self._pending, []
        try:
            if len(pending) == 1:
                await self.count(*pending[0])
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, ticket, tokens, usd, when in pending:
                    await self.count(key, ticket, tokens, usd, when, client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as e:
            self.outage(e, "settle")  # reservations expire by themselves; the ledger has every row
            return
        self.up()

    async def count(self, key: str, ticket: str, tokens: int, usd: float, when: float, tpm: bool = True, client=None):
        _, tpm_key, held, spend = self.keys(key)
        return await self._count(keys=[held, tpm_key, spend], client=client,
                                 args=[ticket, tokens, repr(usd), when, next(self._ids), SPEND_TTL, RETENTION_HOURS, "1" if tpm else "0"])

    def background(self, coro) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (shutting down): the reservation expires by itself
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- start-up: seeding from the ledger ---------------------------------------------

    def start_seeding(self) -> None:
        self.seeding = asyncio.get_running_loop().create_task(self.seed())

    def seed_spend(self, key: str, tokens: int, usd: float, when: float) -> None:
        self.seeds.append((key, tokens, usd, when, False))

    def seed_tokens(self, key: str, tokens: int, when: float) -> None:
        self.seeds.append((key, tokens, 0.0, when, True))

    async def seed(self) -> None:
        """Load the ledger's spend into Redis if it is empty (no marker): the first gateway to
        connect does it, the others find the marker. Spend otherwise lives in Redis alone."""
        seeds, self.seeds = self.seeds, []
        try:
            if not await self.redis.set(self.prefix + "seeded", "1", nx=True):
                return
            for start in range(0, len(seeds), SEED_BATCH):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, tokens, usd, when, tpm in seeds[start:start + SEED_BATCH]:
                        _, tpm_key, held, spend = self.keys(key)
                        # tpm rows count in the window only, spend rows in spend only
                        if tpm:
                            pipe.zadd(tpm_key, {f"{next(self._ids)}:{tokens}": when})
                            pipe.expire(tpm_key, int(MINUTE) + 1)
                        else:
                            await self.count(key, "", tokens, usd, when, tpm=False, client=pipe)
                    await pipe.execute()
            log.info("gateway: Redis %s was empty: %d ledger buckets loaded into it", masked_url(self.url), len(seeds))
        except (RedisError, OSError) as e:
            self.outage(e, "seed")

    # --- target cooldowns, shared ---------------------------------------------------------

    def cool_down(self, target_id: str, until: float, now: float | None = None) -> bool:
        later = until > self.cooldowns.get(target_id, 0.0)
        entered = super().cool_down(target_id, until, now)
        if later:
            self.background(self.share_cooldowns([(target_id, until)]))
        return entered

    async def share_cooldowns(self, entries: list[tuple[str, float]]) -> bool:
        try:
            now = time.time()
            async with self.redis.pipeline(transaction=False) as pipe:
                for target_id, until in entries:
                    await self._cool(keys=[self.prefix + "cooldowns"], args=[target_id, repr(until), repr(now)], client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as e:
            self.cooldowns_unshared = True
            self.outage(e, "share_cooldowns")
            return False
        return True

    def start_cooldown_sync(self) -> None:
        self.syncing = asyncio.get_running_loop().create_task(self.sync_cooldowns())

    async def sync_cooldowns(self) -> None:
        while True:
            await self.pull_cooldowns(time.time())
            await asyncio.sleep(COOLDOWN_SYNC)

    async def pull_cooldowns(self, now: float) -> None:
        """Merge the cooldowns other gateways set (those still running) into the local table."""
        try:
            shared = await self.redis.hgetall(self.prefix + "cooldowns")
        except (RedisError, OSError) as e:
            self.cooldowns_unshared = True  # Redis may come back empty
            self.outage(e, "pull_cooldowns")
            return
        self.up()
        local = self.cooldowns
        if self.cooldowns_unshared:
            self.cooldowns_unshared = False
            ours = [(target_id, until) for target_id, until in local.items() if until > now]
            if ours and not await self.share_cooldowns(ours):
                return
        for target_id, value in shared.items():
            try:
                until = float(value)
            except ValueError:
                continue
            if until > now and until > local.get(target_id, 0.0):
                local[target_id] = until
        # ended long ago and never looked at by a request (a target this gateway does not use)
        for target_id in [t for t, until in local.items() if until < now - COOLDOWN_KEPT]:
            del local[target_id]

    # --- outages -----------------------------------------------------------------------

    def outage(self, error: Exception, operation: str) -> None:
        count_store_error(operation)
        if not self.down:
            self.down = True
            log.error("gateway: Redis %s unreachable (%s): keys with limits get 503 store_unavailable until it is back",
                      masked_url(self.url), type(error).__name__)

    def up(self) -> None:
        if self.down:
            self.down = False
            log.info("gateway: Redis %s reachable again", masked_url(self.url))

    async def close(self) -> None:
        if self.syncing is not None:
            self.syncing.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=TIMEOUT)
        await self.redis.aclose()
