"""Virtual key rules: given a key's policy, its usage so far and the request, allow or refuse.

Pure: no mitmproxy, no I/O; the time and the store are passed in. The gateway calls
`check_key` right after the key lookup and `admit` once the body is parsed and the provider
has accepted it (a request it refuses with a 400 is never forwarded), both before anything is
forwarded. Order matters: cheap static rules first, and the rpm slot is taken
last so a request refused for another reason does not use one up.
"""

from __future__ import annotations

from addon.wire.errors import GatewayError
from addon.policy.keys import KeyStore, VirtualKey
from addon.policy.store import UsageStore, retry_after_header

# A budget is not something a retry fixes: tell the openai SDK not to retry (it honours this header)
NO_RETRY = {"x-should-retry": "false"}


def check_key(key: VirtualKey, now: float) -> None:
    """Disabled or expired keys are refused like unknown ones (401)."""
    if key.policy.disabled:
        raise GatewayError(401, "this virtual key is disabled", code="key_disabled")
    if key.policy.expires_at is not None and now >= key.policy.expires_at:
        raise GatewayError(401, "this virtual key has expired", code="key_expired")


def admit(key: VirtualKey, model: str, keys: KeyStore, store: UsageStore, now: float) -> None:
    """Raise the GatewayError that refuses this request, or count it against the key's rpm."""
    policy = key.policy
    if not policy.allows_model(model):
        raise GatewayError(403, f"this virtual key may not use model {model!r}", param="model", code="model_not_allowed")
    if policy.budget_usd is not None and keys.price(model) is None:
        # an unpriced model would cost $0 and walk straight past a dollar budget
        raise GatewayError(
            403, f"model {model!r} has no price in the keys file, and this key has a dollar budget",
            param="model", code="model_not_priced",
        )
    if policy.has_budget:
        spent = store.spend(key.fingerprint, policy.budget_period, now)
        if policy.budget_tokens is not None and spent.tokens >= policy.budget_tokens:
            raise GatewayError(429, f"token budget of this virtual key is used up ({spent.tokens} of {policy.budget_tokens}{_period(policy.budget_period)})",
                               code="budget_exceeded", headers=NO_RETRY)
        if policy.budget_usd is not None and spent.usd >= policy.budget_usd:
            raise GatewayError(429, f"dollar budget of this virtual key is used up (${spent.usd:.4f} of ${policy.budget_usd:g}{_period(policy.budget_period)})",
                               code="budget_exceeded", headers=NO_RETRY)
    if policy.tpm is not None:
        wait = store.tokens_wait(key.fingerprint, policy.tpm, now)
        if wait is not None:
            raise _rate_limited(f"tokens per minute limit of this virtual key reached (tpm {policy.tpm})", wait)
    if policy.rpm is not None:
        wait = store.take_request(key.fingerprint, policy.rpm, now)
        if wait is not None:
            raise _rate_limited(f"requests per minute limit of this virtual key reached (rpm {policy.rpm})", wait)


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
