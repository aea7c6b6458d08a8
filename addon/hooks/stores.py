"""Which UsageStore the gateway's parts share: options `redis_url` and `redis_prefix`.

Without `redis_url` (the default) the store is the in-process MemoryStore: one gateway. With
it, RedisStore (policy/redis_store.py): every gateway with the same Redis and prefix enforces a
key's limits as one. The chosen store goes into the holder every part reads it from
(hooks/live.py: the Gateway's admission, the usage accounting, owners, metrics), while the
options are configured, before any request; it cannot change while the gateway runs. Option
`reservation_lease`: how long a reservation is held without its holder renewing it
(`renew_leases`, run here while the gateway runs).

Budgets count the spend in the store: with Redis, Redis's, which outlives the gateways (a
fleet's own redis-server keeps it in .fleet/redis across restarts); the ledger only fills an
empty Redis. At start (option `spend_check`), a gateway that finds Redis holding spend already
compares it with the ledger's, key by key, and says in one line when they disagree (an empty or
new ledger with old spend in Redis, or the other way round), which one budgets follow, and how
to start over. A fleet's supervisor leaves the check to its first worker: one line per fleet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from mitmproxy import ctx, exceptions

from addon.policy.store import RESERVATION_LEASE, renew_leases, spend_disagreement
from addon.hooks.metrics import count_store_error
from addon.wire.secreturl import masked_url, resolve
from addon.hooks.timeouts import seconds_option

log = logging.getLogger("gateway")

_PREFIX = re.compile(r"[A-Za-z0-9_:.\-{}]{1,64}")
MIN_LEASE = 1.0  # seconds: a shorter lease could pass between two renewals on a busy machine


class StoreChoice:
    def __init__(self, live, accounting=None) -> None:
        self.live = live  # its `store` (hooks/live.py), which every part that uses one reads
        self.accounting = accounting  # its ledger, named when Redis's spend and the ledger's disagree
        self.chosen: tuple[str, str] | None = None  # (url, prefix) once configured
        self.renewing: asyncio.Task | None = None  # renew_leases, while the gateway runs
        self.checking: asyncio.Task | None = None  # check_spend, at start

    def load(self, loader) -> None:
        loader.add_option(
            "redis_url", str, "",
            "Redis shared by several gateways for rate limits, budgets and max_parallel "
            "(redis://[:password@]host:port/db, rediss://, unix://). Empty: this process's memory. "
            "env:NAME: the environment variable NAME holds it (run.sh: env:REDIS_URL; a password "
            "stays out of argv and this view).",
        )
        loader.add_option(
            "redis_prefix", str, "llmgw:",
            "Prefix of every Redis key the gateway writes: gateways that share a prefix share limits.",
        )
        loader.add_option(
            "reservation_lease", str, f"{RESERVATION_LEASE:g}",
            "Seconds a request's reservation (budget, tpm, max_parallel slot) is held unless the gateway "
            "holding it renews it (every third of this, while the request runs): a killed worker's are "
            "free after it. Gateways sharing a Redis should use the same value.",
        )
        loader.add_option(
            "spend_check", bool, True,
            "At start, with redis_url: compare the spend Redis holds with the usage ledger's and say "
            "in one line when they disagree (budgets count Redis's).",
        )

    def configure(self, updated) -> None:
        lease = None
        if "reservation_lease" in updated:
            lease = seconds_option("reservation_lease")
            if lease < MIN_LEASE:
                raise exceptions.OptionsError(
                    f"reservation_lease must be at least {MIN_LEASE:g} seconds, not {lease:g}"
                )
        if "redis_url" in updated or "redis_prefix" in updated:
            self.choose()
        if lease is not None:
            self.live.store.lease = lease

    def choose(self) -> None:
        url, prefix = ctx.options.redis_url, ctx.options.redis_prefix
        if self.chosen is not None:
            if (url, prefix) != self.chosen:
                raise exceptions.OptionsError("redis_url and redis_prefix cannot change while the gateway runs")
            return
        if not _PREFIX.fullmatch(prefix):
            raise exceptions.OptionsError(f"redis_prefix {prefix!r}: 1 to 64 letters, digits or _:.-{{}}")
        try:
            resolved = resolve("redis_url", url)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        if resolved:
            # imported only here: the redis package's modules would otherwise sit in every
            # gateway's heap, and the garbage collector walks them (measured: +1.6% instructions
            # per request with bench/instructions.py)
            from addon.policy.redis_store import RedisStore, check_url

            try:
                check_url(resolved)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            store = RedisStore(resolved, prefix, on_error=count_store_error)
            self.live.store = store
            log.info("gateway: limits, budgets and max_parallel shared in Redis %s (prefix %s)", masked_url(resolved),
                     prefix)
        self.chosen = (url, prefix)

    def running(self) -> None:
        store = self.live.store
        if hasattr(store, "start_seeding"):  # RedisStore
            store.start_seeding()
            store.start_cooldown_sync()
        if hasattr(store, "renew") and self.renewing is None:
            self.renewing = asyncio.get_running_loop().create_task(renew_leases(store))
        if hasattr(store, "spend_by_key") and ctx.options.spend_check and self.checking is None:
            self.checking = asyncio.get_running_loop().create_task(self.check_spend(store))

    async def check_spend(self, store) -> None:
        """Once Redis is seeded: if it held spend before this gateway came (the ledger was not
        loaded into it), one line when its spend and the ledger's disagree."""
        try:
            if store.seeding is not None:
                await store.seeding
            if not store.found_seeded:  # Redis was empty (the ledger was loaded), or unreachable
                return
            found = spend_disagreement(await store.spend_by_key(store.spend_since), store.ledger_spend)
        except Exception as e:  # RedisError, OSError: the outage is logged by the store
            log.debug("gateway: spend check skipped: %s", e)
            return
        if found is not None:
            ledger = getattr(self.accounting, "ledger", None)
            ledger_path = ledger and masked_url(ledger.path)
            log.warning("%s", disagreement(masked_url(store.url), store.prefix, ledger_path, *found))

    def done(self):
        """RedisStore: its close (what is queued is sent first), for the chain (addon/hooks/chain.py)
        to run after every part's `done`: the accounting's counts what ended last then."""
        for task in (self.renewing, self.checking):
            if task is not None:
                task.cancel()
        self.renewing = self.checking = None
        store = self.live.store
        if hasattr(store, "close"):  # RedisStore
            return store.close()
        return None


