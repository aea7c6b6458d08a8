"""Which of a virtual key's targets serves a request, and what a failure cools down. Pure: no
mitmproxy.

`pick()` runs once per attempt of a request: a weighted random draw among the primaries that are
not cooling down, not tried yet in this request and able to serve it; else the first such
fallback in file order; else None (the client gets 503 no_healthy_target, `retry_after()` says
for how long). A classic key (one target, `failover` False) is never cooled down: pick() gives
its target unless it was tried or cannot serve.

Cooldowns live on the usage store (`cooldown_until`, `cool_down`, `forget_cooldown`: sync and
local; RedisStore shares them between workers in the background). Targets are named there by
their `id`, so one real key at one URL cools down for every key and pool that lists it. A
cooldown is of the whole target (its key or its address failed: every model) or of the target
for one model (`model_cooldown`: that model was rate limited or overloaded there; the target's
other models are still picked). A pick that knows the model checks both. A target is logged
when it enters cooldown (`cool()`) and once when a pick finds its cooldown over ("healthy
again"); then its entry is forgotten. Log lines name a target by its label and masked key,
never the key.

`fault()` says whose fault a failed attempt was, from its status and the provider's error body:
the request's own (it fails alone: nothing cools down, so one key cannot take a target away
from the others with a request), the target's for that model, or the whole target's.

Cost: the draw is one random number and one bisect over weights summed at load
(VirtualKey.cumulative); the drawn target is checked, and only when it cannot serve are the
others looked at. Redrawing among the usable ones keeps the weights exact: a target with weight
w among usable weights W_u is chosen with w/W + (1 - W_u/W) * w/W_u = w/W_u.
"""

from __future__ import annotations

import json
import logging
import random
import re
from bisect import bisect_right
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from addon.policy.virtual_keys import Target, VirtualKey

log = logging.getLogger("gateway")


class Cooldowns(Protocol):
    """What pick() needs of the store (policy/cooldowns.py CooldownTable)."""

    def cooldown_until(self, target_id: str) -> float: ...

    def cool_down(self, target_id: str, until: float, now: float | None = None) -> bool: ...

    def forget_cooldown(self, target_id: str) -> None: ...


def model_cooldown(target_id: str, model: str) -> str:
    """The cooldown name of a target for one model (the store's name of the whole target is its id)."""
    return f"{target_id}:{model}"


def pick(key: VirtualKey, cooldowns: Cooldowns, now: float, tried: Collection[int] = (),
         serves: Callable[[Target], bool] | None = None, rand: Callable[[], float] = random.random,
         model: str | None = None) -> int | None:
    """The index into key.targets of the target to try next, or None when none can serve.
    `model`: the requested model, when known: a target cooling down for the model it would
    serve it as is skipped too."""
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
    until = cooldowns.cooldown_until
    if (not until(target.id) and drawn not in tried and (serves is None or serves(target))
            and (not model or not until(model_cooldown(target.id, target.served_model(model))))):
        return drawn  # the common case, inline: healthy, untried, able
    if usable(key, drawn, cooldowns, now, tried, serves, model):
        return drawn
    # the drawn one cannot serve: draw again among those that can
    others = [i for i in primaries if i != drawn and usable(key, i, cooldowns, now, tried, serves, model)]
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
        if usable(key, i, cooldowns, now, tried, serves, model):
            return i
    return None


def usable(key: VirtualKey, index: int, cooldowns: Cooldowns, now: float, tried: Collection[int],
           serves: Callable[[Target], bool] | None, model: str | None = None) -> bool:
    if index in tried:
        return False
    target = key.targets[index]
    if not healthy(key, target, cooldowns, now, model):
        return False
    return serves is None or serves(target)


def healthy(key: VirtualKey, target: Target, cooldowns: Cooldowns, now: float, model: str | None = None) -> bool:
    """Not cooling down (nor, with `model`, for the model it serves that one as). A cooldown
    found over is logged once and forgotten."""
    if not _over(key, target, target.id, cooldowns, now, ""):
        return False
    if not model:
        return True
    served = target.served_model(model)
    return _over(key, target, model_cooldown(target.id, served), cooldowns, now, f" for model {served!r}")


def _over(key: VirtualKey, target: Target, name: str, cooldowns: Cooldowns, now: float, what: str) -> bool:
    until = cooldowns.cooldown_until(name)
    if not until:
        return True
    if until > now:
        return False
    cooldowns.forget_cooldown(name)
    log.info("gateway: target %s (%s) of %s is healthy again%s", target.display, target.masked_key(), key.name, what)
    return True


def cooling_until(target: Target, cooldowns: Cooldowns, model: str | None = None) -> float:
    """When the target may serve `model` again: the later of its own and that model's cooldown."""
    until = cooldowns.cooldown_until(target.id)
    if model:
        until = max(until, cooldowns.cooldown_until(model_cooldown(target.id, target.served_model(model))))
    return until


def retry_after(key: VirtualKey, cooldowns: Cooldowns, now: float, model: str | None = None) -> float:
    """Seconds until the first of the key's targets leaves its cooldown (at least 1)."""
    soonest = None
    for target in key.targets:
        if healthy(key, target, cooldowns, now, model):
            return 1.0
        until = cooling_until(target, cooldowns, model)
        if soonest is None or until < soonest:
            soonest = until
    return 1.0 if soonest is None else max(1.0, soonest - now)


