"""Which UsageStore the gateway's parts share: options `redis_url` and `redis_prefix`.

Without `redis_url` (the default) the store is the in-process MemoryStore: one gateway. With
it, RedisStore (policy/redis_store.py): every gateway with the same Redis and prefix enforces a
key's limits as one. The chosen store is handed to each part that uses one (the Gateway's
admission, the usage accounting); it cannot change while the gateway runs. Option
`reservation_lease`: how long a reservation is held without its holder renewing it
(`renew_leases`, run here while the gateway runs).
"""

from __future__ import annotations

import asyncio
import logging
import re

from mitmproxy import ctx, exceptions

from addon.policy.store import RESERVATION_LEASE, renew_leases
from addon.hooks.metrics import count_store_error
from addon.wire.secreturl import masked_url, resolve
from addon.hooks.timeouts import seconds_option

log = logging.getLogger("gateway")

_PREFIX = re.compile(r"[A-Za-z0-9_:.\-{}]{1,64}")
MIN_LEASE = 1.0  # seconds: a shorter lease could pass between two renewals on a busy machine


class StoreChoice:
    def __init__(self, *users) -> None:
        self.users = users  # objects with a `store` attribute
        self.chosen: tuple[str, str] | None = None  # (url, prefix) once configured
        self.renewing: asyncio.Task | None = None  # renew_leases, while the gateway runs

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

    def configure(self, updated) -> None:
        lease = None
        if "reservation_lease" in updated:
            lease = seconds_option("reservation_lease")
            if lease < MIN_LEASE:
                raise exceptions.OptionsError(f"reservation_lease must be at least {MIN_LEASE:g} seconds, not {lease:g}")
        if "redis_url" in updated or "redis_prefix" in updated:
            self.choose()
        if lease is not None:
            for user in self.users:
                user.store.lease = lease

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
            for user in self.users:
                user.store = store
            log.info("gateway: limits, budgets and max_parallel shared in Redis %s (prefix %s)", masked_url(resolved), prefix)
        self.chosen = (url, prefix)

    def running(self) -> None:
        store = self.users[0].store if self.users else None
        if hasattr(store, "start_seeding"):  # RedisStore
            store.start_seeding()
            store.start_cooldown_sync()
        if hasattr(store, "renew") and self.renewing is None:
            self.renewing = asyncio.get_running_loop().create_task(renew_leases(store))

    def done(self):
        """RedisStore: its close (what is queued is sent first), for the chain (addon/hooks/chain.py)
        to run after every part's `done`: the accounting's counts what ended last then."""
        if self.renewing is not None:
            self.renewing.cancel()
            self.renewing = None
        store = self.users[0].store if self.users else None
        if hasattr(store, "close"):  # RedisStore
            return store.close()
        return None
