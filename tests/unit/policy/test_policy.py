"""addon/policy/rules.py on parsed keys files, with an in-memory store and the time passed in."""

import hashlib
import json

import pytest

from addon.policy import rules as policy
from addon.wire.errors import GatewayError
from addon.policy.keys_parse import KeysError, parse_keys
from addon.policy.memory_store import MemoryStore


def keys_with(**fields):
    return parse_keys({
        "prices": {"gpt-4o": {"input": 2.5, "output": 10.0}, "gpt-4o-mini*": {"input": 0.15, "output": 0.6}},
        "virtual_keys": {"vk_test_policy": {"provider": "openai", "api_key": "sk-test-123456", "name": "t", **fields}},
    })


def refusal(keys, model="gpt-4o", store=None, now=1000.0) -> GatewayError:
    key = keys.lookup("vk_test_policy")
    with pytest.raises(GatewayError) as e:
        policy.check_key(key, now)
        policy.admit(key, model, keys, store or MemoryStore(), now)
    return e.value


def admitted(keys, model="gpt-4o", store=None, now=1000.0) -> str | None:
    """Admission's ticket (None: nothing held); a refusal fails the test."""
    key = keys.lookup("vk_test_policy")
    policy.check_key(key, now)
    return policy.admit(key, model, keys, store or MemoryStore(), now)


class UntouchedStore:
    """A usage store that fails the test when anything is asked of it."""

    def __getattr__(self, name):
        raise AssertionError(f"the store was asked for {name}")


def test_a_key_without_policy_is_admitted_for_any_model_and_nothing_is_counted():
    assert admitted(keys_with(), "anything", store=UntouchedStore()) is None
    assert admitted(keys_with(), None, store=UntouchedStore()) is None
    # the same call for a key with a limit does ask the store: UntouchedStore can see it
    with pytest.raises(AssertionError, match="asked for reserve"):
        admitted(keys_with(rpm=5), "anything", store=UntouchedStore())


def test_models_allow_list_with_globs():
    keys = keys_with(models=["gpt-4o", "gpt-4o-mini*"])
    admitted(keys, "gpt-4o")
    admitted(keys, "gpt-4o-mini-2024-07-18")
    e = refusal(keys, "gpt-4.1")
    assert (e.status, e.code, e.type, e.param) == (403, "model_not_allowed", "permission_error", "model")


def test_disabled_and_expired_keys_are_401():
    assert (refusal(keys_with(disabled=True)).status, refusal(keys_with(disabled=True)).code) == (401, "key_disabled")
    expired = keys_with(expires_at="1970-01-01T00:10:00Z")  # 600
    e = refusal(expired, now=600.0)
    assert (e.status, e.code) == (401, "key_expired")
    admitted(expired, now=599.0)


def test_token_budget_exceeded_is_429_without_retry():
    keys = keys_with(budget_tokens=100)
    store = MemoryStore()
    fp = keys.lookup("vk_test_policy").fingerprint
    store.add_usage(fp, 99, 0.0, when=900.0)
    admitted(keys, store=store)
    store.add_usage(fp, 1, 0.0, when=950.0)
    e = refusal(keys, store=store)
    assert (e.status, e.code) == (429, "budget_exceeded")
    assert e.headers == {"x-should-retry": "false"}


def test_dollar_budget_over_a_period():
    keys = keys_with(budget_usd=1.0, budget_period="1d")
    store = MemoryStore()
    fp = keys.lookup("vk_test_policy").fingerprint
    store.add_usage(fp, 10, 1.0, when=0.0)
    assert refusal(keys, store=store, now=3600.0).code == "budget_exceeded"
    admitted(keys, store=store, now=2 * 86400.0)  # the day has rolled past


def test_dollar_budget_refuses_unpriced_models():
    e = refusal(keys_with(budget_usd=5), "some-unpriced-model")
    assert (e.status, e.code) == (403, "model_not_priced")


def test_rpm_429_with_retry_after_and_refusals_take_no_slot():
    keys = keys_with(rpm=2, models=["gpt-4o"])
    store = MemoryStore()
    admitted(keys, store=store, now=0.0)
    assert refusal(keys, "other", store=store, now=1.0).code == "model_not_allowed"
    admitted(keys, store=store, now=2.0)
    e = refusal(keys, store=store, now=3.0)
    assert (e.status, e.code, e.headers["retry-after"]) == (429, "rate_limit_exceeded", "57")


def test_tpm_429():
    keys = keys_with(tpm=50)
    store = MemoryStore()
    store.add_usage(keys.lookup("vk_test_policy").fingerprint, 50, 0.0, when=990.0)
    e = refusal(keys, store=store, now=1000.0)
    assert (e.status, e.code, e.headers["retry-after"]) == (429, "rate_limit_exceeded", "50")


