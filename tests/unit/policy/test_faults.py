"""Whose fault a failed attempt was (policy/targets.fault), and cooldowns per target x model on
both stores' cooldown tables: what a failure may take away from the other keys sharing a target."""

from __future__ import annotations

import json
import logging
import random

import pytest

from addon.policy.keys_parse import parse_keys
from addon.policy.memory_store import MemoryStore
from addon.policy.targets import MODEL, REQUEST, TARGET, cool, fault, healthy, pick, retry_after

NOW = 1_800_000_000.0


def openai_error(message: str, type_: str = "invalid_request_error", code: str | None = None) -> str:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def anthropic_error(type_: str, message: str) -> str:
    return json.dumps({"type": "error", "error": {"type": type_, "message": message}})


# OpenAI's words for a request over the account's tokens-per-minute window on its own
TOO_LARGE = openai_error(
    "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
    "Requested 62000. The input or output tokens must be reduced in order to run successfully. "
    "Visit https://platform.openai.com/account/rate-limits to learn more.",
    "tokens",
    "rate_limit_exceeded",
)
RATE_LIMITED = openai_error(
    "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
    "Used 29000, Requested 2000. Please try again in 2s.",
    "tokens",
    "rate_limit_exceeded",
)


@pytest.mark.parametrize(
    "body",
    [
        TOO_LARGE,
        # the same, worded otherwise: the request alone is over the limit
        openai_error(
            "Limit 6000, Requested 12000, please reduce your message size and try again.",
            "tokens",
            "rate_limit_exceeded",
        ),
        openai_error(
            "This model's maximum context length is 128000 tokens. However, your messages resulted in 250000 tokens.",
            code="context_length_exceeded",
        ),
        anthropic_error("invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"),
    ],
)
def test_a_429_tied_to_the_request_is_its_own_fault(body):
    assert fault(429, body, model="gpt-4o").scope == REQUEST


@pytest.mark.parametrize(
    "body",
    [
        RATE_LIMITED,
        openai_error(
            "Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): Limit 3, Used 3, Requested 1.",
            "requests",
            "rate_limit_exceeded",
        ),
        # Anthropic's: "would exceed", with what others used: a real rate limit, whatever it asks to reduce
        anthropic_error(
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 20,000 input "
            "tokens per minute. Please reduce the prompt length or the maximum tokens requested, or try again later.",
        ),
        "",
        "<html>Too Many Requests</html>",
    ],
)
def test_a_rate_limit_cools_the_target_for_that_model(body):
    judged = fault(429, body, model="gpt-4o")
    assert (judged.scope, judged.key) == (MODEL, False)


def test_an_exhausted_quota_is_the_whole_accounts():
    body = openai_error("You exceeded your current quota, please check your plan and billing details.",
                        "insufficient_quota", "insufficient_quota")
    assert fault(429, body, model="gpt-4o") == (TARGET, True, "HTTP 429, the account's quota")


@pytest.mark.parametrize(
    "body",
    [
        openai_error("Project `proj_abc` does not have access to model `gpt-4o`", code="model_not_found"),
        openai_error(
            "Your organization must be verified to use the model `o3`. Please go to: "
            "https://platform.openai.com/settings/organization/general and click on Verify Organization."
        ),
        openai_error("You are not allowed to sample from this model"),
        openai_error(
            "Country, region, or territory not supported", "request_forbidden", "unsupported_country_region_territory"
        ),
        anthropic_error("permission_error", "Your API key does not have permission to use the specified resource."),
        openai_error("Your request was rejected as a result of our safety system.", code="content_policy_violation"),
        "",
        "<html><body>403 Forbidden</body></html>",
    ],
)
def test_a_403_for_a_model_or_a_content_is_the_requests_own(body):
    assert fault(403, body, model="gpt-4o").scope == REQUEST


@pytest.mark.parametrize(
    "body",
    [
        openai_error("Incorrect API key provided: sk-...abc.", code="invalid_api_key"),
        openai_error("The API key has been revoked."),
        openai_error("Your account has been deactivated.", code="account_deactivated"),
        anthropic_error("authentication_error", "invalid x-api-key"),
        anthropic_error("permission_error", "This organization has been disabled."),
        json.dumps(
            {
                "error": {
                    "code": 403,
                    "message": "Permission denied: Consumer 'api_key:AIza...' has been suspended.",
                    "status": "PERMISSION_DENIED",
                    "details": [{"reason": "CONSUMER_SUSPENDED"}],
                }
            }
        ),
        json.dumps(
            {
                "error": {
                    "code": 403,
                    "message": "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to call this API.",
                    "status": "PERMISSION_DENIED",
                }
            }
        ),
        "Access denied due to invalid subscription key or wrong API endpoint.",
    ],
)
def test_a_403_saying_the_key_is_invalid_or_revoked_cools_the_whole_target(body):
    assert fault(403, body, model="gpt-4o") == (TARGET, True, "the provider refused its key, HTTP 403")


