"""Which of a virtual key's targets serves a request. Pure: no mitmproxy.

`pick()` runs once per attempt of a request: a weighted random draw among the primaries that are
not cooling down, not tried yet in this request and able to serve it; else the first such
fallback in file order; else None (the client gets 503 no_healthy_target, `retry_after()` says
for how long). A classic key (one target, `failover` False) is never cooled down: pick() gives
its target unless it was tried or cannot serve.

Cooldowns live on the usage store (`cooldown_until`, `cool_down`, `forget_cooldown`: sync and
local; RedisStore shares them between workers in the background). Targets are named there by
their `id`, so one real key at one URL cools down for every key and pool that lists it. A
target is logged when it enters cooldown (`cool()`) and once when a pick finds its cooldown
over ("healthy again"); then its entry is forgotten. Log lines name a target by its label and
masked key, never the key.

Cost: the draw is one random number and one bisect over weights summed at load
(VirtualKey.cumulative); the drawn target is checked, and only when it cannot serve are the
others looked at. Redrawing among the usable ones keeps the weights exact: a target with weight
w among usable weights W_u is chosen with w/W + (1 - W_u/W) * w/W_u = w/W_u.
"""

from __future__ import annotations

import logging
import random
from bisect import bisect_right
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from addon.policy.keys import Target, VirtualKey

log = logging.getLogger("gateway")


class Cooldowns(Protocol):
    """What pick() needs of the store (policy/store.py CooldownTable)."""

    def cooldown_until(self, target_id: str) -> float: ...

    def cool_down(self, target_id: str, until: float, now: float | None = None) -> bool: ...

    def forget_cooldown(self, target_id: str) -> None: ...


def pick(key: VirtualKey, cooldowns: Cooldowns, now: float, tried: Collection[int] = (),
         serves: Callable[[Target], bool] | None = None, rand: Callable[[], float] = random.random) -> int | None:
    """The index into key.targets of the target to try next, or None when none can serve."""
    targets = key.targets
    if not key.failover:
        return None if 0 in tried or (serves is not None and not serves(targets[0])) else 0
    primaries = key.primaries
    n = len(primaries)
    if n == 1:
        drawn = primaries[0]
    else:
        cumulative = key.cumulative
        j = bisect_right(cumulative, rand() * cumulative[-1])
        drawn = primaries[j if j < n else n - 1]  # rand() * total may round up to total
    target = targets[drawn]
    if not cooldowns.cooldown_until(target.id) and drawn not in tried and (serves is None or serves(target)):
        return drawn  # the common case, inline: healthy, untried, able
    if usable(key, drawn, cooldowns, now, tried, serves):
        return drawn
    # the drawn one cannot serve: draw again among those that can
    others = [i for i in primaries if i != drawn and usable(key, i, cooldowns, now, tried, serves)]
    if others:
        if len(others) == 1:
            return others[0]
        total = 0.0
        for i in others:
            total += targets[i].weight
        x = rand() * total
        for i in others:
            x -= targets[i].weight
            if x < 0:
                return i
        return others[-1]
    for i in key.fallbacks:
        if usable(key, i, cooldowns, now, tried, serves):
            return i
    return None


def usable(key: VirtualKey, index: int, cooldowns: Cooldowns, now: float, tried: Collection[int],
           serves: Callable[[Target], bool] | None) -> bool:
    if index in tried:
        return False
    target = key.targets[index]
    if not healthy(key, target, cooldowns, now):
        return False
    return serves is None or serves(target)


def healthy(key: VirtualKey, target: Target, cooldowns: Cooldowns, now: float) -> bool:
    """Not cooling down. A cooldown found over is logged once and forgotten."""
    until = cooldowns.cooldown_until(target.id)
    if not until:
        return True
    if until > now:
        return False
    cooldowns.forget_cooldown(target.id)
    log.info("gateway: target %s (%s) of %s is healthy again", target.display, target.masked_key(), key.name)
    return True


def retry_after(key: VirtualKey, cooldowns: Cooldowns, now: float) -> float:
    """Seconds until the first of the key's targets leaves its cooldown (at least 1)."""
    soonest = None
    for target in key.targets:
        if healthy(key, target, cooldowns, now):
            return 1.0
        until = cooldowns.cooldown_until(target.id)
        if soonest is None or until < soonest:
            soonest = until
    return 1.0 if soonest is None else max(1.0, soonest - now)


def cool(key: VirtualKey, index: int, cooldowns: Cooldowns, seconds: float, now: float, why: str) -> None:
    """Cool a failed target down for `seconds` (a longer running cooldown is kept); logged when
    it was not cooling already. `why`: "HTTP 503", "connect error", ..."""
    target = key.targets[index]
    if cooldowns.cool_down(target.id, now + seconds, now):
        log.warning("gateway: target %s (%s) of %s cooling down for %gs (%s)",
                    target.display, target.masked_key(), key.name, seconds, why)
