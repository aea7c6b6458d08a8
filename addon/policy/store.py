"""Rate-limit counters and spend per virtual key, behind a small interface.

`UsageStore` is all the policy code knows. `MemoryStore` keeps everything in this process (one
gateway); a Redis store implementing the same four methods could back several gateways
(rpm: a sorted set per key, ZREMRANGEBYSCORE + ZCARD + ZADD in one MULTI/Lua call; tpm and spend:
INCRBY on per-minute / per-hour bucket keys with an expiry). Keys are identified by fingerprint,
never by the virtual key itself. Times are unix seconds, passed in so rules are testable.

Windows:
- rpm: sliding window log over the last 60 s (exact: every admitted request's time is kept).
- tpm: sliding window over the last 60 s of tokens *recorded* (a request's tokens count when its
  response ends, so one request can take a key past its tpm; the next one is then refused).
- spend: hourly buckets; a budget period covers every bucket that overlaps the last N hours, so
  the window errs on the side of counting a little more than N hours, never less. Buckets older
  than the longest allowed period are dropped; lifetime totals are kept apart.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, Protocol

MINUTE = 60.0
BUCKET = 3600  # seconds per spend bucket
MAX_BUDGET_PERIOD = 366 * 86400  # the longest budget_period the keys file accepts
RETENTION_HOURS = MAX_BUDGET_PERIOD // BUCKET + 1  # spend buckets kept per key


class Spend(NamedTuple):
    tokens: int
    usd: float


class UsageStore(Protocol):
    def take_request(self, key: str, rpm: int, now: float) -> float | None:
        """Admit one request under `rpm` and count it; or, when full, return seconds until a slot frees."""

    def tokens_wait(self, key: str, tpm: int, now: float) -> float | None:
        """None when the key used fewer than `tpm` tokens in the last minute, else seconds to wait."""

    def spend(self, key: str, period: int | None, now: float) -> Spend:
        """Tokens and dollars recorded for the key in the last `period` seconds (None: ever)."""

    def add_usage(self, key: str, tokens: int, usd: float, when: float) -> None:
        """Count a finished request's tokens and cost (kept in step with the usage ledger)."""


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


class MemoryStore:
    """The single-process store. Not thread-safe: used from mitmproxy's event loop only, where
    a check-and-count in one call cannot interleave with another request's."""

    def __init__(self) -> None:
        # called before usage is read (tpm, spend): the accounting counts the flows it has
        # noted but not yet counted (accounting.py says why it defers)
        self.before_read: Callable[[], None] | None = None
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._token_sums: dict[str, int] = {}
        self._spend: dict[str, _KeySpend] = {}

    def take_request(self, key: str, rpm: int, now: float) -> float | None:
        times = self._requests.setdefault(key, deque())
        while times and times[0] <= now - MINUTE:
            times.popleft()
        if len(times) >= rpm:
            return times[len(times) - rpm] + MINUTE - now
        times.append(now)
        return None

    def tokens_wait(self, key: str, tpm: int, now: float) -> float | None:
        if self.before_read is not None:
            self.before_read()
        used = self._expire_tokens(key, now)
        if used < tpm:
            return None
        # wait until enough of the oldest entries leave the window to drop below tpm
        for when, tokens in self._tokens[key]:
            used -= tokens
            if used < tpm:
                return when + MINUTE - now
        return MINUTE  # unreachable: used drops to 0 < tpm

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


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; round up so a client that waits exactly that long gets in."""
    return str(max(1, math.ceil(seconds)))
