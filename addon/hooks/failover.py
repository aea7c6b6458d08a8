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

A request for a stored response (`Tries.pinned`, policy/owners.py) goes to the target that
holds it and nowhere else: its failure cools that target down and goes to the client.

This part owns a request's failover from its first attempt to its end: the Gateway asks it for
the first target (`first_target`, `track`, `with_body` once the body names the model) and the
target holding a stored response (`pin`); a failed attempt is pointed at the next target here
(the request prepared again for it, pure: routing/prepare.py; the request rewritten:
hooks/upstream.py), never through the Gateway.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, exceptions, http

from addon.hooks.patches import attempts
from addon.hooks.patches.errorpages import PAGE_HEADERS
from addon.hooks.timeouts import seconds_option
from addon.hooks.upstream import address_for, point
from addon.policy import targets
from addon.policy.virtual_keys import Target, VirtualKey
from addon.routing.prepare import Call, Prepared, prepare, prepare_resource
from addon.routing.routes import Route, describe_attempt
from addon.routing.state import FlowState
from addon.wire.errors import GatewayError

log = logging.getLogger("gateway")

DEFAULT_MAX_ATTEMPTS = 3  # "max_attempts" 0: the key's number of targets, at most this
# attempts used up, a healthy target left: the official SDKs (openai, anthropic) retry on these
RETRY_AT_ONCE = {"x-should-retry": "true", "retry-after-ms": "0"}
ATTEMPTS_HEADER = "x-gateway-attempts"  # on every answer of a key with several targets
_ATTEMPTS = ATTEMPTS_HEADER.encode()


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


def failed_attempt(state: FlowState, failure: dict, now: float) -> dict:
    """A failed attempt as the flow keeps it once another attempt follows (FlowState
    failed_attempts, for mitmweb's view, web/contentview.py): which target, what it answered
    (a status, or the connection error), when it began and how long it took. The last attempt
    is the flow itself."""
    started = state.attempt_started if state.attempt_started is not None else now
    return {"attempt": state.attempts or 1, "provider": state.provider, "target": state.target,
            "fallback": bool(state.fallback), "status": failure.get("status"), "error": failure.get("error"),
            "started": started, "ms": round((now - started) * 1000, 1)}


def no_healthy_target(wait: float) -> GatewayError:
    return GatewayError(503, f"every target of this virtual key is cooling down after failures; retry in {wait:.0f}s",
                        code="no_healthy_target", type="server_error", headers={"retry-after": f"{wait:.0f}"})


class Tries:
    """A request of a key with several targets, while it is in flight: the targets tried, and
    what another attempt needs."""

    __slots__ = ("call", "tried", "unusable", "routes", "raw", "retry_now", "pinned", "requested")

    def __init__(self, call: Call, index: int, routes: dict[str, Route]) -> None:
        self.call = call  # the attempt in flight (its target; the client's headers, as they came)
        self.tried = [index]  # target indexes, in attempt order
        self.unusable: list[int] = []  # targets that cannot take this request (a model without a price)
        self.routes = routes  # provider name -> Route, for the request's API
        self.raw: bytes | None = None  # the client's body (plain); None: a body-less resource call
        self.retry_now = False  # attempts used up, a healthy target left: the client is told to retry
        self.pinned = False  # names a stored response: only the target holding it may serve it (pin())
        self.requested: str | None = None  # the client's model: a pick skips targets cooling down for it

    @property
    def key(self) -> VirtualKey:
        return self.call.key

    def serves(self, target: Target) -> bool:
        return target.provider in self.routes

    def excluded(self) -> list[int]:
        return self.tried + self.unusable if self.unusable else self.tried


def note_target(call: Call, target: Target, attempt: int) -> None:
    """The attempt in the flow's state (ledger, metrics; target_id: a stored response's
    holder, policy/owners.py) and comment (mitmweb)."""
    state = call.state
    state.provider, state.target, state.target_id, state.attempts = target.provider, target.label, target.id, attempt
    state.fallback, state.attempt_started = target.fallback, time.time()  # (a failed one is listed with its time)
    call.flow.comment = describe_attempt(state) + ("" if state.api is not None else getattr(call.api, "label", ""))


