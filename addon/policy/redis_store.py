"""RedisStore: the UsageStore in Redis, shared by every gateway that uses the same Redis and prefix.

Same semantics as MemoryStore (policy/store.py says what they are); only where the numbers live
differs. Per key fingerprint (never the virtual key), under `<prefix><fingerprint>:`:

    rpm    sorted set: one member per admitted request, scored by its time (sliding log)
    tpm    sorted set: "<id>:<tokens>" per finished request, scored by when it ended
    held   hash: ticket -> "<tokens> <usd> <expires>", the reservations in flight
    bg     hash: response id -> "<tokens> <usd> <due> <meta>", holds whose usage comes later
           (policy/store.py, `defer`), counted as held by RESERVE (no max_parallel slot)
    spend  hash: t / u (lifetime tokens / dollars), h<hour> / u<hour> (hourly buckets), w (the
           last rolling-period sum: "<period> <first hour> <tokens> <usd>", as MemoryStore keeps it)

and `<prefix>owner:<response id>` -> the fingerprint that created that stored response
(policy/owners.py), kept OWNER_TTL; `<prefix>bgdue`, a sorted set of every key's deferred holds
("<fingerprint> <response id>", scored by when each is due), which each gateway sweeps
(`charge_due`): a hold whose gateway is gone is charged by another.

Every admission is ONE round trip: the RESERVE script checks budgets, tpm, max_parallel and rpm
and reserves, atomically (Redis runs a script alone). Settling, releasing and counting are sent
in the background (the response never waits for Redis), one COUNT script call per key and round
trip. The hot path has its own connection and sends everything that arrived meanwhile in one
write, with at most one round trip in flight (see `send`). Every key has a TTL (rpm and tpm a
minute, held the reservation lease, spend the longest budget period) so nothing grows without
bound, and a key that is never used again disappears.

Reservations are leases (policy/store.py): each gateway keeps the tickets it holds (reserved,
not yet settled or released) and renews them all every third of the lease (`renew`): one RENEW
call per key, with the next round trip on the request path's connection, so a renewal never
overtakes the settle of the same ticket. A killed gateway renews nothing: its reservations and
max_parallel slots are free after the lease. A renewal writes each ticket whole (worst case and
new expiry), so one that expired while Redis was unreachable, or that Redis lost with its data,
is held again as soon as Redis answers (renewals are retried every RENEW_RETRY seconds meanwhile).

Target cooldowns (policy/targets.py) are read from this process's CooldownTable, never from Redis
on the request path. A new cooldown is also written to the hash `<prefix>cooldowns` (target id ->
until; the later until wins, ended entries are dropped) in the background, and every
COOLDOWN_SYNC seconds each gateway pulls the hash and merges the entries still running: a target
one gateway found dead is skipped by all within about half a second. Redis down: cooldowns keep
working in each process; the live ones are written again once Redis is back.

Redis unreachable: reserve() raises StoreUnavailable (the gateway answers 503 store_unavailable
for keys with limits; keys without limits never ask the store), one log line when the outage
starts and one when it ends. The client reconnects by itself on the next request; no restart.
Spend lives in Redis; when Redis is empty (no `<prefix>seeded` marker: new, or restarted without
its data, at start-up or mid-run), one gateway loads the usage ledger's buckets into it (the
others wait for the marker), and admissions wait for that (see `seed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from addon.policy.cooldowns import CooldownTable
from addon.policy.store import (
    BUCKET, BUDGET_TOKENS, BUDGET_USD, OWNER_TTL, PARALLEL, PARALLEL_RETRY, RESERVATION_LEASE, RETENTION_HOURS,
    RPM, Demand, Due, Limits, Spend, StoreUnavailable, Verdict, spend_of,
)
from addon.wire.tokens import Usage
from addon.wire.secreturl import masked_url

log = logging.getLogger("gateway")

TIMEOUT = 1.0  # seconds for a connect or a reply: a Redis that does not answer is an outage
SPEND_TTL = (RETENTION_HOURS + 1) * BUCKET  # seconds: the longest budget period, and an hour
SEED_BATCH = 1000  # ledger buckets per round trip when Redis is seeded
COOLDOWN_SYNC = 0.5  # seconds between two pulls of the shared cooldowns
COOLDOWN_KEPT = 60.0  # seconds an ended cooldown no request looked at stays in the local table
SEED_LOCK_S = 10  # seconds one gateway may hold the seeding lock (a gateway that dies loading: another takes over)
REFUSAL_KEPT = 1.0  # seconds peek() repeats a refusal that came without a wait (a budget used up)
UNSEEDED = "unseeded"  # the scripts' answer when Redis has no `<prefix>seeded` marker (it lost its data)

# KEYS: rpm, tpm, held, spend, the seeded marker, bg. ARGV: now, rpm, tpm, budget_tokens, budget_usd, period, max_parallel,
# demand tokens, demand usd, ticket, reservation ttl ("" = no limit of that kind; ticket "" = hold
# nothing). Returns {""} + ticket when admitted, {refused, wait, used} (numbers as strings:
# Redis turns Lua numbers into integers), or {"unseeded"} (Redis lost its data: nothing done).
RESERVE = """
if redis.call('EXISTS', KEYS[5]) == 0 then return {'unseeded'} end
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
-- holds whose usage comes later: their worst case, held until settled or charged (no parallel slot)
local deferred = redis.call('HGETALL', KEYS[6])
for i = 2, #deferred, 2 do
  local t, u = string.match(deferred[i], '^(%S+) (%S+)')
  held_tokens = held_tokens + tonumber(t); held_usd = held_usd + tonumber(u)
