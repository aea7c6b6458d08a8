"""RedisStore: the UsageStore in Redis, shared by every gateway that uses the same Redis and prefix.

Same semantics as MemoryStore (policy/store.py says what they are); only where the numbers live
differs: policy/redis_scripts.py has the layout of the keys in Redis (per key fingerprint, never
the virtual key) and the Lua scripts that change them. This module is the request path:
admission, counting, leases and the round trips that carry them; the parts off that path are
mixed in from their own modules: holds whose usage comes later (policy/redis_deferred.py),
loading the ledger into an empty Redis (policy/redis_seed.py), cooldowns shared with the other
gateways (policy/redis_cooldowns.py).

Every admission is ONE round trip: the RESERVE script checks budgets, tpm, max_parallel and rpm
and reserves, atomically (Redis runs a script alone). Settling, releasing and counting are sent
in the background (the response never waits for Redis), one COUNT script call per key and round
trip. The hot path has its own connection and sends everything that arrived meanwhile in one
write, with at most one round trip in flight (see `send`).

Reservations are leases (policy/store.py): each gateway keeps the tickets it holds (reserved,
not yet settled or released) and renews them all every third of the lease (`renew`): one RENEW
call per key, with the next round trip on the request path's connection, so a renewal never
overtakes the settle of the same ticket. A killed gateway renews nothing: its reservations and
max_parallel slots are free after the lease. A renewal writes each ticket whole (worst case and
new expiry), so one that expired while Redis was unreachable, or that Redis lost with its data,
is held again as soon as Redis answers (renewals are retried every RENEW_RETRY seconds meanwhile).

Redis unreachable: reserve() raises StoreUnavailable (the gateway answers 503 store_unavailable
for keys with limits; keys without limits never ask the store), one log line when the outage
starts and one when it ends. The client reconnects by itself on the next request; no restart.

Spend lives in Redis; when Redis is empty, one gateway loads the usage ledger into it and
admissions wait for that (policy/redis_seed.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
from collections.abc import Callable
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from addon.policy.redis_cooldowns import SharedCooldowns
from addon.policy.redis_deferred import DeferredHolds
from addon.policy.redis_scripts import COUNT, RENEW, RESERVE, SHA, SPEND_TTL, UNSEEDED, arguments, command
from addon.policy.redis_seed import LedgerSeeding
from addon.policy.store import (
    BUCKET, BUDGET_TOKENS, BUDGET_USD, OWNER_TTL, PARALLEL, PARALLEL_RETRY, RESERVATION_LEASE, RETENTION_HOURS,
    RPM, Demand, Limits, Spend, StoreUnavailable, Verdict,
)
from addon.wire.secreturl import masked_url

log = logging.getLogger("gateway")

TIMEOUT = 1.0  # seconds for a connect or a reply: a Redis that does not answer is an outage
REFUSAL_KEPT = 1.0  # seconds peek() repeats a refusal that came without a wait (a budget used up)


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


class RedisStore(LedgerSeeding, DeferredHolds, SharedCooldowns):
    """The shared store. Methods are called from mitmproxy's event loop only."""

    def __init__(self, url: str, prefix: str = "llmgw:", lease: float = RESERVATION_LEASE,
                 on_error: Callable[[str], None] | None = None) -> None:
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
        super().__init__()  # the mixed-in parts' own state (they register their scripts with self.redis)
        self.marker = prefix + "seeded"
        self._conn = None  # the request path's own connection (admissions and counts), made on first use
        # tickets and request ids unique across gateways: this process, and a counter
        self._ids = map(f"{os.getpid()}-{os.urandom(3).hex()}-{{}}".format, itertools.count(1))
        self._heads: dict[str, str] = {}  # per key: the RESERVE call up to its first argument
        self.down = False  # in an outage (logged once)
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
