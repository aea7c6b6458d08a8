"""Rate limits, budgets and requests in flight per virtual key, behind one small interface: this
module is that interface (`UsageStore`), the records and constants every store and its callers
share, the semantics every store keeps (below), and the background renewal of leases.

`UsageStore` is all the policy code knows. `MemoryStore` (policy/memory_store.py) keeps
everything in this process (one gateway); `RedisStore` (policy/redis_store.py) keeps it in Redis,
shared by any number of gateways, with the same semantics. Keys are identified by fingerprint,
never by the virtual key itself. Times are unix seconds, passed in so rules are testable.

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
import logging
import math
import time
from collections.abc import Awaitable
from typing import NamedTuple, Protocol

from addon.wire.tokens import Usage

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
    # target cooldowns (policy/targets.py): sync and local, policy/cooldowns.py
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