def test_models_listing_leaves_out_globs_and_lists_nothing_without_a_list():
    keys = keys_with(models=["gpt-4o", "gpt-4o-mini*"])
    page = policy.models_page(keys.lookup("vk_test_policy"))
    assert page == {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "openai"}]}
    assert policy.models_page(keys_with().lookup("vk_test_policy"))["data"] == []


def test_hashed_keys_are_found_by_the_presented_key():
    secret = "vk_hashed_client_secret"
    digest = hashlib.sha256(secret.encode()).hexdigest()
    keys = parse_keys(
        {"virtual_keys": {f"sha256:{digest}": {"provider": "openai", "api_key": "sk-test-123456", "name": "h"}}}
    )
    key = keys.lookup(secret)
    assert key is not None and key.name == "h"
    assert key.fingerprint == digest[:16]  # the same as the plain key's: spend carries over
    assert keys.lookup(f"sha256:{digest}") is None  # the hash itself is not a key
    assert keys.lookup("vk_other") is None


@pytest.mark.parametrize("fields, message", [
    ({"rpm": 0}, "rpm must be a positive whole number"),
    ({"tpm": "10"}, "tpm must be a positive whole number"),
    ({"models": "gpt-4o"}, "models must be a list"),
    ({"budget_period": "1w", "budget_usd": 1}, "budget_period must look like"),
    ({"budget_period": "1d"}, "budget_period needs budget_tokens or budget_usd"),
    ({"budget_period": "367d", "budget_usd": 1}, "budget_period can be at most 366d"),
    ({"budget_usd": -1}, "budget_usd must be a positive number"),
    ({"expires_at": "next week"}, "expires_at must be an ISO 8601 time"),
    ({"disabled": "yes"}, "disabled must be true or false"),
    ({"budget_dollars": 5}, "unknown field 'budget_dollars'"),
])
def test_invalid_policy_fields_name_the_entry_not_the_secret(fields, message):
    with pytest.raises(KeysError) as e:
        parse_keys(
            {"virtual_keys": {"vk_secret_value_xyz": {"provider": "openai", "api_key": "sk-real-secret-1", **fields}}},
            "keys.json",
        )
    text = str(e.value)
    assert message in text and text.startswith("keys.json: virtual key")
    assert "vk_secret_value_xyz" not in text and "sk-real-secret-1" not in text


def test_invalid_hashed_key_and_prices():
    with pytest.raises(KeysError, match="sha256"):
        parse_keys({"virtual_keys": {"sha256:abc": {"provider": "openai", "api_key": "k"}}})
    with pytest.raises(KeysError, match="prices.gpt-4o"):
        parse_keys({"prices": {"gpt-4o": {"input": 1}}, "virtual_keys": {"v": {"provider": "openai", "api_key": "k"}}})


def test_unnamed_keys_are_named_by_fingerprint_not_by_the_secret():
    key = parse_keys({"virtual_keys": {"vk_secret_value_xyz": {"provider": "openai", "api_key": "k"}}}).lookup(
        "vk_secret_value_xyz"
    )
    assert key.name == f"key-{key.fingerprint}"


def test_prices_exact_before_glob():
    keys = keys_with()
    assert keys.price("gpt-4o").input == 2.5
    assert keys.price("gpt-4o-mini-2024").input == 0.15
    assert keys.price("o3") is None


def test_policy_summary_for_the_keys_check():
    keys = keys_with(models=["gpt-4o"], rpm=5, budget_usd=2.5, budget_period="1d", disabled=True)
    assert (
        keys.lookup("vk_test_policy").policy.describe() == "[DISABLED; models gpt-4o; rpm 5; budget $2.5/1d]"
    )  # as written in the keys file
    assert keys_with().lookup("vk_test_policy").policy.describe() == ""


def test_remembered_price_and_model_answers_match_a_fresh_lookup_and_stay_bounded(monkeypatch):
    from addon.policy import virtual_keys as keys_module

    keys = keys_with()
    for _ in range(2):  # the second round is answered from the caches
        assert keys.price("gpt-4o").input == 2.5
        assert keys.price("gpt-4o-mini-2024").input == 0.15
        assert keys.price("o3") is None
    monkeypatch.setattr(keys_module, "MODEL_ANSWERS_KEPT", 8)
    for i in range(50):
        keys.price(f"client-chosen-{i}")
    assert len(keys._price_of) <= 8
    policy = keys_module.KeyPolicy(models=("gpt-4o*", "o3"))
    for _ in range(2):
        assert policy.allows_model("gpt-4o-mini") and policy.allows_model("o3")
        assert not policy.allows_model("o3-mini") and not policy.allows_model("claude")


# --- reservations through the rules ----------------------------------------------------

import asyncio  # noqa: E402

from addon.policy.store import Demand, StoreUnavailable, Verdict  # noqa: E402