end

if budget_tokens or budget_usd then
  local tokens, usd = 0, 0
  if period then
    -- the field w caches "<period> <first hour> <tokens> <usd>", kept current by COUNT: a year
    -- of hourly buckets is walked at most once an hour, not at every admission
    local first = math.floor((now - period) / bucket)
    local p, f, t, u = string.match(redis.call('HGET', KEYS[4], 'w') or '', '(%S+) (%S+) (%S+) (%S+)')
    if tonumber(p) == period and tonumber(f) == first then
      tokens, usd = tonumber(t), tonumber(u)
    else
      local spend = redis.call('HGETALL', KEYS[4])
      for i = 1, #spend, 2 do
        local kind, hour = string.sub(spend[i], 1, 1), tonumber(string.sub(spend[i], 2))
        if hour and hour >= first then
          if kind == 'h' then tokens = tokens + tonumber(spend[i + 1]) else usd = usd + tonumber(spend[i + 1]) end
        end
      end
      if #spend > 0 then  -- (an existing hash: it keeps the TTL COUNT gives it)
        redis.call('HSET', KEYS[4], 'w', string.format('%d %d %d %.17g', period, first, tokens, usd))
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
  local alone = held_count == 0 and #deferred == 0
  local function ok(u) return u < tpm and (u + demand <= tpm or (u == 0 and alone)) end
  if not ok(used) then
    local wait = nil
    for i = 1, #entries, 2 do
      used = used - tonumber(string.match(entries[i], ':(%d+)$'))
      if ok(used) then wait = math.min(minute, tonumber(entries[i + 1]) + minute - now); break end
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
    -- (at most a minute: another gateway may have counted a request at a `now` a moment later than ours)
    return {'rpm', string.format('%.17g', math.min(minute, tonumber(oldest[2]) + minute - now)), tostring(rpm)}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[13])
  redis.call('EXPIRE', KEYS[1], minute + 1)
end

if ticket == '' then return {''} end
redis.call('HSET', KEYS[3], ticket, string.format('%d %.17g %.17g', want_tokens, want_usd, now + ttl))
redis.call('EXPIRE', KEYS[3], math.ceil(ttl) + 1)
return {'', ticket}
"""

# One key's finished requests, of one round trip. KEYS: held, tpm, spend, the seeded marker.
# ARGV: seeding ("1": count even without the marker), spend ttl, retention hours, T, T tickets to
# drop, E, E pairs (when, "<id>:<tokens>") for the tpm window, then (hour, tokens, usd) triples for
# spend. Returns 0 (and does nothing) when Redis has no marker, else 1.
COUNT = """
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
local i = 4
for _ = 1, tonumber(ARGV[i]) do i = i + 1; redis.call('HDEL', KEYS[1], ARGV[i]) end
i = i + 1
local entries = tonumber(ARGV[i])
for _ = 1, entries do redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i + 2]); i = i + 2 end
if entries > 0 then redis.call('EXPIRE', KEYS[2], 61) end
local tokens, usd = 0, 0
local p, f, t, u = string.match(redis.call('HGET', KEYS[3], 'w') or '', '(%S+) (%S+) (%S+) (%S+)')
f = tonumber(f)
local newest = nil  -- the latest hour that got its first bucket here
for j = i + 1, #ARGV, 3 do
  local hour = tonumber(ARGV[j])
  if f and hour >= f then t = tonumber(t) + tonumber(ARGV[j + 1]); u = tonumber(u) + tonumber(ARGV[j + 2]) end
  if redis.call('HEXISTS', KEYS[3], 'h' .. hour) == 0 and (newest == nil or hour > newest) then newest = hour end
  redis.call('HINCRBY', KEYS[3], 'h' .. hour, ARGV[j + 1])
  redis.call('HINCRBYFLOAT', KEYS[3], 'u' .. hour, ARGV[j + 2])
  tokens = tokens + tonumber(ARGV[j + 1]); usd = usd + tonumber(ARGV[j + 2])
end
if newest then
  -- a new hour: drop buckets older than any budget period can reach (once per call: a seed
  -- brings a year of hours in one)
  local oldest = newest - tonumber(ARGV[3])
  for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
    local h = tonumber(string.sub(field, 2))
    if h and h < oldest then redis.call('HDEL', KEYS[3], field) end
  end