def test_a_model_name_quoted_by_the_provider_cannot_make_a_403_read_as_a_revoked_key():
    model = "x. The API key has been revoked"  # the client chose it; the provider quotes it back
    body = openai_error(f"Project `proj_abc` does not have access to model `{model}`", code="model_not_found")
    assert fault(403, body, model=model).scope == REQUEST
    quota = "exceeded your current quota"
    assert fault(429, openai_error(f"Rate limit reached for {quota} on requests per min"), model=quota).scope == MODEL


def test_the_other_failures():
    assert fault(401, "") == (TARGET, True, "the provider refused its key, HTTP 401")
    for status in (500, 502, 503, 504, 529):
        assert fault(status, "") == (MODEL, False, f"HTTP {status}")
    assert fault(None, error="connect: [Errno 111] Connection refused").scope == TARGET
    assert fault(None, error="peer closed connection").scope == MODEL


def test_a_huge_or_deeply_nested_error_body_is_read_boundedly():
    assert fault(403, "[" * 100_000).scope == REQUEST
    assert (
        fault(403, json.dumps({"error": {"message": "x" * 10_000 + " invalid api key"}})).scope == REQUEST
    )  # past what is read
    assert fault(403, json.dumps([[{"code": "invalid_api_key"}]] * 1000)).scope == TARGET


def key(*targets):
    conf = [
        {"provider": provider, "api_key": f"sk-real-fault-{i}-000000", **extra}
        for i, (provider, extra) in enumerate(targets)
    ]
    return parse_keys({"virtual_keys": {"vk": {"name": "team-alpha", "targets": conf}}}).lookup("vk")


def test_a_models_cooldown_leaves_the_targets_other_models(caplog):
    vk, store = key(("openai", {"weight": 1000}), ("openai", {})), MemoryStore()
    with caplog.at_level(logging.INFO, logger="gateway"):
        cool(vk, 0, store, 30, NOW, "HTTP 503", model="gpt-4o")
    assert (
        "target openai[0] (sk-...000) of team-alpha cooling down for 30s for model 'gpt-4o' (HTTP 503)" in caplog.text
    )
    draws = [random.Random(i).random for i in range(50)]
    assert {pick(vk, store, NOW, rand=r, model="gpt-4o") for r in draws} == {1}
    assert {pick(vk, store, NOW, rand=r, model="gpt-4o-mini") for r in draws} == {0}
    assert not healthy(vk, vk.targets[0], store, NOW, "gpt-4o") and healthy(
        vk, vk.targets[0], store, NOW, "gpt-4o-mini"
    )
    assert healthy(vk, vk.targets[0], store, NOW)  # the target as a whole (what metrics show as up)
    cool(vk, 1, store, 10, NOW, "HTTP 503", model="gpt-4o")
    assert pick(vk, store, NOW, model="gpt-4o") is None and retry_after(vk, store, NOW, "gpt-4o") == 10
    assert pick(vk, store, NOW, model="gpt-4o-mini") == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert pick(vk, store, NOW + 11, model="gpt-4o") == 1
    assert "target openai[1] (sk-...000) of team-alpha is healthy again for model 'gpt-4o'" in caplog.text


def test_a_model_cooldown_is_of_the_model_the_target_serves():
    # B serves every request as claude-sonnet-4-6: its cooldown for that model covers any requested model
    vk = key(("openai", {"weight": 1000}), ("anthropic", {"model": "claude-sonnet-4-6"}))
    store = MemoryStore()
    cool(vk, 1, store, 30, NOW, "HTTP 529", model="claude-sonnet-4-6")
    cool(vk, 0, store, 30, NOW, "HTTP 503", model="gpt-4o")
    assert pick(vk, store, NOW, model="gpt-4o") is None
    assert pick(vk, store, NOW, model="gpt-4o-mini") == 0
    store.forget_cooldown(vk.targets[0].id + ":gpt-4o")
    assert pick(vk, store, NOW, model="gpt-4o") == 0


def test_a_whole_target_cooldown_covers_every_model():
    vk, store = key(("openai", {"weight": 1000}), ("openai", {})), MemoryStore()
    cool(vk, 0, store, 600, NOW, "the provider refused its key, HTTP 401")
    assert {
        pick(vk, store, NOW, rand=random.Random(i).random, model=m) for i in range(20) for m in ("a", "b", None)
    } == {1}


def test_cooldowns_of_models_nobody_asks_for_again_do_not_pile_up():
    """Per-model cooldowns are named by a model the client chose: those no pick looks at again
    are dropped once over, as the table grows."""
    from addon.policy.cooldowns import COOLDOWNS_SWEEP

    vk, store = key(("openai", {}), ("openai", {})), MemoryStore()
    for i in range(50_000):  # a model a second, each cooling 30 s
        cool(vk, 0, store, 30, NOW + i, "HTTP 503", model=f"model-{i}")
    assert len(store.cooldowns) <= 2 * COOLDOWNS_SWEEP
    assert store.cooldown_until(vk.targets[0].id + ":model-49999") == NOW + 49_999 + 30  # the running ones kept
    assert all(store.cooldown_until(vk.targets[0].id + f":model-{i}") for i in range(49_971, 50_000))
