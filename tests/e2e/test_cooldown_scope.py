"""Cooldowns only for what is the target's fault, and scoped to the model (docs/failover.md): one
key's request must not take a shared target away from the other keys. Real gateways (and Redis)
in front of a fake provider answering as OpenAI documents; the openai SDK with max_retries=0."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.fakeprovider import Received, Reply
from tests.e2e.test_failover import FIRST, KEY_A, KEY_B, MESSAGES, by_target, ok, served_by, target

pytestmark = pytest.mark.e2e

TPM = 30_000  # the fake account's tokens per minute: a body over 4 bytes a token of it is "too large"


def pool(provider, **attacker) -> dict:
    """Two keys sharing one pool of two targets: the attacker's (with its own limits) and another."""
    return {"pools": {"shared": [target(provider, "a", KEY_A), target(provider, "b", KEY_B)]},
            "virtual_keys": {"vk_attacker": {"name": "attacker", "targets": "shared", **attacker},
                             "vk_other": {"name": "other", "targets": "shared"}}}


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def until_both_served(c: openai.OpenAI, provider, since: int, most: int = 30) -> list:
    """Requests until each target has answered one since `since` (each pick is a random draw:
    six requests miss a target 3% of the time, thirty about 2e-9); their raw answers."""
    answers = []
    while len(answers) < most and {r.path.split("/")[1] for r in provider.received[since:]} != {"a", "b"}:
        answers.append(c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES))
    return answers


def openai_error(status: int, message: str, type_: str, code: str | None) -> Reply:
    return Reply.json({"error": {"message": message, "type": type_, "param": None, "code": code}}, status)


def tpm_account(r: Received) -> Reply:
    """OpenAI's answer to a request that alone is over the account's TPM: 429, "Request too large"."""
    requested = len(r.body) // 4
    if requested > TPM:
        return openai_error(
            429,
            f"Request too large for gpt-4o in organization org-fake on tokens per min (TPM): Limit "
            f"{TPM}, Requested {requested}. The input or output tokens must be reduced in order to run "
            "successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
            "tokens",
            "rate_limit_exceeded",
        )
    return ok(r)


def test_a_request_too_large_for_the_accounts_window_fails_alone_and_cools_nothing(provider, gateway_factory):
    """The attack: an rpm-1 key sent one 250 kB request, answered 429 as OpenAI answers a request
    over the account's TPM; both pool targets cooled for 30 s and another key got 503
    no_healthy_target for 29 s."""
    gw = gateway_factory(pool(provider, rpm=1))
    provider.reset(tpm_account)
    big = [{"role": "user", "content": "x" * 250_000}]
    with pytest.raises(openai.RateLimitError) as refused:
        client(gw, "vk_attacker").chat.completions.create(model="gpt-4o", messages=big)
    assert "Request too large" in refused.value.message  # the provider's own answer, to the one who asked
    assert refused.value.response.headers["x-gateway-attempts"] == "1"  # not sent on to the other target
    assert len(provider.received) == 1
    answers = until_both_served(client(gw, "vk_other"), provider, since=1)
    assert all(raw.headers["x-gateway-attempts"] == "1" for raw in answers)
    assert {r.path.split("/")[1] for r in provider.received[1:]} == {"a", "b"}  # both still picked
    assert "cooling down" not in gw.log()


def test_a_model_access_403_fails_alone_and_cools_nothing(provider, gateway_factory):
    """The attack: one request answered 403 took both targets out for 600 s (auth_cooldown_s).
    A 403 for a model the account may not use (or whose name asks for trouble: the provider quotes
    it back) is the request's own."""
    gw = gateway_factory(pool(provider))

    def account(r: Received) -> Reply:
        model = r.json()["model"]
        if model != "gpt-4o":
            return openai_error(403, f"Project `proj_fake` does not have access to model `{model}`",
                                "invalid_request_error", "model_not_found")
        return ok(r)

    provider.reset(account)
    attacker = client(gw, "vk_attacker")
    for model in ("o3-restricted", "gpt-x. Your API key has been revoked"):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            attacker.chat.completions.create(model=model, messages=MESSAGES)
        assert (
            refused.value.response.headers["x-gateway-attempts"] == "1"
            and "does not have access" in refused.value.message
        )
    assert len(provider.received) == 2
    answers = until_both_served(client(gw, "vk_other"), provider, since=2)
    assert all(raw.headers["x-gateway-attempts"] == "1" for raw in answers)
    assert {r.path.split("/")[1] for r in provider.received[2:]} == {"a", "b"}
    assert "cooling down" not in gw.log()


