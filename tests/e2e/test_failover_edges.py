"""Several targets per key, the edges: a failed last attempt that could not connect still
tells the SDK to retry when a healthy target is left; a stored response is asked for at the target
that made it, and only there; budgets reserve what the most generous target may answer. Through a
real gateway and the official SDKs with max_retries=0 (test_failover.py has the helpers)."""

from __future__ import annotations

import time

import anthropic
import httpx2 as httpx
import openai
import pytest

from tests.fakeprovider import Received, Reply, openai_completion
from tests.fakeresponses import StoredResponses
from tests.e2e.test_failover import (
    FIRST,
    KEY_A,
    KEY_B,
    KEY_C,
    MESSAGES,
    anthropic_reply,
    by_target,
    chat,
    closed_port,
    keys,
    ledger,
    ok,
    served_by,
    status,
    target,
)

pytestmark = pytest.mark.e2e


def refusing(key: str, **extra) -> dict:
    """A target nothing listens for: its connections are refused."""
    return {"provider": "openai", "api_key": key, "base_url": f"http://127.0.0.1:{closed_port()}/v1", **extra}


# --- 1. attempts used up by a connection failure ------------------------------------------------

def test_a_refused_last_attempt_with_a_healthy_target_left_tells_the_sdk_to_retry_there(provider, gateway_factory):
    gw = gateway_factory(keys(refusing(KEY_A, weight=FIRST), target(provider, "b", KEY_B)), ["--set", "max_attempts=1"])
    provider.reset(by_target({"b": ok}))
    with pytest.raises(openai.InternalServerError) as failed:
        chat(gw)
    response = failed.value.response
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unreachable"
    assert (response.headers["x-should-retry"], response.headers["retry-after-ms"]) == ("true", "0")
    assert provider.received == []  # one attempt: A's, refused
    # the SDK's own retry goes to B: A is cooling down
    retried = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_team", max_retries=1, timeout=20)
    assert retried.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content == "from b"
    assert served_by(provider) == ["b"]


def test_the_retry_headers_are_on_the_gateways_http2_page_too(provider, gateway_factory):
    gw = gateway_factory(keys(refusing(KEY_A, weight=FIRST), target(provider, "b", KEY_B)), ["--set", "max_attempts=1"])
    with httpx.Client(http2=True, verify=False, timeout=20) as h2:
        page = h2.post(gw.url.replace("http://", "https://") + "/v1/chat/completions",
                       json={"model": "gpt-4o", "messages": MESSAGES}, headers={"authorization": "Bearer vk_team"})
    assert page.http_version == "HTTP/2" and page.status_code == 502
    assert (page.headers["x-should-retry"], page.headers["retry-after-ms"]) == ("true", "0")
    assert provider.received == []


def test_no_headers_in_time_on_the_last_attempt_gives_a_504_that_says_retry(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B)),
                         ["--set", "max_attempts=1", "--set", "upstream_timeout=1"])
    provider.reset(by_target({"a": lambda r: Reply.json(openai_completion(r.json()), delay=4), "b": ok}))
    with pytest.raises(openai.InternalServerError) as failed:
        chat(gw)
    response = failed.value.response
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"
    assert (response.headers["x-should-retry"], response.headers["retry-after-ms"]) == ("true", "0")


def test_no_retry_header_when_no_healthy_target_is_left(provider, gateway_factory):
    gw = gateway_factory(keys(refusing(KEY_A), refusing(KEY_B)))
    with pytest.raises(openai.InternalServerError) as failed:
        chat(gw)
    response = failed.value.response
    assert response.status_code == 502
    assert "x-should-retry" not in response.headers and "retry-after-ms" not in response.headers
    assert gw.log().count("cooling down for 30s") == 2  # both were tried