def disagreement(url: str, prefix: str, ledger: str | None, keys: list[str], redis: tuple[int, float],
                 in_ledger: tuple[int, float]) -> str:
    """The start-up line when Redis's spend and the ledger's differ (over `keys`)."""
    def spend(side: tuple[int, float]) -> str:
        return f"${side[1]:.4f} ({side[0]:,} tokens)"
    n = f"{len(keys)} key{'' if len(keys) == 1 else 's'}"
    fleet_redis = os.path.join(os.environ.get("FLEET_DIR") or ".fleet", "redis")
    start_over = (f"To start over, stop the gateways, delete Redis's {prefix}* keys (a fleet's own Redis: "
                  f"remove {fleet_redis}) and start them again")
    if ledger is None:
        return (
            f"gateway: Redis {url} holds the spend of {n} from earlier runs, {spend(redis)}, and no usage ledger is "
            f"kept (USAGE_DB empty): budgets count Redis's. {start_over}: budgets then start from zero."
        )
    return (
        f"gateway: Redis {url} and the usage ledger {ledger} disagree on the spend of {n}: Redis has {spend(redis)}, "
        f"the ledger {spend(in_ledger)}. Budgets count Redis's, the live spend every gateway on it shares (a ledger "
        f"only fills an empty Redis). {start_over}: Redis is then filled from the ledger."
    )
