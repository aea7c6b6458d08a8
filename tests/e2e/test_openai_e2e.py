"""End to end: the official openai SDK -> real gateway process -> fake provider on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests import rawhttp
from tests.fakeprovider import Reply, default_reply, openai_stream
from tests.conftest import keys_for, openai_key

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-openai-real-key-aaaa1111"
DEEPSEEK_KEY = "sk-deepseek-real-key-bbbb2222"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory):
    return gateway_factory(keys_for(provider_server, {
            "vk_openai": {"provider": "openai", "api_key": OPENAI_KEY},
            "vk_deepseek": {"provider": "deepseek", "api_key": DEEPSEEK_KEY, "base_url": provider_server.url + "/ds"},
            "vk_down": {"provider": "openai", "api_key": "sk-down-real-key-cccc3333", "base_url": "http://127.0.0.1:9/v1"},
        }))


def client(gateway, key="vk_openai", **kw):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, **kw)


def test_plain_completion(gateway, provider):
    resp = client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.2)
    assert resp.choices[0].message.content == "hello"
    assert resp.usage.total_tokens == 7
    [got] = provider.received
    assert (got.method, got.path) == ("POST", "/v1/chat/completions")
    assert got.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert got.headers["host"] == f"127.0.0.1:{provider.port}"
    assert "vk_openai" not in json.dumps(got.headers)
    assert got.json() == {"model": "gpt-4o", "messages": MESSAGES, "temperature": 0.2}


def test_deepseek_routes_to_its_base_url(gateway, provider):
    resp = client(gateway, "vk_deepseek").chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert resp.model == "deepseek-chat"
    [got] = provider.received
    assert got.path == "/ds/chat/completions"
    assert got.headers["authorization"] == f"Bearer {DEEPSEEK_KEY}"


def test_streaming_is_forwarded_chunk_by_chunk(gateway, provider):
    first_seen = threading.Event()
    provider.handler = lambda req: Reply.sse(
        openai_stream(req.json(), pieces=("a", "b", "c")), hold_after_first=first_seen
    )
    stream = client(gateway).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = []
    for chunk in stream:
        first_seen.set()  # the provider sends the rest only after we saw the first chunk
        chunks.append(chunk)
    assert provider.holds_released == [True], "the first chunk was held back by the gateway"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert chunks[-1].usage.completion_tokens == 3
    assert provider.received[0].headers["accept-encoding"] == "identity"


def test_unknown_key_bad_json_and_unknown_path_never_reach_the_provider(gateway, provider):
    with pytest.raises(openai.AuthenticationError) as e:
        client(gateway, "vk_nope").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.body["code"] == "invalid_api_key"
    auth = {"authorization": "Bearer vk_openai"}
    r = rawhttp.request(gateway.url, "POST", "/v1/chat/completions", content=b'{"model": ', headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = rawhttp.request(gateway.url, "POST", "/v1/completions", json={"model": "x", "prompt": "y"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = rawhttp.request(gateway.url, "GET", "/v1/chat/completions", headers=auth)
    assert r.status_code == 405
    with pytest.raises(openai.NotFoundError):
        client(gateway).files.list()
    assert provider.received == []


def test_provider_errors_pass_through_with_status(gateway, provider):
    provider.handler = lambda req: Reply.json(
        {
            "error": {
                "message": "Rate limit reached for gpt-4o",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        429,
    )
    with pytest.raises(openai.RateLimitError) as e:
        client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "Rate limit reached" in e.value.message
    provider.handler = lambda req: Reply(503, b"upstream overloaded", {"content-type": "text/plain"})
    with pytest.raises(openai.InternalServerError) as e:
        client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.status_code == 503 and "upstream overloaded" in e.value.message


def test_unreachable_provider_is_a_json_502(gateway, provider):
    with pytest.raises(openai.InternalServerError) as e:
        client(gateway, "vk_down").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.status_code == 502
    assert e.value.body["code"] == "upstream_unreachable"
    assert "127.0.0.1" not in e.value.message and ":9" not in e.value.message  # the address is logged, not told
    deadline = time.monotonic() + 10  # the gateway's output is read on a thread: the line may lag the answer
    while "provider unreachable" not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "provider unreachable" in gateway.log() and "127.0.0.1', 9" in gateway.log()


def test_gzip_passthrough_reaches_the_client_decoded(gateway, provider):
    provider.handler = lambda req: Reply.json(default_reply(req) and json.loads(default_reply(req).body), gzip=True)
    resp = client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert resp.choices[0].message.content == "hello"


def test_concurrent_requests_with_different_keys_do_not_cross(gateway, provider):
    def echo(req):
        body = req.json()
        return Reply.json(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {
                            "role": "assistant",
                            "content": body["messages"][0]["content"] + "|" + req.headers["authorization"][-4:],
                        },
                    }
                ],
            },
            delay=0.01,
        )
    provider.handler = echo
    expected_suffix = {"vk_openai": OPENAI_KEY[-4:], "vk_deepseek": DEEPSEEK_KEY[-4:]}

    def call(i):
        key = "vk_openai" if i % 2 else "vk_deepseek"
        r = client(gateway, key).chat.completions.create(model=f"m{i}", messages=[{"role": "user", "content": f"n{i}"}])
        return key, i, r

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(48)))
    for key, i, r in results:
        assert r.model == f"m{i}"
        assert r.choices[0].message.content == f"n{i}|{expected_suffix[key]}"
    assert len(provider.received) == 48


def test_no_real_key_in_the_gateway_log(gateway):
    log = gateway.log()
    for secret in (OPENAI_KEY, DEEPSEEK_KEY, "sk-down-real-key-cccc3333"):
        assert secret not in log


def test_slow_provider_gets_a_json_504(provider, gateway_factory):
    gw = gateway_factory(keys_for(provider, {"vk_slow": openai_key("sk-slow-real-key-dddd4444")}),
                         extra_args=["--set", "upstream_timeout=0.5"])
    provider.handler = lambda req: Reply.json({"late": True}, delay=5)
    with pytest.raises(openai.InternalServerError) as e:
        client(gw, "vk_slow").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.status_code == 504
    assert e.value.body["code"] == "upstream_timeout"
    # the gateway keeps serving after a timeout
    provider.handler = default_reply
    assert (
        client(gw, "vk_slow").chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content
        == "hello"
    )


def test_verbose_logging_never_prints_a_real_key(provider, gateway_factory):
    secret, down_secret = "sk-verbose-real-key-eeee5555", "sk-verbose-down-key-ffff6666"
    gw = gateway_factory(keys_for(provider, {"vk_verbose": {"provider": "openai", "api_key": secret},
                                           "vk_verbose_down": {"provider": "openai", "api_key": down_secret,
                                                               "base_url": "http://127.0.0.1:9/v1"}}),
                         extra_args=["--set", "flow_detail=4"])
    client(gw, "vk_verbose").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    list(client(gw, "vk_verbose").chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    with pytest.raises(openai.InternalServerError):
        client(gw, "vk_verbose_down").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    log = gw.log()
    assert "authorization: redacted" in log.lower()  # headers were printed, after redaction
    assert secret not in log and down_secret not in log
    assert "vk_verbose" not in log  # the virtual key is a client's secret too