def test_the_anthropic_sdk_retries_on_the_same_headers(provider, gateway_factory):
    dead = {
        "provider": "anthropic",
        "api_key": KEY_C,
        "base_url": f"http://127.0.0.1:{closed_port()}/v1",
        "weight": FIRST,
    }
    healthy = {"provider": "anthropic", "api_key": "sk-ant-target-d-444444", "base_url": f"{provider.url}/d/v1"}
    gw = gateway_factory(keys(dead, healthy), ["--set", "max_attempts=1"])
    provider.reset(by_target({"d": anthropic_reply}))
    with anthropic.Anthropic(base_url=gw.url, api_key="vk_team", max_retries=0) as once:
        with pytest.raises(anthropic.InternalServerError) as failed:
            once.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES)
    response = failed.value.response
    assert response.status_code == 502 and response.json()["type"] == "error"  # Anthropic's error shape
    assert (response.headers["x-should-retry"], response.headers["retry-after-ms"]) == ("true", "0")
    with anthropic.Anthropic(base_url=gw.url, api_key="vk_team", max_retries=1) as retrying:
        message = retrying.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES)
    assert message.content[0].text == "from claude"
    assert served_by(provider) == ["d"]


# --- 2. a stored response lives at the target that made it --------------------------------------

def responses_client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_team", max_retries=0, timeout=20)


def test_a_stored_response_is_read_continued_and_deleted_at_the_target_that_made_it(provider, gateway_factory):
    # B is the first pick, but refuses to create: the response is made at A. Later requests naming it
    # must go to A although B is healthy again and would be picked.
    gw = gateway_factory(keys(target(provider, "a", KEY_A), target(provider, "b", KEY_B, weight=FIRST)),
                         ["--set", "cooldown_s=0.3"])
    at_a, at_b = StoredResponses(), StoredResponses()

    def b(r: Received) -> Reply:
        return status(503)(r) if r.method == "POST" else at_b(r)

    provider.reset(by_target({"a": at_a, "b": b}))
    c = responses_client(gw)
    created = c.responses.with_raw_response.create(model="gpt-4.1", input="hi")
    assert created.headers["x-gateway-attempts"] == "2"
    rid = created.parse().id
    assert list(at_a.stored) == [rid]
    time.sleep(0.5)  # B's cooldown is over: it would be picked for anything else
    provider.received.clear()
    assert c.responses.retrieve(rid).id == rid
    assert c.responses.input_items.list(rid).data
    follow = c.responses.with_raw_response.create(model="gpt-4.1", input="and then?", previous_response_id=rid)
    assert follow.headers["x-gateway-attempts"] == "1"
    assert c.responses.delete(rid) is None
    assert [(r.method, r.path.split("?")[0]) for r in provider.received] == [
        ("GET", f"/a/v1/responses/{rid}"), ("GET", f"/a/v1/responses/{rid}/input_items"),
        ("POST", "/a/v1/responses"), ("DELETE", f"/a/v1/responses/{rid}")]
    assert provider.received[2].json()["previous_response_id"] == rid
    assert all(r.headers["authorization"] == f"Bearer {KEY_A}" for r in provider.received)
    # the target's label, never its key, in the ledger
    assert {row["target"] for row in ledger(gw, 5)[-4:]} == {"0"}


