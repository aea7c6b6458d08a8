"""Rate limits, budgets and requests in flight per virtual key, behind one small interface.

`UsageStore` is all the policy code knows. `MemoryStore` keeps everything in this process (one
gateway); `RedisStore` (policy/redis_store.py) keeps it in Redis, shared by any number of
gateways, with the same semantics. Keys are identified by fingerprint, never by the virtual key
itself. Times are unix seconds, passed in so rules are testable.

Admission is one call, `reserve()`, that checks every limit of a key and, when they all fit,
counts the request and reserves its worst case, atomically (for Redis: one Lua script, one
round trip). A store that answers at once (MemoryStore) returns the `Verdict`; one that does
I/O returns an awaitable of it, and the gateway's hook then becomes async for that request
only: the single-process path does not pay for an await. `settle()` and `release()` end a
reservation; they never make the caller wait (a remote store sends them in the background).

Reservations (the budget rule). At admission the request's worst case (prompt estimate plus
max_tokens or the provider default, priced with the key's prices) is held against
budget_tokens / budget_usd and tpm together with everything already spent and everything
other requests hold. It fits or the request is refused; so requests running at the same time
can never together overshoot a budget. When the response ends the reservation is replaced by
the real usage (`settle`); a request that produced nothing frees it (`release`). A reservation
is a lease: held for RESERVATION_LEASE seconds, and renewed by its holder every third of that
for as long as the request runs (`renew`, called by `renew_leases` in the background: a stream
of hours keeps its reservation); one whose holder stopped renewing (a worker killed
mid-request, a pod evicted) is free after the lease. The cost: near
the end of a budget a request is refused that would have fit, had it used less than its worst
case. tpm is checked the same way, except that a request alone in an empty window is always
admitted (a key's tpm may be smaller than one request's worst case).

Holds whose usage comes later (`defer`). A Responses create with `background: true` answers
`queued` with no usage; the usage shows on a later GET, stream or cancel of that response. Its
reservation then becomes a hold on the response's id: no max_parallel slot (the request has ended),
still its worst case against budgets and tpm, not renewed, held until a fixed time (`until`, which
a poll that shows the response still running moves on: `extend`). `settle_deferred` replaces it by
the usage the first answer showing it carries (once, whichever gateway sees it); one nobody
settles is charged its worst case when it is due (`charge_due`, swept by the usage accounting,
which writes its ledger row). Never free.

Windows:
- rpm: sliding window log over the last 60 s (exact: every admitted request's time is kept).
- tpm: sliding window over the last 60 s of tokens *recorded* (a request's tokens count when its
  response ends), plus the tokens reserved by requests in flight.
- spend: hourly buckets; a budget period covers every bucket that overlaps the last N hours, so
  the window errs on the side of counting a little more than N hours, never less. Buckets older
  than the longest allowed period are dropped; lifetime totals are kept apart.
- max_parallel: the key's live reservations (each admitted request of such a key holds one).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

from addon.wire.tokens import Price, Usage, cost

log = logging.getLogger("gateway")

MINUTE = 60.0
BUCKET = 3600  # seconds per spend bucket
MAX_BUDGET_PERIOD = 366 * 86400  # the longest budget_period the keys file accepts
RETENTION_HOURS = MAX_BUDGET_PERIOD // BUCKET + 1  # spend buckets kept per key


RESERVATION_LEASE = (
    60.0  # seconds a reservation is held unless its holder renews it (a killed worker's are free after it)
)
RENEW_EVERY = 1 / 3  # of the lease: how often a holder renews its live reservations
RENEW_RETRY = 1.0  # seconds between renewals while the store does not answer (a Redis outage)
OWNER_TTL = 30 * 86400  # seconds a stored response's owner is kept (OpenAI keeps the response 30 days)
# stored responses whose owner MemoryStore keeps per creating key (its oldest go first; option
# owners_per_key): one key's creates never push another key's records out
OWNERS_PER_KEY = 100_000
PARALLEL_RETRY = 1.0  # Retry-After for a key at its max_parallel: slots free as responses end


class Spend(NamedTuple):
    tokens: int
    usd: float


class Limits(NamedTuple):
    """What a key's policy asks the store to enforce (None: no limit of that kind)."""

    rpm: int | None = None
    tpm: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: int | None = None  # seconds; None = lifetime
    max_parallel: int | None = None

    @property
    def reserves(self) -> bool:
        """Whether an admitted request holds a reservation (and so must be settled or released)."""
        return (self.tpm is not None or self.budget_tokens is not None or self.budget_usd is not None
                or self.max_parallel is not None)


