"""MemoryStore: the UsageStore of one gateway process, kept in its memory.

What it keeps and with which semantics (admission, reservations as leases, holds whose usage
comes later, the windows) is policy/store.py's docstring; RedisStore (policy/redis_store.py)
keeps the same in Redis. Also here: a key's spend buckets (`_KeySpend`) and the small pure
helpers only this store uses.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Callable

from addon.policy.cooldowns import CooldownTable
from addon.policy.store import (
    ADMITTED, BUCKET, BUDGET_TOKENS, BUDGET_USD, MINUTE, OWNER_TTL, OWNERS_PER_KEY, PARALLEL, PARALLEL_RETRY,
    RESERVATION_LEASE, RETENTION_HOURS, RPM, TPM, Demand, Due, Limits, Spend, Verdict,
)
from addon.wire.tokens import Price, Usage, cost


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
