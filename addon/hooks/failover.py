"""Failover between a virtual key's targets (keys with "targets"; policy/targets.py picks).

A failed attempt (hooks/patches/attempts.py says which failures count: connect errors, no or broken
response headers, 401/403/429/5xx/529, all before any byte reached the client) is judged by
`targets.fault()`, from its status and the provider's error body:

- the request's own (a 429 for a request too large for the account's window or the model's
  context, a 403 for a model the account may not use or a refused content): it fails alone,
  the client gets the provider's answer, nothing cools down. One key's request must not take a
  target away from every other key that shares it.
- the whole target's: the provider refused the real key (401, a 403 saying it is invalid,
  revoked or disabled, a 429 for the account's exhausted quota): `auth_cooldown_s`, one log
  line with the key masked; the connection failed: `cooldown_s`.
- the target's for the model it served (429 rate limits, 5xx, 529, no answer in time):
  `cooldown_s`, or a 429's Retry-After when longer. The target's other models are still picked.

A cooldown is shared through the store (RedisStore: every worker), and the request goes to the
next target the pick gives, inside the same flow, up to `max_attempts` attempts. Limits and
budgets were counted once, when the request was admitted; a retry is not admitted again.

When the attempts are used up but a healthy target remains, the client's answer says to retry at
once (`x-should-retry: true`, `retry-after-ms: 0`: the official SDKs do), and that retry lands on
the healthy target: the provider's error response, or the gateway's 502/504 when the last attempt
could not connect or got no headers in time (hooks/patches/errorpages.py puts PAGE_HEADERS on it).

A request for a stored response (`FailoverRoute.pinned`, policy/owners.py) goes to the target
that holds it and nowhere else: its failure cools that target down and goes to the client.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, exceptions, http

from addon.policy import targets
from addon.hooks.patches import attempts
from addon.hooks.patches.errorpages import PAGE_HEADERS
from addon.hooks.timeouts import seconds_option

log = logging.getLogger("gateway")

DEFAULT_MAX_ATTEMPTS = 3  # "max_attempts" 0: the key's number of targets, at most this
# attempts used up, a healthy target left: the official SDKs (openai, anthropic) retry on these
RETRY_AT_ONCE = {"x-should-retry": "true", "retry-after-ms": "0"}
ATTEMPTS_HEADER = "x-gateway-attempts"  # on every answer of a key with several targets


def retry_after_seconds(headers: dict | None) -> float:
    """A 429's Retry-After (seconds; an HTTP date is not worth the parse) or retry-after-ms."""
    if headers is None:
        return 0.0
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue
            if 0 <= seconds < 86400:
                return seconds
    return 0.0


def failed_attempt(meta: dict, failure: dict, now: float) -> dict:
    """A failed attempt as the flow keeps it once another attempt follows (metadata
    "failed_attempts", for mitmweb's view, web/contentview.py): which target, what it answered
    (a status, or the connection error), when it began and how long it took. The last attempt
    is the flow itself."""
    started = meta.get("attempt_started", now)
    return {"attempt": meta.get("attempts", 1), "provider": meta.get("provider"), "target": meta.get("target"),
            "fallback": bool(meta.get("fallback")), "status": failure.get("status"), "error": failure.get("error"),
            "started": started, "ms": round((now - started) * 1000, 1)}


class Failover:
    def __init__(self, gateway) -> None:
        self.gateway = gateway  # reroute() points a flow at another target
        self.cooldown_s = 30.0
        self.auth_cooldown_s = 600.0
        self.max_attempts = 0

    def load(self, loader) -> None:
        loader.add_option(
            "cooldown_s", str, "30",
            "Seconds a key's target is skipped after a failed attempt (connect error; for the model "
            "it served: no answer in upstream_timeout, 429, 5xx); a 429's Retry-After when that is longer.",
        )
        loader.add_option(
            "auth_cooldown_s", str, "600",
            "Seconds a key's target is skipped after its provider refused the real key (401, a 403 "
            "saying the key is invalid or revoked, a 429 for an exhausted quota).",
        )
        loader.add_option(
            "max_attempts", int, 0,
            "Attempts per request for keys with several targets, counting the first; 0: the key's "
            f"number of targets, at most {DEFAULT_MAX_ATTEMPTS}.",
        )

    def configure(self, updated) -> None:
        if "cooldown_s" in updated:
            self.cooldown_s = seconds_option("cooldown_s")
        if "auth_cooldown_s" in updated:
            self.auth_cooldown_s = seconds_option("auth_cooldown_s")
        if "max_attempts" in updated:
            if ctx.options.max_attempts < 0:
                raise exceptions.OptionsError(f"max_attempts must be 0 or more, not {ctx.options.max_attempts}")
            self.max_attempts = ctx.options.max_attempts

    def attempts_for(self, key) -> int:
        return self.max_attempts or min(len(key.targets), DEFAULT_MAX_ATTEMPTS)

    def attempt_failed(self, flow: http.HTTPFlow) -> None:
        route = self.gateway.failovers.get(flow.id)
        if route is None:
            return
        # should no other attempt follow, the gateway's own 502/504 page for this failure says
        # how many were made, as every answer of such a key does (another attempt resets it)
        flow.metadata[PAGE_HEADERS] = {ATTEMPTS_HEADER: str(len(route.tried))}
        try:
            self.next_attempt(flow, route)
        except Exception:
            log.exception("gateway: internal error while choosing another target; the failure goes to the client")

    def next_attempt(self, flow: http.HTTPFlow, route) -> None:
        key = route.key
        now = time.time()
        failure = attempts.failure(flow)
        failed = failed_attempt(flow.metadata["gateway"], failure, now)
        model = route.context.meta.get("model") or None  # the model this attempt's target served
        judged = targets.fault(failure.get("status"), failure.get("body", ""), failure.get("error", ""), model)
        if judged.scope == targets.REQUEST:
            return  # the request's own fault: it fails alone, the client gets the provider's answer
        self.cool_down(key, route.tried[-1], judged, failure, model, now)
        if route.pinned:
            return  # no other target holds the stored response it names
        while True:
            index = targets.pick(key, self.gateway.store, now, route.excluded(), route.serves, model=route.requested)
            if index is None:
                return  # nothing healthy left: the client gets this attempt's failure
            if len(route.tried) >= self.attempts_for(key):
                route.retry_now = True  # the client's own retry (at once) gets the healthy one
                flow.metadata[PAGE_HEADERS] = {
                    **RETRY_AT_ONCE,
                    ATTEMPTS_HEADER: str(len(route.tried)),
                }  # on the gateway's 502/504 too
                return
            if self.gateway.reroute(flow, route, index):
                flow.metadata["gateway"].setdefault("failed_attempts", []).append(failed)
                attempts.retry(flow)
                return
            if index not in route.unusable:
                return  # the flow is gone

    def cool_down(self, key, index: int, judged: targets.Fault, failure: dict, model: str | None, now: float) -> None:
        if judged.key:
            seconds = self.auth_cooldown_s
        elif failure.get("status") == 429:
            seconds = max(self.cooldown_s, retry_after_seconds(failure.get("headers")))
        else:
            seconds = self.cooldown_s
        scoped = model if judged.scope == targets.MODEL else None
        targets.cool(key, index, self.gateway.store, seconds, now, judged.why, scoped)