class Demand(NamedTuple):
    """A request's worst case: the most tokens and dollars it can use; what it is made of is kept
    for the refusal's words (the stores read only tokens and usd)."""

    tokens: int = 0
    usd: float = 0.0
    hold: object = None  # what it is made of (policy/worstcase.py Hold), for a refusal's message


NO_DEMAND = Demand()

# why a reservation did not fit (Verdict.refused)
BUDGET_TOKENS, BUDGET_USD, TPM, PARALLEL, RPM = "budget_tokens", "budget_usd", "tpm", "max_parallel", "rpm"


class Verdict(NamedTuple):
    """The store's answer to reserve(): admitted (refused is None) with a ticket when it holds a
    reservation, or refused: which limit, seconds until a retry may fit, and how much of that
    limit was used or held (for the message)."""

    ticket: str | None = None
    refused: str | None = None
    wait: float = 0.0
    used: float = 0


ADMITTED = Verdict()


class Due(NamedTuple):
    """A deferred hold charged its worst case (charge_due): what the ledger row needs."""

    key: str
    resource_id: str
    tokens: int
    usd: float
    when: float  # when it fell due
    meta: str  # what defer() was given (the accounting's JSON)


class StoreUnavailable(Exception):
    """The store could not be asked (Redis down): a limited key's request is not forwarded."""


class UsageStore(Protocol):
    # target cooldowns (policy/targets.py): sync and local, CooldownTable below
    def cooldown_until(self, target_id: str) -> float: ...
    def cool_down(self, target_id: str, until: float, now: float | None = None) -> bool: ...
    def forget_cooldown(self, target_id: str) -> None: ...

    def reserve(self, key: str, limits: Limits, demand: Demand, now: float) -> Verdict | Awaitable[Verdict]:
        """Check every limit and, if all fit, count the request (rpm) and hold `demand` and a
        parallel slot (when limits.reserves), atomically. Raises (or the awaitable raises)
        StoreUnavailable when the store cannot be asked."""

    def peek(self, key: str, limits: Limits, pending: int, now: float) -> Verdict:
        """At a request's headers, before its body is read: the refusal reserve() would give
        whatever the body (rpm or max_parallel full, counting `pending`: this process's requests
        of the key whose bodies are being read; a budget or tpm already used up), else ADMITTED.
        Counts and holds nothing; sync and local (RedisStore: what it last heard)."""

    def settle(self, key: str, ticket: str, tokens: int, usd: float, when: float) -> None:
        """Replace a reservation by the real usage. Never waits."""

    def release(self, key: str, ticket: str) -> None:
        """Drop a reservation that used nothing (the provider failed before any output). Never waits."""

    lease: float  # seconds a reservation is held without a renewal (RESERVATION_LEASE)

    def renew(self, now: float) -> bool | Awaitable[bool]:
        """Extend every reservation this process holds (reserved, not yet settled or released) to
        `now` + lease; False when the store could not be asked (renew again soon)."""

    def add_usage(self, key: str, tokens: int, usd: float, when: float) -> None:
        """Count a finished request that held no reservation (kept in step with the usage ledger)."""

    # holds whose usage comes later (the module's docstring)
    def defer(
        self, key: str, ticket: str | None, resource_id: str, tokens: int, usd: float, until: float, meta: str
    ) -> None:
        """Turn the reservation `ticket` (None: none, a key without limits) into a hold of
        `tokens` and `usd` on `resource_id`, due at `until`; `meta` comes back with it. Never waits."""

    def extend(self, key: str, resource_id: str, until: float) -> None:
        """Move a hold's due time on to `until` (never back). Never waits."""

    def settle_deferred(
        self, key: str, resource_id: str, usage: Usage, when: float
    ) -> tuple[str, float] | None | Awaitable:
        """Replace the hold on `resource_id` by `usage` (priced with the price in its meta's
        "price") and return (meta, usd), once: None when there is no such hold (never made,
        settled or charged already)."""

    def charge_due(self, now: float) -> list[Due] | Awaitable[list[Due]]:
        """Charge every hold due by `now` its worst case, and return them."""

    def spend(self, key: str, period: int | None, now: float) -> Spend | Awaitable[Spend]:
        """Tokens and dollars spent in the last `period` seconds (None: ever): for metrics."""

    def seed_spend(self, key: str, tokens: int, usd: float, when: float) -> None:
        """Spend only (not the tpm window): how past ledger rows are loaded at start-up."""

    def seed_tokens(self, key: str, tokens: int, when: float) -> None:
        """The tpm window only: the last minute's ledger rows, loaded at start-up in time order."""

    # stored responses' owners (policy/owners.py)
    def note_owner(self, resource_id: str, key: str, now: float) -> Awaitable[None] | None:
        """Record that `key` created the stored object `resource_id` (kept OWNER_TTL). Never
        fails the caller; RedisStore returns the write, which the caller may wait for. `key` is
        the record (policy/owners.record): "<fingerprint>" or "<fingerprint>/<target id>"."""

    def seed_owner(self, resource_id: str, key: str, when: float) -> None:
        """A record read back from the usage ledger at start-up (made at `when`, oldest first)."""

    def owner_of(self, resource_id: str, now: float) -> str | None | Awaitable[str | None]:
        """The key that created `resource_id`, None when not known (never recorded, expired,
        dropped). Raises (or the awaitable raises) StoreUnavailable when the store cannot be asked."""


