"""Loading the usage ledger into a Redis that holds no spend: RedisStore's seeding.

Spend lives in Redis; when Redis is empty (no `<prefix>seeded` marker: new, or restarted without
its data, at start-up or mid-run), one gateway takes the `<prefix>seeding` lock and loads the
ledger's buckets and stored responses' owners into it, the others wait for the marker, and
admissions wait for that (`seed`). Also here: what the start-up check of Redis's spend against
the ledger's reads (`ledger_spend`, `spend_by_key`; hooks/stores.py compares them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from addon.policy.redis_scripts import command
from addon.policy.store import BUCKET, OWNER_TTL, RETENTION_HOURS, spend_of
from addon.wire.secreturl import masked_url

log = logging.getLogger("gateway")

SEED_BATCH = 1000  # ledger buckets per round trip when Redis is seeded
SEED_LOCK_S = 10  # seconds one gateway may hold the seeding lock (a gateway that dies loading: another takes over)


class LedgerSeeding:
    """Part of RedisStore (policy/redis_store.py), whose request-path connection (`round_trip`),
    queues (`_asks`, `_pending`, `_unseeded`), `count_commands`, `kick` and `outage` it uses."""

    def __init__(self) -> None:
        super().__init__()
        self.seeding: asyncio.Task | None = None  # loading the ledger into an empty Redis (nothing is sent meanwhile)
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
