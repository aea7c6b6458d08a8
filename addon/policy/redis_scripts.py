"""What RedisStore keeps in Redis and the Lua scripts that change it: the layout of its keys,
the scripts (each runs alone in Redis, so a check and its write are one step), and the RESP
packing of the commands it sends on the request path.

Per key fingerprint (never the virtual key), under `<prefix><fingerprint>:`:

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
(`charge_due`): a hold whose gateway is gone is charged by another; `<prefix>cooldowns`, target
id -> until (policy/redis_cooldowns.py); `<prefix>seeded`, the marker of a Redis that holds the
ledger's spend, and `<prefix>seeding`, the lock of the gateway loading it (policy/redis_seed.py).
Every key has a TTL (rpm and tpm a minute, held the reservation lease, spend the longest budget
period) so nothing grows without bound, and a key that is never used again disappears.
"""

from __future__ import annotations

import hashlib

from addon.policy.store import BUCKET, RETENTION_HOURS

SPEND_TTL = (RETENTION_HOURS + 1) * BUCKET  # seconds: the longest budget period, and an hour
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


def command(*args) -> bytes:
    """One Redis command in the protocol (RESP), packed here: redis-py's pack_command costs the
    gateway about 1 us of CPU per argument, and an admission has 21."""
    return (f"*{len(args)}\r\n" + arguments(args)).encode()


def arguments(args) -> str:
    """Bulk strings of str() of each argument. Only for ASCII (keys: the prefix is checked, the
    rest are hex digits, numbers and our ids), where a character is a byte."""
    return "".join([f"${len(a)}\r\n{a}\r\n" for a in map(str, args)])
