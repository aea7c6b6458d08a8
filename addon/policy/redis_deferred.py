"""Holds whose usage comes later, in Redis: RedisStore's `defer`, `extend`, `settle_deferred`
and `charge_due` (the semantics are policy/store.py's), each one call of the BG script
(policy/redis_scripts.py) on the key's `bg` hash and the shared `<prefix>bgdue` set.

Sent in the background, never on the request path. A defer or extend Redis did not take (an
outage) is kept and sent again by the next `charge_due`: a hold must not be lost. Any gateway
charges a hold that fell due, the one that made it may be gone; the script answers a hold that
is gone already (settled or charged by another) with nothing, so each is counted once.
"""

from __future__ import annotations

import math
import time

from redis.exceptions import RedisError

from addon.policy.redis_scripts import BG, SPEND_TTL
from addon.policy.store import Due
from addon.wire.tokens import Usage

DUE_BATCH = 100  # deferred holds charged per sweep and round trip at most


class DeferredHolds:
    """Part of RedisStore (policy/redis_store.py), whose `redis`, `prefix`, ids (`_ids`),
    `ended`, `background` and `outage` it uses."""

    def __init__(self) -> None:
        super().__init__()
        self._bg = self.redis.register_script(BG)
        self._bg_unsent: list[
            tuple[str, list]
        ] = []  # defer / extend calls Redis did not take: sent again by charge_due

    def bg_keys(self, key: str) -> list[str]:
        base = f"{self.prefix}{key}:"
        return [base + "bg", self.prefix + "bgdue", base + "held", base + "tpm", base + "spend"]

    def defer(
        self, key: str, ticket: str | None, resource_id: str, tokens: int, usd: float, until: float, meta: str
    ) -> None:
        if ticket is not None:
            self.ended(key, ticket)  # no longer renewed: the hold has its own due time
        ttl = SPEND_TTL + math.ceil(max(0.0, until - time.time()))
        self.background(self._bg_call(key, ["defer", resource_id, f"{key} {resource_id}", ticket or "",
                                            f"{tokens} {usd!r} {until!r} {meta}", repr(until), ttl]))

    def extend(self, key: str, resource_id: str, until: float) -> None:
        ttl = SPEND_TTL + math.ceil(max(0.0, until - time.time()))
        self.background(self._bg_call(key, ["extend", resource_id, f"{key} {resource_id}", repr(until), ttl]))

    async def _bg_call(self, key: str, args: list, keep: bool = True):
        try:
            return await self._bg(keys=self.bg_keys(key), args=args)
        except (RedisError, OSError) as e:
            self.outage(e, "bg_" + args[0])
            if keep:  # a hold must not be lost to an outage: charge_due sends it again
                self._bg_unsent.append((key, args))
            return None

    async def settle_deferred(self, key: str, resource_id: str, usage: Usage, when: float) -> tuple[str, float] | None:
        """(A settle lost to an outage leaves the hold: it is charged its worst case when due.)"""
        answer = await self._bg_call(key, ["settle", resource_id, f"{key} {resource_id}", usage.prompt_tokens,
                                           usage.completion_tokens, usage.cached_tokens, repr(when), next(self._ids),
                                           SPEND_TTL], keep=False)
        return (answer[0], float(answer[1])) if answer else None

    async def charge_due(self, now: float) -> list[Due]:
        """Send the defer / extend calls an outage kept, then charge the holds due by `now`
        (any gateway's: the one that made a hold may be gone), at most DUE_BATCH per call."""
        unsent, self._bg_unsent = self._bg_unsent, []
        for key, args in unsent:
            await self._bg_call(key, args)
        if self._bg_unsent:
            return []
        try:
            members = await self.redis.zrangebyscore(self.prefix + "bgdue", "-inf", repr(now), start=0, num=DUE_BATCH)
        except (RedisError, OSError) as e:
            self.outage(e, "charge_due")
            return []
        charged = []
        for member in members:
            key, _, resource_id = member.partition(" ")
            answer = await self._bg_call(
                key, ["charge", resource_id, member, repr(now), next(self._ids), SPEND_TTL], keep=False
            )
            if answer:
                meta, tokens, usd, due = answer
                charged.append(Due(key, resource_id, int(tokens), float(usd), float(due), meta))
        return charged