end
if i + 1 <= #ARGV then
  if f then redis.call('HSET', KEYS[3], 'w', string.format('%s %d %d %.17g', p, f, t, u)) end
  redis.call('HINCRBY', KEYS[3], 't', tokens)
  redis.call('HINCRBYFLOAT', KEYS[3], 'u', string.format('%.17g', usd))
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return 1
"""
# One key's live reservations, renewed by their holder. KEYS: held. ARGV: the hash's ttl, then
# (ticket, "<tokens> <usd> <expires>") pairs, written whole: an expired or lost one is held again.
# The hash's TTL is never shortened (a gateway with a longer lease may hold tickets in it).
RENEW = """
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
"""
SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (RESERVE, COUNT, RENEW)}

# Holds whose usage comes later (policy/store.py, `defer`). KEYS: the key's bg hash, <prefix>bgdue,
# the key's held, tpm, spend. ARGV: mode, response id, its bgdue member ("<fingerprint> <id>"), then
#   defer:  ticket to drop from held ("" none), "<tokens> <usd> <due> <meta>", due, the hash's ttl
#   extend: the new due, the hash's ttl (a due time only moves on)
#   charge: now, a tpm entry id, spend ttl: if due, its worst case is counted; returns {meta, tokens, usd, due}
#   settle: prompt, completion, cached tokens, when, a tpm entry id, spend ttl: counted, priced with
#           the meta's "price" ([input, output, cached input] per million); returns {meta, usd}
# A hold that is gone (settled or charged already, by any gateway) answers nil: counted once.
BG = """
local mode, rid, member = ARGV[1], ARGV[2], ARGV[3]
local function count(tokens, usd, when, id, ttl)
  if tokens > 0 then
    redis.call('ZADD', KEYS[4], when, id .. ':' .. tokens)
    redis.call('EXPIRE', KEYS[4], 61)
  end
  if tokens > 0 or usd > 0 then
    local hour = math.floor(when / 3600)
    local p, f, t, u = string.match(redis.call('HGET', KEYS[5], 'w') or '', '(%S+) (%S+) (%S+) (%S+)')
    if f and hour >= tonumber(f) then
      redis.call('HSET', KEYS[5], 'w', string.format('%s %d %d %.17g', p, tonumber(f), tonumber(t) + tokens, tonumber(u) + usd))
    end
    redis.call('HINCRBY', KEYS[5], 'h' .. hour, tokens)
    redis.call('HINCRBYFLOAT', KEYS[5], 'u' .. hour, string.format('%.17g', usd))
    redis.call('HINCRBY', KEYS[5], 't', tokens)
    redis.call('HINCRBYFLOAT', KEYS[5], 'u', string.format('%.17g', usd))
    redis.call('EXPIRE', KEYS[5], ttl)
  end
end
local function keep(ttl)
  if redis.call('TTL', KEYS[1]) < tonumber(ttl) then redis.call('EXPIRE', KEYS[1], ttl) end
end
if mode == 'defer' then
  if ARGV[4] ~= '' then redis.call('HDEL', KEYS[3], ARGV[4]) end
  redis.call('HSET', KEYS[1], rid, ARGV[5])
  redis.call('ZADD', KEYS[2], ARGV[6], member)
  keep(ARGV[7])
  return 1
end
local value = redis.call('HGET', KEYS[1], rid)
if not value then
  redis.call('ZREM', KEYS[2], member)
  return false
end
local tokens, usd, due, meta = string.match(value, '^(%S+) (%S+) (%S+) (.*)$')
if mode == 'extend' then
  if tonumber(ARGV[4]) > tonumber(due) then
    redis.call('HSET', KEYS[1], rid, tokens .. ' ' .. usd .. ' ' .. ARGV[4] .. ' ' .. meta)
    redis.call('ZADD', KEYS[2], ARGV[4], member)
    keep(ARGV[5])
  end
  return 1
end
if mode == 'charge' then
  if tonumber(due) > tonumber(ARGV[4]) then
    redis.call('ZADD', KEYS[2], due, member)  -- moved on by a poll another gateway saw
    return false
  end
  redis.call('HDEL', KEYS[1], rid); redis.call('ZREM', KEYS[2], member)
  count(tonumber(tokens), tonumber(usd), tonumber(due), ARGV[5], ARGV[6])
  return {meta, tokens, usd, due}
end
local prompt, completion, cached = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cost = 0
local ok, m = pcall(cjson.decode, meta)
if ok and type(m) == 'table' and type(m.price) == 'table' then
  local input, output, cached_input = tonumber(m.price[1]) or 0, tonumber(m.price[2]) or 0, tonumber(m.price[3])
  cached = math.min(cached, prompt)
  cost = ((prompt - cached) * input + cached * (cached_input or input) + completion * output) / 1e6