class _KeySpend:
    """A key's spend: lifetime totals, and hourly buckets for rolling budget periods."""

    __slots__ = ("buckets", "tokens", "usd", "window")

    def __init__(self) -> None:
        self.buckets: dict[int, list] = {}  # hour number -> [tokens, usd], in arrival order
        self.tokens = 0  # lifetime
        self.usd = 0.0
        # the last rolling-period answer [period, first hour, tokens, usd], kept current by add():
        # a budget check is then O(1), not a walk over a year of buckets
        self.window: list | None = None

    def add(self, tokens: int, usd: float, when: float) -> None:
        hour = int(when // BUCKET)
        bucket = self.buckets.get(hour)
        if bucket is None:
            bucket = self.buckets[hour] = [0, 0.0]
            self._prune(hour - RETENTION_HOURS)
        bucket[0] += tokens
        bucket[1] += usd
        self.tokens += tokens
        self.usd += usd
        window = self.window
        if window is not None and hour >= window[1]:
            window[2] += tokens
            window[3] += usd

    def in_period(self, period: int, now: float) -> Spend:
        first = int((now - period) // BUCKET)
        window = self.window
        if window is None or window[0] != period or window[1] != first:  # at most hourly
            tokens, usd = 0, 0.0
            for hour, (t, u) in self.buckets.items():
                if hour >= first:
                    tokens += t
                    usd += u
            self.window = window = [period, first, tokens, usd]
        return Spend(window[2], window[3])

    def _prune(self, before: int) -> None:
        """Drop buckets older than any budget period can reach (oldest first: arrival order is
        time order, start-up seeding included)."""
        buckets = self.buckets
        while buckets:
            oldest = next(iter(buckets))
            if oldest >= before:
                return
            del buckets[oldest]


COOLDOWNS_SWEEP = 1024  # entries in a cooldown table before a new one first drops those long over


class CooldownTable:
    """Target cooldowns: target id (or "<target id>:<model>", policy/targets.py) -> until (unix
    seconds), read on the request path without I/O. Both stores have it; RedisStore also shares
    it with the other gateways in the background. An entry a pick finds over is forgotten; those
    no pick looks at again (a model nobody asks for any more) are dropped when the table grows."""

    def __init__(self) -> None:
        self.cooldowns: dict[str, float] = {}
        self._sweep_at = COOLDOWNS_SWEEP

    def cooldown_until(self, target_id: str) -> float:
        """When the target's cooldown ends; 0.0 when it has none (an ended one stays until forgotten)."""
        return self.cooldowns.get(target_id, 0.0)

    def cool_down(self, target_id: str, until: float, now: float | None = None) -> bool:
        """Extend the target's cooldown to `until` (a later one is kept). True when it was not
        cooling before: the caller logs only then."""
        cooldowns = self.cooldowns
        current = cooldowns.get(target_id, 0.0)
        now = time.time() if now is None else now
        if until > current:
            if not current and len(cooldowns) >= self._sweep_at:
                for name in [n for n, end in cooldowns.items() if end <= now]:
                    del cooldowns[name]
                self._sweep_at = max(COOLDOWNS_SWEEP, 2 * len(cooldowns))  # amortised: each sweep doubles the next
            cooldowns[target_id] = until
        return current <= now

    def forget_cooldown(self, target_id: str) -> None:
        self.cooldowns.pop(target_id, None)


class MemoryStore(CooldownTable):
    """The single-process store. Not thread-safe: used from mitmproxy's event loop only, where
    a check-and-count in one call cannot interleave with another request's."""

    def __init__(self, lease: float = RESERVATION_LEASE) -> None:
        super().__init__()
        self.lease = lease
        # called before usage is read (tpm, spend): the accounting counts the flows it has
        # noted but not yet counted (accounting.py says why it defers)
        self.before_read: Callable[[], None] | None = None
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._token_sums: dict[str, int] = {}
        self._spend: dict[str, _KeySpend] = {}
        # key -> ticket -> [tokens, usd, expires]: requests in flight that hold a reservation
        self._held: dict[str, dict[str, list]] = {}
        self._tickets = itertools.count(1)
        # key -> resource id -> [tokens, usd, until, meta]: holds whose usage comes later (defer)
        self._deferred: dict[str, dict[str, list]] = {}
        self._owners: dict[str, tuple[str, float]] = {}  # resource id -> (record, expires)
        self._owned: dict[str, dict[str, None]] = {}  # creating key's fingerprint -> its resource ids, oldest first
        self.owners_per_key = OWNERS_PER_KEY

    # --- admission ---------------------------------------------------------------------

    def reserve(self, key: str, limits: Limits, demand: Demand, now: float) -> Verdict:
        held = self._live(key, now)
        held_tokens = held_usd = 0
        for tokens, usd, _ in held.values():
            held_tokens += tokens
            held_usd += usd
        deferred = self._deferred.get(key)
        if deferred:
            for tokens, usd, _, _ in deferred.values():
                held_tokens += tokens
                held_usd += usd
        if limits.budget_tokens is not None or limits.budget_usd is not None:
            spent = self.spend(key, limits.budget_period, now)
            if limits.budget_tokens is not None and not fits(
                spent.tokens + held_tokens, demand.tokens, limits.budget_tokens
            ):
                return Verdict(None, BUDGET_TOKENS, 0.0, spent.tokens + held_tokens)
            if limits.budget_usd is not None and not fits(spent.usd + held_usd, demand.usd, limits.budget_usd):
                return Verdict(None, BUDGET_USD, 0.0, spent.usd + held_usd)
        if limits.tpm is not None:
            wait = self.tokens_wait(key, limits.tpm, now, held_tokens + demand.tokens, bool(held) or bool(deferred))
            if wait is not None:
                return Verdict(None, TPM, wait, self._token_sums.get(key, 0) + held_tokens)
        if limits.max_parallel is not None and len(held) >= limits.max_parallel:
            return Verdict(None, PARALLEL, PARALLEL_RETRY, len(held))
        if limits.rpm is not None:
            wait = self.take_request(key, limits.rpm, now)
            if wait is not None:
                return Verdict(None, RPM, wait, limits.rpm)
        if not limits.reserves:
            return ADMITTED
        ticket = str(next(self._tickets))
        if not held:
            self._held[key] = held
        held[ticket] = [demand.tokens, demand.usd, now + self.lease]
        return Verdict(ticket)

    def peek(self, key: str, limits: Limits, pending: int, now: float) -> Verdict:
        held = self._live(key, now)
        if limits.budget_tokens is not None or limits.budget_usd is not None:
            held_tokens = held_usd = 0
            for tokens, usd, _ in held.values():
                held_tokens += tokens
                held_usd += usd
            spent = self.spend(key, limits.budget_period, now)
            if limits.budget_tokens is not None and not fits(spent.tokens + held_tokens, 0, limits.budget_tokens):
                return Verdict(None, BUDGET_TOKENS, 0.0, spent.tokens + held_tokens)
            if limits.budget_usd is not None and not fits(spent.usd + held_usd, 0, limits.budget_usd):
                return Verdict(None, BUDGET_USD, 0.0, spent.usd + held_usd)
        if limits.tpm is not None:
            if self.before_read is not None:
                self.before_read()
            used = self._expire_tokens(key, now)
            if used >= limits.tpm:  # nothing fits until some of the window's tokens leave it
                return Verdict(None, TPM, self.tokens_wait(key, limits.tpm, now, 1, bool(held)) or PARALLEL_RETRY, used)
        if limits.max_parallel is not None and len(held) + pending >= limits.max_parallel:
            return Verdict(None, PARALLEL, PARALLEL_RETRY, len(held) + pending)
        if limits.rpm is not None:
            times = self._requests.get(key)
            while times and times[0] <= now - MINUTE:
                times.popleft()
            counted = len(times) if times else 0
            if counted + pending >= limits.rpm:
                # the window full: until its oldest request that must leave has; else the bodies
                # being read fill it, and are admitted (or not) within moments
                wait = times[counted - limits.rpm] + MINUTE - now if counted >= limits.rpm else PARALLEL_RETRY
                return Verdict(None, RPM, min(MINUTE, max(wait, 0.0)), limits.rpm)
        return ADMITTED

    def settle(self, key: str, ticket: str, tokens: int, usd: float, when: float) -> None:
        self.release(key, ticket)
        self.add_usage(key, tokens, usd, when)

    def release(self, key: str, ticket: str) -> None:
        held = self._held.get(key)
        if held is not None and held.pop(ticket, None) is not None and not held:
            del self._held[key]

    def defer(
        self, key: str, ticket: str | None, resource_id: str, tokens: int, usd: float, until: float, meta: str
    ) -> None:
        if ticket is not None:
            self.release(key, ticket)
        self._deferred.setdefault(key, {})[resource_id] = [tokens, usd, until, meta]

    def extend(self, key: str, resource_id: str, until: float) -> None:
        hold = self._deferred.get(key, {}).get(resource_id)
        if hold is not None and until > hold[2]:
            hold[2] = until

    def settle_deferred(self, key: str, resource_id: str, usage: Usage, when: float) -> tuple[str, float] | None:
        hold = self._take(key, resource_id)
        if hold is None:
            return None
        meta = hold[3]
        usd = cost(usage, meta_price(meta))
        self.add_usage(key, usage.total, usd, when)
        return meta, usd

    def charge_due(self, now: float, everything: bool = False) -> list[Due]:
        """`everything`: every hold, due or not (the process stops: its holds would be lost)."""
        due = [Due(key, rid, tokens, usd, min(until, now), meta) for key, holds in self._deferred.items()
               for rid, (tokens, usd, until, meta) in holds.items() if until <= now or everything]
        for hold in due:
            self._take(hold.key, hold.resource_id)
            self.add_usage(hold.key, hold.tokens, hold.usd, hold.when)
        return due

    def _take(self, key: str, resource_id: str) -> list | None:
        holds = self._deferred.get(key)
        hold = holds.pop(resource_id, None) if holds else None
        if holds is not None and not holds:
            del self._deferred[key]
        return hold

    def renew(self, now: float) -> bool:
        """In-process: every reservation held is this process's own, and is live until settled
        or released (one that a lost flow never ends would be renewed too: the accounting ends
        every flow's, however it ends)."""
        expires = now + self.lease
        for held in self._held.values():
            for reservation in held.values():
                reservation[2] = expires
        return True

    def _live(self, key: str, now: float) -> dict[str, list]:
        """The key's reservations, the expired ones dropped (not renewed: in Redis, a killed
        worker's; here, only when nothing runs renew_leases)."""
        held = self._held.get(key)
        if held is None:
            return {}
        for ticket in [t for t, (_, _, expires) in held.items() if expires <= now]:
            del held[ticket]
        return held

    # --- windows -----------------------------------------------------------------------

    def take_request(self, key: str, rpm: int, now: float) -> float | None:
        times = self._requests.setdefault(key, deque())
        while times and times[0] <= now - MINUTE:
            times.popleft()
        if len(times) >= rpm:
            return min(MINUTE, times[len(times) - rpm] + MINUTE - now)  # (a `now` taken a moment before another's)
        times.append(now)
        return None

    def tokens_wait(self, key: str, tpm: int, now: float, demand: int = 0, others: bool = False) -> float | None:
        """None when `demand` more tokens fit under `tpm` in the last minute, else seconds to wait.
        `demand` includes what other requests in flight hold (`others`: there are some); a
        request alone in an empty window always fits."""
        if self.before_read is not None:
            self.before_read()
        used = self._expire_tokens(key, now)
        if used < tpm and (used + demand <= tpm or (not used and not others)):
            return None
        # wait until enough of the oldest entries leave the window for the demand to fit
        for when, tokens in self._tokens.get(key, ()):
            used -= tokens
            if used < tpm and (used + demand <= tpm or (not used and not others)):
                return min(MINUTE, when + MINUTE - now)
        return PARALLEL_RETRY  # what others hold is in the way: they settle as responses end

    def _expire_tokens(self, key: str, now: float) -> int:
        window = self._tokens.get(key)
        if not window:
            return 0
        total = self._token_sums[key]
        while window and window[0][0] <= now - MINUTE:
            total -= window.popleft()[1]
        self._token_sums[key] = total
        return total

    def spend(self, key: str, period: int | None, now: float) -> Spend:
        if self.before_read is not None:
            self.before_read()
        spend = self._spend.get(key)
        if spend is None:
            return Spend(0, 0.0)
        if period is None:
            return Spend(spend.tokens, spend.usd)
        return spend.in_period(period, now)

    def add_usage(self, key: str, tokens: int, usd: float, when: float) -> None:
        if tokens:
            self.seed_tokens(key, tokens, when)
        self.seed_spend(key, tokens, usd, when)

    def seed_tokens(self, key: str, tokens: int, when: float) -> None:
        """The tpm window only (not spend): the last minute's ledger rows, loaded at start-up in time order."""
        # expire here too, not only in tokens_wait: a key without a tpm limit is never asked,
        # and its window would keep every request of the process's life
        self._token_sums[key] = self._expire_tokens(key, when) + tokens
        self._tokens.setdefault(key, deque()).append((when, tokens))

    def seed_spend(self, key: str, tokens: int, usd: float, when: float) -> None:
        """Spend only (not the tpm window): how past ledger rows are loaded at start-up."""
        spend = self._spend.get(key)
        if spend is None:
            spend = self._spend[key] = _KeySpend()
        spend.add(tokens, usd, when)

    # --- stored responses' owners ----------------------------------------------------------

    def note_owner(self, resource_id: str, key: str, now: float) -> None:
        """Kept per creating key: a key past owners_per_key loses its own oldest record, never
        another key's. Expired records of that key go first."""
        owners, owned = self._owners, self._owned
        previous = owners.pop(resource_id, None)
        if previous is not None:  # recorded again: the latest creator, and the newest entry
            ids = owned.get(creator(previous[0]))
            if ids is not None:
                ids.pop(resource_id, None)
        mine = owned.get(creator(key))
        if mine is None:
            mine = owned[creator(key)] = {}
        cap = self.owners_per_key
        while mine:
            oldest = next(iter(mine))
            entry = owners.get(oldest)
            if len(mine) < cap and entry is not None and entry[1] > now:
                break
            del mine[oldest]
            if entry is not None:
                del owners[oldest]
        mine[resource_id] = None
        owners[resource_id] = (key, now + OWNER_TTL)

    def seed_owner(self, resource_id: str, key: str, when: float) -> None:
        self.note_owner(resource_id, key, when)

    def owner_of(self, resource_id: str, now: float) -> str | None:
        entry = self._owners.get(resource_id)
        return entry[0] if entry is not None and entry[1] > now else None


def creator(record: str) -> str:
    """The creating key's fingerprint in an owner record ("<fingerprint>[/<target id>]",
    policy/owners.record)."""
    return record.partition("/")[0]


def meta_price(meta: str) -> Price | None:
    """The price a deferred hold's meta (the accounting's JSON) carries under "price"."""
    try:
        price = json.loads(meta).get("price")
        return Price(*price) if price else None
    except (ValueError, TypeError, AttributeError):
        return None


def fits(used: float, demand: float, limit: float) -> bool:
    """Whether a request that may use `demand` fits under `limit` with `used` spent or held:
    something must be left, and the worst case must fit in it."""
    return used < limit and used + demand <= limit


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; round up so a client that waits exactly that long gets in."""
    return str(max(1, math.ceil(seconds)))


async def renew_leases(store: UsageStore) -> None:
    """The holder's heartbeat, run in the background by the gateway (hooks/stores.py): every
    third of the lease, renew every reservation this process holds; while the store does not
    answer, every RENEW_RETRY seconds, so those that expired in an outage are held again as soon
    as it answers. Nothing on the request path."""
    while True:
        try:
            renewed = store.renew(time.time())
            if not isinstance(renewed, bool):
                renewed = await renewed
        except Exception:
            log.exception("gateway: could not renew the reservations in flight")
            renewed = False
        await asyncio.sleep(store.lease * RENEW_EVERY if renewed else RENEW_RETRY)


def spend_of(seeds: list[tuple], since: float) -> dict[str, tuple[int, float]]:
    """Per key, the tokens and dollars of seed_spend's buckets from `since` on (not the tpm
    window's seeds)."""
    out: dict[str, tuple[int, float]] = {}
    for key, _, tokens, usd, when, tpm_only in seeds:
        if not tpm_only and when >= since:
            had = out.get(key, (0, 0.0))
            out[key] = (had[0] + tokens, had[1] + usd)
    return out


def spend_disagreement(redis: dict[str, tuple[int, float]], ledger: dict[str, tuple[int, float]]
                       ) -> tuple[list[str], tuple[int, float], tuple[int, float]] | None:
    """The keys whose spend in Redis and in the ledger differ by more than 1% (what a request
    or two in flight on another gateway, or a float's rounding, make), and the totals of each
    side over those keys; None when they agree."""
    keys = sorted(key for key in redis.keys() | ledger.keys()
                  if _differ(redis.get(key, (0, 0.0)), ledger.get(key, (0, 0.0))))
    if not keys:
        return None

    def total(side):
        return sum(side.get(k, (0, 0.0))[0] for k in keys), sum(side.get(k, (0, 0.0))[1] for k in keys)
    return keys, total(redis), total(ledger)


def _differ(a: tuple[int, float], b: tuple[int, float]) -> bool:
    return (abs(a[0] - b[0]) > max(1, 0.01 * max(a[0], b[0]))
            or abs(a[1] - b[1]) > max(1e-6, 0.01 * max(a[1], b[1])))
