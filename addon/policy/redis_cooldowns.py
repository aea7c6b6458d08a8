"""Target cooldowns shared by every gateway on one Redis: RedisStore's cooldown table.

Target cooldowns (policy/targets.py) are read from this process's CooldownTable
(policy/cooldowns.py), never from Redis on the request path. A new cooldown is also written to
the hash `<prefix>cooldowns` (target id -> until; the later until wins, ended entries are
dropped: the COOL script) in the background, and every COOLDOWN_SYNC seconds each gateway pulls
the hash and merges the entries still running: a target one gateway found dead is skipped by all
within about half a second. Redis down: cooldowns keep working in each process; the live ones
are written again once Redis is back.
"""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import RedisError

from addon.policy.cooldowns import CooldownTable
from addon.policy.redis_scripts import COOL

COOLDOWN_SYNC = 0.5  # seconds between two pulls of the shared cooldowns
COOLDOWN_KEPT = 60.0  # seconds an ended cooldown no request looked at stays in the local table


class SharedCooldowns(CooldownTable):
    """Part of RedisStore (policy/redis_store.py), whose `redis`, `prefix`, `background`,
    `outage` and `up` it uses."""

    def __init__(self) -> None:
        super().__init__()
        self._cool = self.redis.register_script(COOL)
        self.syncing: asyncio.Task | None = None  # pulling the shared cooldowns (start_cooldown_sync)
        self.cooldowns_unshared = False  # a cooldown may be missing in Redis: write ours again once it answers

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