def cool(key: VirtualKey, index: int, cooldowns: Cooldowns, seconds: float, now: float, why: str,
         model: str | None = None) -> None:
    """Cool a failed target down for `seconds` (a longer running cooldown is kept); logged when
    it was not cooling already. `why`: "HTTP 503", "connect error", ... `model`: only for that
    model (the model the target served the request as)."""
    target = key.targets[index]
    name = model_cooldown(target.id, model) if model else target.id
    if cooldowns.cool_down(name, now + seconds, now):
        log.warning("gateway: target %s (%s) of %s cooling down for %gs%s (%s)", target.display, target.masked_key(),
                    key.name, seconds, f" for model {model!r}" if model else "", why)


# --- whose fault a failed attempt was ---------------------------------------------------------

REQUEST, MODEL, TARGET = "request", "model", "target"  # Fault.scope


class Fault(NamedTuple):
    """What a failed attempt cools down: nothing (REQUEST: it fails alone, the client gets it),
    the target for the model it served (MODEL), or the whole target (TARGET). `key`: the
    provider refused the real key (auth_cooldown_s); `why` for the log line."""

    scope: str
    key: bool
    why: str


# a 429 the provider ties to this request alone: too large for the account's tokens-per-minute
# window ("Request too large for gpt-4o ... on tokens per min (TPM): Limit 30000, Requested
# 62000"), or for the model's context. Another request of any key still fits.
_OWN_429 = re.compile(r"request too large|context[_ ]length|maximum context|context window|prompt is too long"
                      r"|request_too_large")
# "Limit 30000, Requested 62000": the request alone is over the limit (whatever the wording)
_LIMIT_REQUESTED = re.compile(r"limit:?\s*([\d,]{1,16})\b[^.;]{0,40}?requested:?\s*([\d,]{1,16})")
# a 429 for the account as a whole: out of credit (OpenAI's insufficient_quota), for every model
_QUOTA_429 = re.compile(r"insufficient_quota|exceeded your current quota")
# a 403 that says the real key (or its account) is invalid, revoked or switched off: every
# request with this key gets it. Any other 403 (no access to this model, a content or policy
# refusal, a missing scope for one endpoint) is the request's own.
_KEY_403 = re.compile(
    r"invalid[_ .-]?(?:x-)?api[_ .-]?key|incorrect api key|api[_ .-]?key[_ .-]?invalid|api key not valid"
    r"|api[_ .-]?key (?:is |has been |was )?(?:invalid|expired|revoked|disabled|deactivated|suspended|blocked)"
    r"|(?:key|account|organi[sz]ation|project|consumer|subscription)\b[^.;]{0,40}?\b(?:has been |is |was )?"
    r"(?:revoked|deactivated|disabled|suspended)"
    r"|invalid (?:subscription key|credentials|authentication)|authentication_error|unregistered callers"
    r"|api_key_service_blocked|consumer_suspended|account_deactivated")
ERROR_TEXT_MAX = 4096  # characters of a provider's error read for fault() (an error body is small)


def fault(status: int | None, body: str = "", error: str = "", model: str | None = None) -> Fault:
    """Whose fault a failed attempt was. `status`: the provider's (None: no answer, `error`
    says why); `body`: the start of its error body; `model`: the model the target was asked
    for, taken out of the text first (a provider's message may quote it, and the client chose
    it: it must not make a 403 read as a revoked key)."""
    if status is None:
        if error.startswith("connect:"):  # the address: every model, every key
            return Fault(TARGET, False, error or "failed")
        return Fault(MODEL, False, error or "failed")  # no answer in time, or cut: this model here
    if status == 401:
        return Fault(TARGET, True, f"the provider refused its key, HTTP {status}")
    if status in (403, 429):
        text = error_text(body, model)
        if status == 403:
            if _KEY_403.search(text):
                return Fault(TARGET, True, f"the provider refused its key, HTTP {status}")
            return Fault(REQUEST, False, f"HTTP {status}, this request's own")
        if _QUOTA_429.search(text):
            return Fault(TARGET, True, f"HTTP {status}, the account's quota")
        if _OWN_429.search(text) or _over_limit(text):
            return Fault(REQUEST, False, f"HTTP {status}, this request's own")
    return Fault(MODEL, False, f"HTTP {status}")


def error_text(body: str, model: str | None = None) -> str:
    """A provider error body as one lowercase text to search: its code/type/status/reason
    fields and its message (JSON), or the body itself; `model` taken out."""
    body = body[:ERROR_TEXT_MAX]
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, (dict, list)):
        pieces: list[str] = []
        stack, seen = [data], 0
        while stack and seen < 200:  # a bounded walk: codes and messages, wherever the provider nests them
            item = stack.pop()
            seen += 1
            if isinstance(item, dict):
                for name, value in item.items():
                    if isinstance(value, str) and name in ("code", "type", "status", "reason", "message"):
                        pieces.append(value)
                    elif isinstance(value, (dict, list)):
                        stack.append(value)
            elif isinstance(item, list):
                stack.extend(item)
        text = " ".join(pieces)
    else:
        text = body
    if model:
        text = text.replace(model, " ")
    return text.lower()


def _over_limit(text: str) -> bool:
    m = _LIMIT_REQUESTED.search(text)
    if m is None:
        return False
    try:
        return int(m.group(2).replace(",", "")) > int(m.group(1).replace(",", ""))
    except ValueError:
        return False
