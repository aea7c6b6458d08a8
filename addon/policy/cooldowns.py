"""Target cooldowns as both stores keep them: a table read on the request path without I/O.

Which target is cooling down and until when (policy/targets.py decides); MemoryStore and
RedisStore are built on `CooldownTable`, RedisStore also sharing it with the other gateways
(policy/redis_cooldowns.py).
"""

from __future__ import annotations

import time

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
