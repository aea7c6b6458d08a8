"""Virtual key rules: given a key's policy, its usage so far and the request, allow or refuse.

Pure: no mitmproxy, no I/O; the time and the store are passed in. The gateway calls
`check_key` right after the key lookup and `admit` once the body is parsed and the provider
has accepted it (a request it refuses with a 400 is never forwarded), both before anything is
forwarded. Order matters: cheap static rules first, then one call to the store that checks
budgets, tpm, max_parallel and rpm and reserves the request's worst case (policy/store.py
says how), so a request refused for any reason uses up nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable

from addon.policy.virtual_keys import KeyPolicy, KeyStore, VirtualKey

from addon.wire.tokens import Price
from addon.policy.store import (
    BUDGET_TOKENS, BUDGET_USD, NO_DEMAND, PARALLEL, TPM, Demand, StoreUnavailable, UsageStore, Verdict,
    retry_after_header,
)
from addon.wire.errors import GatewayError
from addon.policy.worstcase import made_of

# A budget is not something a retry fixes: tell the openai SDK not to retry (it honours this header)
NO_RETRY = {"x-should-retry": "false"}


def check_key(key: VirtualKey, now: float) -> None:
    """Disabled or expired keys are refused like unknown ones (401)."""
    if key.policy.disabled:
        raise GatewayError(401, "this virtual key is disabled", code="key_disabled")
    if key.policy.expires_at is not None and now >= key.policy.expires_at:
        raise GatewayError(401, "this virtual key has expired", code="key_expired")


def admit(key: VirtualKey, model: str | None, keys: KeyStore, store: UsageStore, now: float,
          demand: Demand = NO_DEMAND) -> str | None | Awaitable[str | None]:
    """Raise the GatewayError that refuses this request, or count it and reserve `demand` (its
    worst case, see `worst_case`). Returns the reservation's ticket (None: nothing held), or,
    when the store does I/O, an awaitable of it."""
    policy = key.policy
    limits = policy.limits
    if model is None:  # names no model, costs nothing (GET /v1/responses/{id}): counted, not priced
        # nor held to budgets or tpm: a used-up budget must not keep a client from the background
        # response it was charged for
        limits = policy.request_limits
    elif not policy.allows_model(model):
        raise GatewayError(
            403, f"this virtual key may not use model {model!r}", param="model", code="model_not_allowed"
        )
    elif policy.budget_usd is not None and keys.price(model) is None:
        # an unpriced model would cost $0 and walk straight past a dollar budget
        raise GatewayError(
            403, f"model {model!r} has no price in the keys file, and this key has a dollar budget",
            param="model", code="model_not_priced",
        )
    if limits is None:  # nothing to count: the store is not asked
        return None
    verdict = store.reserve(key.fingerprint, limits, demand, now)
    if type(verdict) is Verdict:
        return ticket(verdict, policy, demand, model)
    return _ticket_later(verdict, policy, demand, model)


async def _ticket_later(
    pending: Awaitable[Verdict], policy: KeyPolicy, demand: Demand, model: str | None
) -> str | None:
    try:
        verdict = await pending
    except StoreUnavailable:
        raise GatewayError(
            503,
            "the gateway cannot check this key's limits right now (its usage store is unreachable); retry shortly",
            code="store_unavailable",
            headers={"retry-after": "1"},
        ) from None
    return ticket(verdict, policy, demand, model)


def admit_early(key: VirtualKey, store: UsageStore, now: float, pending: int) -> None:
    """At the request's headers, before its body is read (a body can be tens of megabytes): raise
    the 429 that rpm, max_parallel, or a budget or tpm already used up would give whatever the
    body. `pending`: this process's requests of the key past this point whose bodies are still
    being read, or not yet admitted: they count as if admitted. Counts nothing: `admit` does, once
    the body is read."""
    limits = key.policy.limits
    if limits is None:
        return
    verdict = store.peek(key.fingerprint, limits, pending, now)
    if verdict.refused is None:
        return
    policy = key.policy
    if verdict.refused == BUDGET_TOKENS:
        raise GatewayError(429, f"token budget of this virtual key is used up ({verdict.used:.0f} of {policy.budget_tokens}"
                           f"{_period(policy.budget_period)} used or held)", code="budget_exceeded", headers=NO_RETRY)
    if verdict.refused == BUDGET_USD:
        raise GatewayError(429, f"dollar budget of this virtual key is used up (${verdict.used:.4f} of ${policy.budget_usd:g}"
                           f"{_period(policy.budget_period)} used or held)", code="budget_exceeded", headers=NO_RETRY)
    if verdict.refused == TPM:
        raise _rate_limited(f"tokens per minute limit of this virtual key reached (tpm {policy.tpm})", verdict.wait)
    ticket(verdict, policy, NO_DEMAND)  # rpm, max_parallel: the same words as at admission


def ticket(verdict: Verdict, policy: KeyPolicy, demand: Demand, model: str | None = None) -> str | None:
    """The store's answer as the ticket of an admitted request, or the client's error."""
    refused = verdict.refused
    if refused is None:
        return verdict.ticket
    period = _period(policy.budget_period)
    if refused == BUDGET_TOKENS:
        raise GatewayError(
            429,
            f"token budget of this virtual key does not cover this request ({verdict.used:,.0f} of "
            f"{policy.budget_tokens:,}{period} used or held; this request holds up to {demand.tokens:,} tokens "
            f"while it runs{_because(demand)})",
            code="budget_exceeded",
            headers=NO_RETRY,
        )
    if refused == BUDGET_USD:
        raise GatewayError(
            429,
            f"dollar budget of this virtual key does not cover this request (${verdict.used:.4f} of "
            f"${policy.budget_usd:g}{period} used or held; this request holds up to ${demand.usd:.4f} "
            f"while it runs{_because(demand)})",
            code="budget_exceeded",
            headers=NO_RETRY,
        )
    if refused == TPM:
        raise _rate_limited(
            f"tokens per minute limit of this virtual key reached (tpm {policy.tpm:,}; this request may use "
            f"up to {demand.tokens:,}{_because(demand)})",
            verdict.wait,
        )
    if refused == PARALLEL:
        raise GatewayError(
            429,
            f"this virtual key already has {policy.max_parallel} requests in flight (max_parallel {policy.max_parallel})",
            code="concurrency_limit_exceeded",
            headers={"retry-after": retry_after_header(verdict.wait)},
        )
    raise _rate_limited(f"requests per minute limit of this virtual key reached (rpm {policy.rpm})", verdict.wait)


def _because(demand: Demand) -> str:
    """': <what the worst case is made of>' (policy/worstcase.py), or nothing."""
    words = made_of(demand.hold)
    return f": {words}" if words else ""


def worst_price(keys: KeyStore, key: VirtualKey, model: str) -> Price | None:
    """For a key with several targets: per token kind, the highest price among the models its
    targets serve `model` as (a retry may go to any of them). Unpriced ones are left out: a key
    with a dollar budget never sends to them (model_not_priced)."""
    prices = [price for target in key.targets if (price := keys.price(target.served_model(model))) is not None]
    if not prices:
        return None
    return Price(max(p.input for p in prices), max(p.output for p in prices))


def listed_models(key: VirtualKey) -> list[str]:
    """The key's model names for GET /v1/models. Globs cannot be enumerated and are left out;
    a key without a models list lists nothing rather than guessing."""
    if key.policy.models is None:
        return []
    return [m for m in key.policy.models if not any(c in m for c in "*?[")]


def models_page(key: VirtualKey) -> dict:
    return {"object": "list", "data": [model_object(key, m) for m in listed_models(key)]}


def model_object(key: VirtualKey, model: str) -> dict:
    return {"id": model, "object": "model", "created": 0, "owned_by": key.provider}


def _rate_limited(message: str, wait: float) -> GatewayError:
    return GatewayError(429, message, code="rate_limit_exceeded", headers={"retry-after": retry_after_header(wait)})


def _period(seconds: int | None) -> str:
    if seconds is None:
        return ""
    return f" per {seconds // 86400}d" if seconds % 86400 == 0 else f" per {seconds // 3600}h"