class Failover:
    def __init__(self, live) -> None:
        self.live = live  # its `store`: the targets' cooldowns; its `in_flight`: the flows still forwarded
        self.tries: dict[str, Tries] = {}  # flow id -> the failover of a request in flight
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

    # --- the first attempt (asked by the Gateway) ------------------------------------------

    def first_target(self, key: VirtualKey, routes: dict[str, Route], path: str) -> int:
        """The target a key with several targets sends this request to first."""
        store = self.live.store
        now = time.time()
        index = targets.pick(key, store, now, (), lambda target: target.provider in routes)
        if index is not None:
            return index
        if not any(target.provider in routes for target in key.targets):
            raise GatewayError(400, f"{path} is not available for this virtual key's providers",
                               code="unsupported_endpoint")
        raise no_healthy_target(targets.retry_after(key, store, now))

    def track(self, call: Call, index: int, routes: dict[str, Route]) -> None:
        """The request goes to target `index` first; a failed attempt may go on to another."""
        self.tries[call.flow.id] = Tries(call, index, routes)
        attempts.arm(call.flow)
        note_target(call, call.target, 1)

    def with_body(self, call: Call, raw: bytes, body: dict) -> Call:
        """The client's body arrived: kept (plain), another target's attempt is prepared from it
        again. The first pick was made before the body named the model: when the picked target
        is cooling down for the model it would serve, pick again knowing it (policy/targets.py)."""
        tries = self.tries.get(call.flow.id)
        if tries is None:
            return call
        tries.raw = raw
        model = body.get("model")
        if type(model) is not str:
            return call
        tries.requested = model
        key, store, now = call.key, self.live.store, time.time()
        if targets.healthy(key, call.target, store, now, model):
            return call
        index = targets.pick(key, store, now, (), tries.serves, model=model)
        if index is None:
            raise no_healthy_target(targets.retry_after(key, store, now, model))
        target = key.targets[index]
        call = call._replace(route=tries.routes[target.provider], target=target)
        tries.call, tries.tried = call, [index]
        note_target(call, target, 1)
        return call

    def pin(self, call: Call, prepared: Prepared, holder: str) -> tuple[Call, Prepared]:
        """A request naming a stored response, of a key with several targets, goes to the target
        `holder` (its Target.id) that made it, and only there (no failover: no other target has
        it). While that target cools down: 503 no_healthy_target, nothing forwarded. A holder the
        key no longer lists (the keys file changed) leaves the request where it was picked."""
        key = call.key
        tries = self.tries.get(call.flow.id) if key.failover else None
        if tries is None:
            return call, prepared
        index = next((i for i, t in enumerate(key.targets) if t.id == holder), None)
        if index is None or key.targets[index].provider not in tries.routes:
            return call, prepared
        tries.pinned = True
        target = key.targets[index]
        store = self.live.store
        now = time.time()
        if not targets.healthy(key, target, store, now, tries.requested):
            wait = max(1.0, targets.cooling_until(target, store, tries.requested) - now)
            raise GatewayError(503, "the target holding this stored response is cooling down after failures; "
                               f"retry in {wait:.0f}s",
                               code="no_healthy_target", type="server_error", headers={"retry-after": f"{wait:.0f}"})
        if index == tries.tried[0]:
            return call, prepared
        call = call._replace(route=tries.routes[target.provider], target=target)
        if call.tail:
            prepared = prepare_resource(call.route)
        else:
            prepared = prepare(tries.raw, call.api.parse_request(tries.raw), call)
        tries.call, tries.tried = call, [index]
        note_target(call, target, 1)
        return call, prepared

    def tell_retry(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """Called by the Gateway's responseheaders, in its place among the answer's headers. A
        key with several targets whose attempts are used up while a target is still healthy: the
        official SDKs retry at once on these headers, and the retry goes there."""
        tries = self.tries.get(flow.id)
        if tries is not None:  # appended to the fields: Headers.__setitem__ rescans them all
            response.headers.fields += ((_ATTEMPTS, str(len(tries.tried)).encode()),)
            if tries.retry_now and response.status_code in attempts.RETRYABLE:  # (the provider's own replaced)
                response.headers.update(RETRY_AT_ONCE)

    # --- hooks -----------------------------------------------------------------------------

    def attempt_failed(self, flow: http.HTTPFlow) -> None:
        tries = self.tries.get(flow.id)
        if tries is None:
            return
        # should no other attempt follow, the gateway's own 502/504 page for this failure says
        # how many were made, as every answer of such a key does (another attempt resets it)
        flow.metadata[PAGE_HEADERS] = {ATTEMPTS_HEADER: str(len(tries.tried))}
        try:
            self.next_attempt(flow, tries)
        except Exception:
            log.exception("gateway: internal error while choosing another target; the failure goes to the client")

    def response(self, flow: http.HTTPFlow) -> None:
        self.tries.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.tries.pop(flow.id, None)

    # --- another attempt -------------------------------------------------------------------

    def next_attempt(self, flow: http.HTTPFlow, tries: Tries) -> None:
        key = tries.key
        now = time.time()
        failure = attempts.failure(flow)
        state = tries.call.state
        failed = failed_attempt(state, failure, now)
        model = state.model or None  # the model this attempt's target served
        judged = targets.fault(failure.get("status"), failure.get("body", ""), failure.get("error", ""), model)
        if judged.scope == targets.REQUEST:
            return  # the request's own fault: it fails alone, the client gets the provider's answer
        self.cool_down(key, tries.tried[-1], judged, failure, model, now)
        if tries.pinned:
            return  # no other target holds the stored response it names
        while True:
            index = targets.pick(key, self.live.store, now, tries.excluded(), tries.serves, model=tries.requested)
            if index is None:
                return  # nothing healthy left: the client gets this attempt's failure
            if len(tries.tried) >= self.attempts_for(key):
                tries.retry_now = True  # the client's own retry (at once) gets the healthy one
                # on the gateway's 502/504 too
                flow.metadata[PAGE_HEADERS] = {**RETRY_AT_ONCE, ATTEMPTS_HEADER: str(len(tries.tried))}
                return
            if self.reroute(flow, tries, index):
                if state.failed_attempts is None:
                    state.failed_attempts = []
                state.failed_attempts.append(failed)
                attempts.retry(flow)
                return
            if index not in tries.unusable:
                return  # the flow is gone

    def reroute(self, flow: http.HTTPFlow, tries: Tries, index: int) -> bool:
        """Point a failed attempt's flow at the key's target `index`, as its first attempt was
        (not admitted again: limits and budgets count a client request once). False: it cannot go."""
        if flow.error is not None or not flow.live or flow.id not in self.live.in_flight:
            return False
        if tries.raw is None:
            return False  # a stored resource (GET /v1/responses/{id}) lives at one target
        target = tries.key.targets[index]
        call = tries.call._replace(route=tries.routes[target.provider], target=target)
        try:
            prepared = prepare(tries.raw, call.api.parse_request(tries.raw), call)
            # the client's body as it came, not what an earlier attempt was sent (a model_map, a cap)
            if prepared.body is None:
                prepared = prepared._replace(body=tries.raw)
            address = address_for(call, prepared)
        except GatewayError as e:
            log.warning("gateway: target %s of %s cannot serve this request (%s)", target.display, tries.key.name,
                        e.message)
            tries.unusable.append(index)
            return False
        tries.call = call
        tries.tried.append(index)
        note_target(call, target, len(tries.tried))
        point(call, prepared, address)
        return True

    def cool_down(self, key, index: int, judged: targets.Fault, failure: dict, model: str | None, now: float) -> None:
        if judged.key:
            seconds = self.auth_cooldown_s
        elif failure.get("status") == 429:
            seconds = max(self.cooldown_s, retry_after_seconds(failure.get("headers")))
        else:
            seconds = self.cooldown_s
        scoped = model if judged.scope == targets.MODEL else None
        targets.cool(key, index, self.live.store, seconds, now, judged.why, scoped)