def test_max_parallel_is_429_concurrency_limit_exceeded_with_retry_after():
    keys = keys_with(max_parallel=1)
    key, store = keys.lookup("vk_test_policy"), MemoryStore()
    ticket = policy.admit(key, "gpt-4o", keys, store, 0.0)
    assert ticket is not None
    e = refusal(keys, store=store, now=0.0)
    assert (e.status, e.code, e.headers["retry-after"]) == (429, "concurrency_limit_exceeded", "1")
    store.release(key.fingerprint, ticket)
    admitted(keys, store=store, now=0.0)


def test_a_budget_refusal_says_what_did_not_fit():
    keys = keys_with(budget_tokens=100)
    key = keys.lookup("vk_test_policy")
    with pytest.raises(GatewayError) as e:
        policy.admit(key, "gpt-4o", keys, MemoryStore(), 0.0, Demand(101))
    assert (e.value.status, e.value.code) == (429, "budget_exceeded")
    assert "holds up to 101 tokens" in e.value.message


def budget_refusal(demand, **fields) -> str:
    keys = keys_with(**fields)
    with pytest.raises(GatewayError) as e:
        policy.admit(keys.lookup("vk_test_policy"), "gpt-4o-mini", keys, MemoryStore(), 0.0, demand)
    assert (e.value.status, e.value.code) == (429, "budget_exceeded")
    return e.value.message


def demand_for(body: dict, api=None, **fields):
    """The worst case policy/worstcase.py gives `body` (raw: its JSON) for a key with `fields`."""
    from addon.apis.openai_chat import OPENAI_CHAT
    from addon.policy.worstcase import worst_case

    keys = keys_with(**fields)
    key, model = keys.lookup("vk_test_policy"), body.get("model", "gpt-4o-mini")
    return worst_case(
        key.policy, keys.price(model), body, json.dumps(body).encode(), api or OPENAI_CHAT, key.bound(model), model
    )


def test_a_budget_refusal_without_max_tokens_says_what_was_held_and_to_set_it():
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    size = len(json.dumps(body))
    message = budget_refusal(demand_for(body, budget_usd=0.005), budget_usd=0.005)
    assert message == (
        "dollar budget of this virtual key does not cover this request ($0.0000 of $0.005 used or held; "
        "this request holds up to $0.0098 while it runs: input up to "
        f"{size} tokens; no max_tokens: 16,384 output tokens held for gpt-4o-mini; set max_tokens or the key's "
        "max_output_tokens)"
    )
    assert "lower max_tokens" not in message
    tokens = budget_refusal(demand_for(body, budget_tokens=1000), budget_tokens=1000)
    assert f"holds up to {16_384 + size:,} tokens" in tokens and "no max_tokens: 16,384 output tokens" in tokens


def test_a_budget_refusal_with_max_tokens_says_to_lower_it():
    body = {"model": "gpt-4o-mini", "messages": [], "max_tokens": 500}
    assert budget_refusal(demand_for(body, budget_tokens=100), budget_tokens=100).endswith(
        f"holds up to {500 + len(json.dumps(body))} tokens while it runs: input up to {len(json.dumps(body))} tokens; "
        "max_tokens 500 output tokens; lower max_tokens to fit)")


def test_a_budget_refusal_without_output_names_no_max_tokens():
    # embeddings: no output tokens, nothing the client could lower
    from addon.apis.openai_embeddings import OPENAI_EMBEDDINGS

    body = {"model": "gpt-4o-mini", "input": "x" * 300}
    size = len(json.dumps(body))
    message = budget_refusal(demand_for(body, OPENAI_EMBEDDINGS, budget_tokens=100), budget_tokens=100)
    assert (
        message.endswith(f"holds up to {size} tokens while it runs: input up to {size} tokens)")
        and "max_tokens" not in message
    )


class AsyncStore:
    """A store that answers through an awaitable (as RedisStore does)."""

    def __init__(self, verdict=None, error=None):
        self.verdict, self.error = verdict, error

    async def reserve(self, key, limits, demand, now):
        if self.error:
            raise self.error
        return self.verdict


def test_an_async_store_admits_through_an_awaitable_and_unreachable_is_503():
    keys = keys_with(rpm=5)
    key = keys.lookup("vk_test_policy")
    pending = policy.admit(key, "gpt-4o", keys, AsyncStore(Verdict("t-1")), 0.0)
    assert asyncio.run(pending) == "t-1"
    with pytest.raises(GatewayError) as e:
        asyncio.run(policy.admit(key, "gpt-4o", keys, AsyncStore(error=StoreUnavailable("down")), 0.0))
    assert (e.value.status, e.value.code, e.value.headers) == (503, "store_unavailable", {"retry-after": "1"})
    # a key without limits never asks the store, so it keeps working while the store is down
    free = keys_with().lookup("vk_test_policy")
    assert policy.admit(free, "gpt-4o", keys_with(), AsyncStore(error=StoreUnavailable("down")), 0.0) is None