def test_a_403_saying_the_key_is_revoked_still_takes_the_target_out(provider, gateway_factory):
    gw = gateway_factory(pool(provider), ["--set", "cooldown_s=0.1"])
    revoked = lambda r: openai_error(403, "The API key has been revoked.", "invalid_request_error", "api_key_revoked")  # noqa: E731
    provider.reset(by_target({"a": revoked, "b": ok}))
    other = client(gw, "vk_other")
    attempts = [
        other.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES).headers["x-gateway-attempts"]
        for _ in range(12)
    ]
    time.sleep(0.3)  # longer than cooldown_s: a revoked key is not an ordinary failure
    attempts += [
        other.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES).headers["x-gateway-attempts"]
        for _ in range(12)
    ]
    assert attempts.count("2") == 1 and served_by(provider).count("a") == 1  # tried once, then skipped
    log = gw.log()
    assert log.count("refused its key, HTTP 403") == 1 and "cooling down for 600s (the provider" in log
    assert KEY_A not in log


def test_an_exhausted_quota_takes_the_target_out(provider, gateway_factory):
    gw = gateway_factory(pool(provider))
    quota = lambda r: openai_error(429, "You exceeded your current quota, please check your plan and billing details.",  # noqa: E731
                                   "insufficient_quota", "insufficient_quota")
    provider.reset(by_target({"a": quota, "b": ok}))
    other = client(gw, "vk_other")
    for _ in range(12):
        other.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert served_by(provider).count("a") == 1
    assert "cooling down for 600s (HTTP 429, the account's quota)" in gw.log()


def model_503(r: Received) -> Reply:
    """Target A's gpt-4o is overloaded; its other models answer."""
    if r.path.startswith("/a/") and r.json()["model"] == "gpt-4o":
        return Reply.json({"error": {"message": "That model is currently overloaded with other requests.",
                                     "type": "server_error", "param": None, "code": None}}, 503)
    return Reply.json(json.loads(ok(r).body) | {"model": r.json()["model"]})


def targets_of(gw_key_client, model: str, n: int) -> list[str]:
    return [
        gw_key_client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES).headers[
            "x-gateway-attempts"
        ]
        for _ in range(n)
    ]


def weighted(provider) -> dict:
    return {"virtual_keys": {"vk_team": {"name": "team-alpha", "targets": [
        target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B)]}}}


def test_one_models_trouble_leaves_the_targets_other_models_alone(provider, gateway_factory):
    gw = gateway_factory(weighted(provider))
    provider.reset(model_503)
    team = client(gw, "vk_team")
    assert targets_of(team, "gpt-4o", 1) == ["2"]  # A failed, B answered; A cools down for gpt-4o
    assert targets_of(team, "gpt-4o", 5) == ["1"] * 5  # A skipped for gpt-4o (it is the first pick)
    assert targets_of(team, "gpt-4o-mini", 5) == ["1"] * 5
    assert served_by(provider) == ["a", "b"] + ["b"] * 5 + ["a"] * 5  # A still serves gpt-4o-mini
    assert "cooling down for 30s for model 'gpt-4o' (HTTP 503)" in gw.log()


@pytest.mark.fleet
def test_a_models_cooldown_shared_through_redis_leaves_the_other_models_alone(provider, gateway_factory, redis_server):
    one, two = (gateway_factory(weighted(provider), ["--set", f"redis_url={redis_server.url}"]) for _ in range(2))
    provider.reset(model_503)
    assert targets_of(client(one, "vk_team"), "gpt-4o", 1) == ["2"]
    time.sleep(1.5)  # the other gateway reads the shared cooldowns every 0.5 s
    team = client(two, "vk_team")
    assert targets_of(team, "gpt-4o", 5) == ["1"] * 5
    assert targets_of(team, "gpt-4o-mini", 5) == ["1"] * 5
    assert served_by(provider) == ["a", "b"] + ["b"] * 5 + ["a"] * 5


@pytest.mark.fleet
def test_on_redis_too_a_request_too_large_cools_nothing(provider, gateway_factory, redis_server):
    one, two = (gateway_factory(pool(provider, rpm=1), ["--set", f"redis_url={redis_server.url}"]) for _ in range(2))
    provider.reset(tpm_account)
    with pytest.raises(openai.RateLimitError):
        client(one, "vk_attacker").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x" * 250_000}]
        )
    time.sleep(1.5)
    for gw in (one, two):
        for _ in range(4):
            client(gw, "vk_other").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(provider.received) == 9