end
redis.call('HDEL', KEYS[1], rid); redis.call('ZREM', KEYS[2], member)
count(prompt + completion, cost, tonumber(ARGV[7]), ARGV[8], ARGV[9])
return {meta, string.format('%.17g', cost)}
"""
DUE_BATCH = 100  # deferred holds charged per sweep and round trip at most


def command(*args) -> bytes:
    """One Redis command in the protocol (RESP), packed here: redis-py's pack_command costs the
    gateway about 1 us of CPU per argument, and an admission has 21."""
    return (f"*{len(args)}\r\n" + arguments(args)).encode()


def arguments(args) -> str:
    """Bulk strings of str() of each argument. Only for ASCII (keys: the prefix is checked, the
    rest are hex digits, numbers and our ids), where a character is a byte."""
    return "".join([f"${len(a)}\r\n{a}\r\n" for a in map(str, args)])


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


def renewed(renewals: list[tuple[float, asyncio.Future]], ok: bool) -> None:
    for _, future in renewals:
        if not future.done():  # (its waiter may be cancelled: the gateway stopping)
            future.set_result(ok)


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

    def __init__(self, url: str, prefix: str = "llmgw:", lease: float = RESERVATION_LEASE,
                 on_error: Callable[[str], None] | None = None) -> None:
        super().__init__()
        # told the name of each operation that failed (metrics count them); never request text
        self.on_error = on_error
        self.lease = lease  # seconds a reservation is held without a renewal
        if not prefix.isascii():  # commands are packed as ASCII (`arguments`); stores.py allows less still
            raise ValueError(f"redis prefix {prefix!r} must be ASCII")
        self.url, self.prefix = url, prefix
        self.redis = aioredis.Redis.from_url(  # for what is not on the request path (spend, seeding)
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._cool = self.redis.register_script(COOL)
        self._bg = self.redis.register_script(BG)
        self._bg_unsent: list[
            tuple[str, list]
        ] = []  # defer / extend calls Redis did not take: sent again by charge_due
        self.syncing: asyncio.Task | None = None  # pulling the shared cooldowns (start_cooldown_sync)
        self.cooldowns_unshared = False  # a cooldown may be missing in Redis: write ours again once it answers
        self.marker = prefix + "seeded"
        self._conn = None  # the request path's own connection (admissions and counts), made on first use
        # tickets and request ids unique across gateways: this process, and a counter
        self._ids = map(f"{os.getpid()}-{os.urandom(3).hex()}-{{}}".format, itertools.count(1))
        self._heads: dict[str, str] = {}  # per key: the RESERVE call up to its first argument
        self.down = False  # in an outage (logged once)
        self.seeding: asyncio.Task | None = None  # loading the ledger into an empty Redis (nothing is sent meanwhile)
        self._tasks: set[asyncio.Task] = set()  # sends in flight (kept referenced)
        self._sending = False  # a send() task runs: what is queued goes with its next round trip
        self._asks: list[tuple] = []  # admissions not yet sent: (key, command, future)
        self._pending: list[tuple] = []  # settle / release / add_usage not yet sent: (key, ticket, tokens, usd, when)
        self._unseeded: list[tuple] = []  # admissions Redis answered "unseeded": sent again after the seed
        # reservations whose end could not be sent (Redis unreachable): dropped with the next round
        # trip, or they would hold budget and a max_parallel slot until they expire
        self._lost: list[tuple] = []
        self._held: dict[str, dict[str, tuple[int, float]]] = {}  # key -> ticket -> worst case: what renew() renews
        # key -> (the last refusal Redis gave, until when it stands): what peek() answers at the
        # headers of the key's next requests without a round trip
        self._refused: dict[str, tuple[Verdict, float]] = {}
        self._renewals: list[tuple[float, asyncio.Future]] = []  # renew() calls not yet sent: (now, future)
        self.seeds: list[tuple] = []  # ledger rows to load if Redis is empty (seed_spend/seed_tokens)
        self.owner_seeds: list[tuple[str, str, float]] = []  # stored responses' owners from the ledger (seed_owner)
        self.reload_owners = None  # set with a ledger: its owner records again, for a Redis that lost its data
        # at start-up: the ledger's spend per key (what seed_spend gave), and whether Redis held its
        # own already (the marker; True: the ledger was not loaded, Redis's spend counts)
        self.ledger_spend: dict[str, tuple[int, float]] = {}
        self.spend_since = 0.0  # (the buckets from this time on)
        self.found_seeded: bool | None = None
        # set by the usage accounting when it keeps a ledger: reload_seeds(counted) writes every
        # finished request to the ledger, calls counted() once what the store was told is in it,
        # and returns the ledger's rows as seeds (for a Redis that lost its data mid-run)
        self.reload_seeds = None
        self.before_read = None  # (MemoryStore's hook; usage here is counted when each flow ends)

    def keys(self, key: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}{key}:"
        return base + "rpm", base + "tpm", base + "held", base + "spend"

    # --- admission -----------------------------------------------------------------------

    async def reserve(self, key: str, limits: Limits, demand: Demand, now: float) -> Verdict:
        ticket = next(self._ids) if limits.reserves else ""
        future = asyncio.get_running_loop().create_future()
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = f"*{9 + 13}\r\n" + arguments(
                ("EVALSHA", SHA[RESERVE], 6, *self.keys(key), self.marker, f"{self.prefix}{key}:bg")
            )
        rpm, tpm, budget_tokens, budget_usd, period, parallel = limits
        self._asks.append(
            (
                key,
                (
                    head
                    + arguments(
                        (
                            repr(now),
                            "" if rpm is None else rpm,
                            "" if tpm is None else tpm,
                            "" if budget_tokens is None else budget_tokens,
                            "" if budget_usd is None else repr(budget_usd),
                            "" if period is None else period,
                            "" if parallel is None else parallel,
                            demand.tokens,
                            repr(demand.usd),
                            ticket,
                            self.lease,
                            PARALLEL_RETRY,
                            ticket or next(self._ids),
                        )
                    )
                ).encode(),
                future,
            )
        )
        self.kick()
        try:
            answer = await future
        except (RedisError, OSError) as e:
            self.outage(e, "reserve")
            raise StoreUnavailable(str(e)) from None
        self.up()
        if answer[0] == "":
            self._refused.pop(key, None)
            if len(answer) > 1:
                self._held.setdefault(key, {})[answer[1]] = (demand.tokens, demand.usd)
                return Verdict(answer[1])
            return Verdict()
        verdict = Verdict(None, answer[0], float(answer[1]), float(answer[2]))
        # kept for peek() only when it holds whatever a next request asks: an rpm window full (until
        # its wait), a budget used up (a moment: spend only grows until the period moves on)
        if (verdict.refused == RPM or (verdict.refused == BUDGET_TOKENS and verdict.used >= (limits.budget_tokens or 0))
                or (verdict.refused == BUDGET_USD and verdict.used >= (limits.budget_usd or 0))):
            self._refused[key] = (verdict, now + (verdict.wait or REFUSAL_KEPT))
        return verdict

    def peek(self, key: str, limits: Limits, pending: int, now: float) -> Verdict:
        """Without a round trip: the refusal Redis last gave this key while it stands (an rpm
        window full until its wait, a budget used up for REFUSAL_KEPT), and rpm or max_parallel
        full with this gateway's own requests of the key (bodies being read, reservations it
        holds). The fleet-wide check is reserve()'s, at admission."""
        refused = self._refused.get(key)
        if refused is not None:
            if refused[1] > now:
                return refused[0]._replace(wait=refused[1] - now)
            del self._refused[key]
        if limits.rpm is not None and pending >= limits.rpm:
            return Verdict(None, RPM, PARALLEL_RETRY, limits.rpm)
        if limits.max_parallel is not None:
            mine = len(self._held.get(key, ())) + pending
            if mine >= limits.max_parallel:
                return Verdict(None, PARALLEL, PARALLEL_RETRY, mine)
        return Verdict()

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

    # --- counting ------------------------------------------------------------------------

    def settle(self, key: str, ticket: str, tokens: int, usd: float, when: float) -> None:
        self.ended(key, ticket)
        self.queue(key, ticket, tokens, usd, when)

    def release(self, key: str, ticket: str) -> None:
        self.ended(key, ticket)
        self.queue(key, ticket, 0, 0.0, 0.0)

    def ended(self, key: str, ticket: str) -> None:
        """The ticket is no longer renewed."""
        held = self._held.get(key)
        if held is not None and held.pop(ticket, None) is not None and not held:
            del self._held[key]

    def add_usage(self, key: str, tokens: int, usd: float, when: float) -> None:
        self.queue(key, "", tokens, usd, when)

    def queue(self, key: str, ticket: str, tokens: int, usd: float, when: float) -> None:
        """Settling, releasing and counting never make a hook wait: they go with the next round
        trip (accounting.py counts requests without a reservation in batches)."""
        self._pending.append((key, ticket, tokens, usd, when))
        self.kick()

    def count_commands(self, pending: list[tuple], seeding: bool = False) -> list[tuple[str, list, bytes]]:
        """One COUNT call per key for `pending` (key, ticket, tokens, usd, when[, tpm]) entries."""
        by_key: dict[str, list] = {}
        for entry in pending:
            by_key.setdefault(entry[0], []).append(entry)
        out = []
        for key, entries in by_key.items():
            tickets, window, hours = [], [], {}
            for entry in entries:
                _, ticket, tokens, usd, when = entry[:5]
                if ticket:
                    tickets.append(ticket)
                if tokens > 0 and (len(entry) == 5 or entry[5]):  # seeds: the tpm window or spend, not both
                    window += (repr(when), f"{next(self._ids)}:{tokens}")
                if (tokens > 0 or usd > 0) and (len(entry) == 5 or not entry[5]):
                    total = hours.setdefault(int(when // BUCKET), [0, 0.0])
                    total[0] += tokens
                    total[1] += usd
            _, tpm_key, held, spend = self.keys(key)
            out.append((key, entries, command(
                "EVALSHA", SHA[COUNT], 4, held, tpm_key, spend, self.marker, "1" if seeding else "", SPEND_TTL,
                RETENTION_HOURS, len(tickets), *tickets, len(window) // 2, *window,
                *(x for hour, (tokens, usd) in hours.items() for x in (hour, tokens, repr(usd))))))
        return out

    # --- holds whose usage comes later -------------------------------------------------------

    def bg_keys(self, key: str) -> list[str]:
        base = f"{self.prefix}{key}:"
        return [base + "bg", self.prefix + "bgdue", base + "held", base + "tpm", base + "spend"]

    def defer(
        self, key: str, ticket: str | None, resource_id: str, tokens: int, usd: float, until: float, meta: str
    ) -> None:
        if ticket is not None:
            self.ended(key, ticket)  # no longer renewed: the hold has its own due time
        ttl = SPEND_TTL + math.ceil(max(0.0, until - time.time()))
        self.background(self._bg_call(key, ["defer", resource_id, f"{key} {resource_id}", ticket or "",
                                            f"{tokens} {usd!r} {until!r} {meta}", repr(until), ttl]))

    def extend(self, key: str, resource_id: str, until: float) -> None:
        ttl = SPEND_TTL + math.ceil(max(0.0, until - time.time()))
        self.background(self._bg_call(key, ["extend", resource_id, f"{key} {resource_id}", repr(until), ttl]))

    async def _bg_call(self, key: str, args: list, keep: bool = True):
        try:
            return await self._bg(keys=self.bg_keys(key), args=args)
        except (RedisError, OSError) as e:
            self.outage(e, "bg_" + args[0])
            if keep:  # a hold must not be lost to an outage: charge_due sends it again
                self._bg_unsent.append((key, args))
            return None

    async def settle_deferred(self, key: str, resource_id: str, usage: Usage, when: float) -> tuple[str, float] | None:
        """(A settle lost to an outage leaves the hold: it is charged its worst case when due.)"""
        answer = await self._bg_call(key, ["settle", resource_id, f"{key} {resource_id}", usage.prompt_tokens,
                                           usage.completion_tokens, usage.cached_tokens, repr(when), next(self._ids),
                                           SPEND_TTL], keep=False)
        return (answer[0], float(answer[1])) if answer else None

    async def charge_due(self, now: float) -> list[Due]:
        """Send the defer / extend calls an outage kept, then charge the holds due by `now`
        (any gateway's: the one that made a hold may be gone), at most DUE_BATCH per call."""
        unsent, self._bg_unsent = self._bg_unsent, []
        for key, args in unsent:
            await self._bg_call(key, args)
        if self._bg_unsent:
            return []
        try:
            members = await self.redis.zrangebyscore(self.prefix + "bgdue", "-inf", repr(now), start=0, num=DUE_BATCH)
        except (RedisError, OSError) as e:
            self.outage(e, "charge_due")
            return []
        charged = []
        for member in members:
            key, _, resource_id = member.partition(" ")
            answer = await self._bg_call(
                key, ["charge", resource_id, member, repr(now), next(self._ids), SPEND_TTL], keep=False
            )
            if answer:
                meta, tokens, usd, due = answer
                charged.append(Due(key, resource_id, int(tokens), float(usd), float(due), meta))
        return charged

    # --- leases ----------------------------------------------------------------------------

    async def renew(self, now: float) -> bool:
        """Extend every ticket this gateway holds to `now` + lease, with the next round trip;
        False when Redis could not be asked (the caller renews again soon)."""
        if not self._held:  # nothing held: no round trip
            return True
        future = asyncio.get_running_loop().create_future()
        self._renewals.append((now, future))
        self.kick()
        return await future

    def renew_commands(self, now: float) -> list[bytes]:
        """One RENEW call per key this gateway holds tickets of (built when sent: a ticket
        settled before is not in it, one settled after is dropped by a later round trip)."""
        expires = repr(now + self.lease)
        ttl = math.ceil(self.lease) + 1
        return [command("EVALSHA", SHA[RENEW], 1, self.keys(key)[2], ttl,
                        *(x for ticket, (tokens, usd) in held.items() for x in (ticket, f"{tokens} {usd!r} {expires}")))
                for key, held in self._held.items()]

    # --- the round trips -----------------------------------------------------------------

    def kick(self) -> None:
        if not self._sending and self.seeding is None:
            self._sending = self.background(self.send())

    async def send(self) -> None:
        """Send what is queued, in one write, and dispatch the answers; repeat while more was
        queued meanwhile. One round trip at a time: under load each carries every admission and
        count of the requests that arrived during the previous one (measured with
        bench/storebench.py: about 20 us of gateway CPU per admission at 64 at once, against
        65-70 us with redis-py's pipelines). Counts go first: a slot a settle frees is free
        for the admissions of the same round trip."""
        try:
            await asyncio.sleep(0)  # the rest of this event-loop turn joins
            while (self._asks or self._pending or self._renewals) and self.seeding is None:
                asks, self._asks = self._asks, []
                pending, self._pending, self._lost = self._lost + self._pending, [], []
                renewals, self._renewals = self._renewals, []
                counts = self.count_commands(pending)
                renew = self.renew_commands(max(now for now, _ in renewals)) if renewals else []
                try:
                    answers = await self.round_trip([c for _, _, c in counts] + renew + [c for _, c, _ in asks])
                except BaseException as e:  # Redis down, or cancelled at shutdown: every admission fails closed
                    error = e if isinstance(e, (RedisError, OSError)) else ConnectionError("store shut down")
                    for _, _, future in asks:
                        if not future.done():
                            future.set_exception(error)
                    if renewals:
                        self.outage(error, "renew")
                        renewed(renewals, False)
                    if counts:
                        self.outage(error, "settle")  # the ledger has every row
                        # the tickets again, not the usage: a reply lost after Redis ran it would count it twice
                        self._lost += [(key, ticket, 0, 0.0, 0.0) for key, ticket, *_ in pending if ticket]
                    if not isinstance(e, Exception):
                        raise
                    continue
                self.up()
                failed = [a for a in answers[len(counts):len(counts) + len(renew)] if isinstance(a, Exception)]
                if failed:
                    self.outage(failed[0], "renew")
                renewed(renewals, not failed)
                del answers[len(counts):len(counts) + len(renew)]
                self.dispatch(counts, asks, answers)
        finally:
            self._sending = False

    def dispatch(self, counts: list[tuple], asks: list[tuple], answers: list) -> None:
        unseeded = False
        for (_, entries, _), answer in zip(counts, answers):
            if answer == 0:  # Redis lost its data: counted again after the seed (or found in the ledger)
                self._pending += entries
                unseeded = True
            elif isinstance(answer, Exception):
                self.outage(answer, "settle")
        for (key, cmd, future), answer in zip(asks, answers[len(counts):]):
            if isinstance(answer, Exception):
                if not future.done():
                    future.set_exception(answer)
            elif answer[0] == UNSEEDED:  # asked again once the ledger is loaded
                self._unseeded.append((key, cmd, future))
                unseeded = True
            elif not future.done():
                future.set_result(answer)
            elif answer[0] == "" and len(answer) > 1:  # granted to a request that is gone meanwhile
                self.release(key, answer[1])
        if unseeded and self.seeding is None:
            self.start_seeding(reload=True)

    async def round_trip(self, commands: list[bytes]) -> list:
        """Send `commands` in one write on the request path's connection, read every answer (an
        error answer is returned as its exception). Loads the scripts when Redis lacks them."""
        answers = await self._exchange(commands)
        missing = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if missing:  # a new or restarted Redis: nothing ran; load the scripts, send those again
            await self._exchange([command("SCRIPT", "LOAD", script) for script in SHA])
            for i, answer in zip(missing, await self._exchange([commands[i] for i in missing])):
                answers[i] = answer
        return answers

    async def _exchange(self, commands: list[bytes]) -> list:
        conn = self._conn
        if conn is None:
            conn = self._conn = self.redis.connection_pool.make_connection()
        reader = getattr(conn, "_reader", None)  # (redis-py's asyncio stream; None while not connected)
        if reader is not None and reader.at_eof():  # Redis closed it (a restart) while it was idle: a new one
            await conn.disconnect(nowait=True)
        answers = []
        try:
            await conn.send_packed_command(b"".join(commands), check_health=False)  # connects when needed
            for _ in commands:
                try:
                    answers.append(await conn.read_response())
                except ResponseError as e:  # an error answer: the connection stays in step
                    answers.append(e)
        except BaseException:
            await conn.disconnect(nowait=True)  # a half-read answer must not meet the next command
            raise
        return answers

    async def drain(self) -> None:
        """Wait until everything queued so far has been sent and answered (tests, close)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def background(self, coro) -> bool:
        """Run `coro` as a task this store waits for at close; False when there is no loop."""
        return self.task(coro) is not None

    def task(self, coro) -> asyncio.Task | None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (shutting down): the reservation expires by itself
            coro.close()
            return None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- stored responses' owners --------------------------------------------------------

    def note_owner(self, resource_id: str, key: str, now: float) -> asyncio.Task | None:
        """Written at once, in the background; the caller may await the task (it never raises)."""
        return self.task(self._note_owner(resource_id, key))

    async def _note_owner(self, resource_id: str, key: str) -> None:
        try:
            await self.redis.set(f"{self.prefix}owner:{resource_id}", key, ex=OWNER_TTL)
        except (RedisError, OSError) as e:
            self.outage(e, "note_owner")  # the owner then gets a 404 for it: nobody else can read it

    async def owner_of(self, resource_id: str, now: float) -> str | None:
        try:
            owner = await self.redis.get(f"{self.prefix}owner:{resource_id}")
        except (RedisError, OSError) as e:
            self.outage(e, "owner_of")
            raise StoreUnavailable(str(e)) from None
        self.up()
        return owner

    # --- seeding from the ledger: at start-up, and when Redis lost its data ----------------

    def start_seeding(self, reload: bool = False) -> None:
        self.seeding = asyncio.get_running_loop().create_task(self.seed(reload))

    def seed_spend(self, key: str, tokens: int, usd: float, when: float) -> None:
        self.seeds.append((key, "", tokens, usd, when, False))

    def seed_tokens(self, key: str, tokens: int, when: float) -> None:
        self.seeds.append((key, "", tokens, 0.0, when, True))

    def seed_owner(self, resource_id: str, key: str, when: float) -> None:
        self.owner_seeds.append((resource_id, key, when))

    def owner_commands(self, owners: list[tuple[str, str, float]], now: float) -> list[bytes]:
        """SET NX of each record still within OWNER_TTL (one written meanwhile is newer: kept)."""
        return [command("SET", f"{self.prefix}owner:{resource_id}", key, "NX", "EX", math.ceil(when + OWNER_TTL - now))
                for resource_id, key, when in owners
                if when + OWNER_TTL - now >= 1 and resource_id.isascii() and key.isascii()]

    async def seed(self, reload: bool = False) -> None:
        """Load the ledger's spend into Redis if it has no marker (new, or restarted without its
        data): one gateway takes a lock and loads, the others wait for its marker. Nothing is
        sent meanwhile: admissions wait, counts are kept (those the reloaded ledger holds are
        dropped, the rest sent after). `reload`: mid-run, read the ledger again."""
        seeds, self.seeds = self.seeds, []
        owners, self.owner_seeds = self.owner_seeds, []
        if not reload:  # the hours Redis surely still keeps (it drops those a year old)
            self.spend_since = (int(time.time() // BUCKET) - RETENTION_HOURS + 2) * BUCKET
            self.ledger_spend = spend_of(seeds, self.spend_since)
        lock = self.prefix + "seeding"
        failed: Exception | None = None
        first_look = True
        try:  # on the request path's connection (nothing else is sent on it meanwhile)
            while not (await self.round_trip([command("EXISTS", self.marker)]))[0]:
                first_look = False
                if (await self.round_trip([command("SET", lock, "1", "NX", "EX", SEED_LOCK_S)]))[0] is None:
                    await asyncio.sleep(0.05)  # another gateway is loading
                    continue
                if reload and self.reload_seeds is not None:
                    seeds = await self.reload_seeds(self.counted_in_ledger)
                if reload and self.reload_owners is not None:
                    owners = await self.reload_owners()
                counts = [c for _, _, c in self.count_commands(seeds, seeding=True)] + self.owner_commands(
                    owners, time.time()
                )
                for start in range(0, len(counts), SEED_BATCH):
                    for answer in await self.round_trip(counts[start:start + SEED_BATCH]):
                        if isinstance(answer, Exception):
                            raise answer
                await self.round_trip([command("SET", self.marker, "1"), command("DEL", lock)])
                log.info(
                    "gateway: Redis %s was empty: %d ledger buckets and %d stored responses' owners loaded into it",
                    masked_url(self.url),
                    len(seeds),
                    len(owners),
                )
            if not reload:
                self.found_seeded = first_look
        except (RedisError, OSError) as e:
            failed = e
            self.outage(e, "seed")
        except Exception:  # a ledger that cannot be read: fail closed, the next admission tries again
            log.exception("gateway: could not load the usage ledger into Redis")
            failed = RedisConnectionError("the usage ledger could not be loaded into Redis")
            with contextlib.suppress(RedisError, OSError):
                await self.round_trip([command("DEL", lock)])
        finally:
            self.seeding = None
            waiting, self._unseeded = self._unseeded, []
            for ask in waiting:  # admissions that found Redis empty: asked again, or 503 store_unavailable
                if failed is None:
                    self._asks.append(ask)
                elif not ask[2].done():
                    ask[2].set_exception(failed)
            self.kick()

    async def spend_by_key(self, since: float) -> dict[str, tuple[int, float]]:
        """Per key, the tokens and dollars of the spend buckets Redis holds from `since` on (a
        scan of every key's spend hash: for a start-up check, not the request path)."""
        first_hour = int(since // BUCKET)
        suffix = ":spend"
        found = {}
        async for name in self.redis.scan_iter(match=self.prefix + "*" + suffix, count=1000):
            key = name[len(self.prefix):-len(suffix)]
            if ":" in key:  # (not a key's spend hash)
                continue
            tokens, usd = 0, 0.0
            for field, value in (await self.redis.hgetall(name)).items():
                if field[1:].isdigit() and int(field[1:]) >= first_hour:
                    if field[0] == "h":
                        tokens += int(value)
                    elif field[0] == "u":
                        usd += float(value)
            if tokens or usd:
                found[key] = (tokens, usd)
        return found

    def counted_in_ledger(self) -> None:
        """Every count queued so far is in the ledger the seed is about to read: drop them."""
        self._pending = []

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
                    await self._cool(
                        keys=[self.prefix + "cooldowns"], args=[target_id, repr(until), repr(now)], client=pipe
                    )
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
        if self.on_error is not None:
            self.on_error(operation)
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
        if self._conn is not None:
            await self._conn.disconnect()
        await self.redis.aclose()