def test_a_stored_responses_target_failing_is_not_failed_over_and_while_it_cools_down_the_client_gets_503(
        provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B)),
                         ["--set", "cooldown_s=30"])
    at_a = StoredResponses()
    provider.reset(by_target({"a": at_a, "b": StoredResponses()}))
    c = responses_client(gw)
    rid = c.responses.create(model="gpt-4.1", input="hi").id
    provider.reset(by_target({"a": status(503), "b": StoredResponses()}))
    with pytest.raises(openai.InternalServerError) as failed:
        c.responses.retrieve(rid)
    response = failed.value.response
    assert response.status_code == 503 and "fake 503" in response.text  # A's own answer: B cannot have it
    assert "x-should-retry" not in response.headers  # a retry could only go to A again
    assert served_by(provider) == ["a"]
    # A cools down: the next request naming the response is answered at once, nothing forwarded
    with pytest.raises(openai.InternalServerError) as cooling:
        c.responses.create(model="gpt-4.1", input="more", previous_response_id=rid)
    response = cooling.value.response
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_healthy_target"
    assert "stored response" in response.json()["error"]["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert served_by(provider) == ["a"]
    # a new response, naming nothing stored, goes to B meanwhile
    assert c.responses.create(model="gpt-4.1", input="fresh").id
    assert served_by(provider) == ["a", "b"]


# --- 3. budgets reserve what any target may answer ----------------------------------------------

def test_a_token_budget_reserves_the_fallbacks_larger_default_output(provider, gateway_factory):
    # DeepSeek's deepseek-chat answers at most 8,192 tokens without max_tokens, the OpenAI
    # fallback's gpt-4o 16,384: a request reserved for DeepSeek's worst case would overshoot the
    # budget if the fallback served it
    primary = {**target(provider, "a", KEY_A), "provider": "deepseek", "model_map": {"gpt-4o": "deepseek-chat"}}
    gw = gateway_factory(keys(primary, target(provider, "b", KEY_B, fallback=True), budget_tokens=12000))

    def whole_default(r: Received) -> Reply:
        reply = openai_completion(r.json())
        reply["usage"] = {"prompt_tokens": 5, "completion_tokens": 16384, "total_tokens": 16389}
        return Reply.json(reply)

    provider.reset(by_target({"a": status(503), "b": whole_default}))
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gw)
    error = refused.value.response.json()["error"]
    assert (
        error["code"] == "budget_exceeded" and "no max_tokens: 16,384 output tokens held for gpt-4o" in error["message"]
    )
    assert provider.received == []  # refused before any attempt
    provider.reset(by_target({"a": status(503), "b": ok}))
    assert chat(gw, max_tokens=1000).headers["x-gateway-attempts"] == "2"  # what fits is served
    # the fallback got the client's body, not the one mapped for the primary
    assert [r.json()["model"] for r in provider.received] == ["deepseek-chat", "gpt-4o"]


def test_a_dollar_budget_reserves_the_priciest_model_a_fallback_serves(provider, gateway_factory):
    entry = keys(target(provider, "a", KEY_A), target(provider, "b", KEY_B, fallback=True, model="gpt-4o-luxury"),
                 budget_usd=0.05)
    entry["prices"] = {"gpt-4o": {"input": 2.5, "output": 10}, "gpt-4o-luxury": {"input": 50, "output": 100}}
    gw = gateway_factory(entry)
    provider.reset(by_target({"a": status(503), "b": ok}))
    # 1000 tokens: $0.01 at A's model, $0.10 at B's: more than the budget if B serves it
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gw, max_tokens=1000)
    assert refused.value.response.json()["error"]["code"] == "budget_exceeded"
    assert provider.received == []
    assert chat(gw, max_tokens=100).headers["x-gateway-attempts"] == "2"  # $0.01 at most: admitted, B serves it
    assert served_by(provider) == ["a", "b"]


@pytest.mark.fleet
def test_two_gateways_on_redis_send_a_stored_response_to_the_target_that_made_it(
    provider, gateway_factory, redis_server
):
    entry = keys(target(provider, "a", KEY_A), target(provider, "b", KEY_B, weight=FIRST))
    args = ["--set", f"redis_url={redis_server.url}", "--set", "cooldown_s=0.3"]
    one, two = gateway_factory(entry, args), gateway_factory(entry, args)
    at_a, at_b = StoredResponses(), StoredResponses()
    provider.reset(by_target({"a": at_a, "b": lambda r: status(503)(r) if r.method == "POST" else at_b(r)}))
    rid = responses_client(one).responses.create(model="gpt-4.1", input="hi").id
    time.sleep(1.5)  # B's cooldown is over, at both gateways
    provider.received.clear()
    for gw in (one, two, one):
        assert responses_client(gw).responses.retrieve(rid).id == rid
    assert served_by(provider) == ["a"] * 3
    record = redis_server.command("GET", f"llmgw:owner:{rid}").split(b"\r\n")[1].decode()
    creator, holder = record.split("/")
    assert len(holder) == 16 and KEY_A not in record  # the target's id (a hash), never its key
