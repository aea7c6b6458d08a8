"""Key policy, usage ledger and hot reload through a real gateway process and the openai SDK."""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import urllib.error
import urllib.request
import openai
import pytest

from addon.usage.ledger import format_table, usage_table
from tests.fakeprovider import Reply, openai_stream

pytestmark = pytest.mark.e2e

REAL_KEY = "sk-real-provider-key-123456"
MESSAGES = [{"role": "user", "content": "hi"}]
# $1 per default fake reply (5 prompt + 2 completion tokens)
PRICES = {"gpt-4o": {"input": 100_000, "output": 250_000}, "deepseek-chat": {"input": 0.27, "output": 1.1},
          # $1 per default reply too, but prompts are free: a reservation of max_tokens=2 costs $1
          "gpt-4o-output-priced": {"input": 0, "output": 500_000}}


def keys_file(provider, **entries) -> dict:
    return {
        "providers": {"openai": {"base_url": provider.url + "/v1"}, "deepseek": {"base_url": provider.url}},
        "prices": PRICES,
        "virtual_keys": {vk: {"provider": "openai", "api_key": REAL_KEY, **entry} for vk, entry in entries.items()},
    }


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def chat(gw, key: str, model: str = "gpt-4o", **kw):
    return client(gw, key).chat.completions.create(model=model, messages=MESSAGES, **kw)


def ledger_rows(path: Path, count: int, timeout: float = 10.0) -> list[dict]:
    """The ledger's rows once `count` are written (the writer is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            db = sqlite3.connect(path)
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]
            db.close()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
        elif time.monotonic() > deadline:
            return []
        time.sleep(0.05)


def http(gw, method: str, path: str, key: str, body: dict | None = None) -> tuple[int, bytes]:
    """A plain HTTP request (stdlib): raw bytes, no SDK in between."""
    request = urllib.request.Request(
        gw.url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError("condition not reached")


# --- rules -----------------------------------------------------------------------------


def test_model_not_allowed_is_403_and_not_forwarded(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_models={"models": ["gpt-4o", "gpt-4o-mini*"]}))
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(gw, "vk_models", "gpt-4.1")
    assert e.value.status_code == 403 and e.value.code == "model_not_allowed"
    assert e.value.body["param"] == "model"
    assert provider.received == []
    assert chat(gw, "vk_models", "gpt-4o-mini-2024-07-18").choices[0].message.content == "hello"
    assert len(provider.received) == 1


def test_models_listing_with_the_sdk(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_list={"models": ["gpt-4o", "o3", "gpt-4o-mini*"]}, vk_none={}))
    models = client(gw, "vk_list").models.list()
    assert [m.id for m in models] == ["gpt-4o", "o3"]  # globs cannot be listed
    assert all(m.owned_by == "openai" for m in models)
    assert client(gw, "vk_list").models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        client(gw, "vk_list").models.retrieve("gpt-5")
    assert list(client(gw, "vk_none").models.list()) == []
    # a key without a models list may use any model: retrieve must not say otherwise
    assert client(gw, "vk_none").models.retrieve("gpt-4o").id == "gpt-4o"
    status, bare = http(gw, "GET", "/models", "vk_list")
    assert status == 200 and json.loads(bare)["object"] == "list" and len(json.loads(bare)["data"]) == 2
    with pytest.raises(openai.AuthenticationError):
        client(gw, "vk_wrong").models.list()
    assert provider.received == []


@pytest.mark.parametrize("entry, code", [
    ({"disabled": True}, "key_disabled"),
    ({"expires_at": "2020-01-01T00:00:00Z"}, "key_expired"),
])
def test_disabled_and_expired_keys_are_401_and_not_forwarded(provider, gateway_factory, entry, code):
    gw = gateway_factory(keys_file(provider, vk_off={"models": ["gpt-4o"], **entry}))
    with pytest.raises(openai.AuthenticationError) as e:
        chat(gw, "vk_off")
    assert e.value.code == code
    with pytest.raises(openai.AuthenticationError):
        client(gw, "vk_off").models.list()
    assert provider.received == []


def test_a_future_expiry_is_accepted(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_later={"expires_at": "2999-01-01T00:00:00+00:00"}))
    chat(gw, "vk_later")
    assert len(provider.received) == 1


def test_rpm_under_concurrent_requests(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_rpm={"rpm": 3}, vk_other={"rpm": 3}))
    sdk = client(gw, "vk_rpm")

    def one(_):
        try:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            return 200
        except openai.RateLimitError as e:
            assert e.code == "rate_limit_exceeded"
            assert 1 <= int(e.response.headers["retry-after"]) <= 60
            return 429

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(one, range(12)))
    assert statuses.count(200) == 3 and statuses.count(429) == 9
    assert len(provider.received) == 3
    chat(gw, "vk_other")  # limits are per key
    assert len(provider.received) == 4


def test_tpm_refuses_once_the_minute_is_used(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_tpm={"tpm": 7}))
    chat(gw, "vk_tpm")  # 7 tokens, counted in the response hook, before the client gets the body
    with pytest.raises(openai.RateLimitError) as e:
        chat(gw, "vk_tpm")
    assert e.value.code == "rate_limit_exceeded" and "tpm" in e.value.message
    assert "retry-after" in e.value.response.headers
    assert len(provider.received) == 1


def test_token_budget_is_429_budget_exceeded_and_not_retried(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_budget={"budget_tokens": 200, "budget_period": "1d"}))
    chat(gw, "vk_budget", max_tokens=10)  # its worst case (body bytes + 10) fits; it uses 7
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_budget", max_retries=3)  # must not retry
    with pytest.raises(openai.RateLimitError) as e:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "budget_exceeded"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert len(provider.received) == 1


def test_dollar_budget_and_tpm_survive_a_restart(provider, gateway_factory, tmp_path):
    db = tmp_path / "usage.sqlite3"
    keys = keys_file(provider, vk_usd={"name": "alice", "budget_usd": 1.5}, vk_tpm={"name": "tim", "tpm": 7})
    first = gateway_factory(keys, ["--set", f"usage_db={db}"])
    chat(first, "vk_usd", "gpt-4o-output-priced", max_tokens=2)  # reserves $1 of $1.50, costs $1.00
    chat(first, "vk_tpm")  # 7 tokens: this minute's tpm is used
    first.stop()  # a clean stop writes every queued row
    assert len(ledger_rows(db, 2)) == 2

    second = gateway_factory(keys, ["--set", f"usage_db={db}"])
    with pytest.raises(openai.RateLimitError) as e:  # $1 spent + $1 reserved > $1.50
        chat(second, "vk_usd", "gpt-4o-output-priced", max_tokens=2)
    assert e.value.code == "budget_exceeded"
    with pytest.raises(openai.RateLimitError) as e:
        chat(second, "vk_tpm")
    assert e.value.code == "rate_limit_exceeded"
    assert len(provider.received) == 2


def test_dollar_budget_refuses_a_model_without_price(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_usd={"budget_usd": 10}))
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(gw, "vk_usd", "some-unpriced-model")
    assert e.value.code == "model_not_priced"
    assert provider.received == []


# --- ledger and stream usage -----------------------------------------------------------


def test_ledger_rows_and_usage_table_without_secrets(provider, gateway_factory, tmp_path):
    db = tmp_path / "usage.sqlite3"
    gw = gateway_factory(
        keys_file(provider, vk_ledger_secret={"name": "bob", "models": ["gpt-4o"]}), ["--set", f"usage_db={db}"]
    )
    chat(gw, "vk_ledger_secret")
    with pytest.raises(openai.PermissionDeniedError):
        chat(gw, "vk_ledger_secret", "o3")
    rows = ledger_rows(db, 2)
    assert [
        (r["key_name"], r["model"], r["status"], r["prompt_tokens"], r["completion_tokens"], r["streamed"])
        for r in rows
    ] == [
        ("bob", "gpt-4o", 200, 5, 2, 0),
        ("bob", "o3", 403, 0, 0, 0),
    ]
    assert rows[0]["cost_usd"] == pytest.approx(1.0)
    assert rows[0]["key_fingerprint"] == hashlib.sha256(b"vk_ledger_secret").hexdigest()[:16]
    table = format_table(usage_table(str(db), key="bob"))
    assert "bob" in table and "1.000000" in table
    gw.stop()
    for path in tmp_path.iterdir():  # the db and its WAL
        assert b"vk_ledger_secret" not in path.read_bytes() and REAL_KEY.encode() not in path.read_bytes()


def raw_stream(gw, key: str, body: dict) -> bytes:
    status, data = http(gw, "POST", "/v1/chat/completions", key, body)
    assert status == 200
    return data


def test_openai_stream_usage_is_recorded_and_hidden_from_a_client_that_did_not_ask(provider, gateway_factory, tmp_path):
    db = tmp_path / "usage.sqlite3"
    gw = gateway_factory(keys_file(provider, vk_s={"name": "s"}), ["--set", f"usage_db={db}"])
    seen = raw_stream(gw, "vk_s", {"model": "gpt-4o", "messages": MESSAGES, "stream": True})
    assert provider.received[-1].json()["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in seen and b'"choices": []' not in seen and seen.endswith(b"data: [DONE]\n\n")
    assert b"hel" in seen and b"lo" in seen

    chunks = list(chat(gw, "vk_s", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == 5 and chunks[-1].choices == []

    rows = ledger_rows(db, 2)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["streamed"]) for r in rows] == [(5, 2, 1), (5, 2, 1)]


def test_a_stream_sent_with_content_length_still_ends_when_its_usage_is_stripped(provider, gateway_factory, tmp_path):
    # an OpenAI-compatible server (or a caching proxy) may send the SSE body whole, with a
    # content-length: the stripped usage chunk shortens it, so that length must not reach the client
    provider.reset(lambda req: Reply(200, b"".join(openai_stream(req.json())), {"content-type": "text/event-stream"}))
    db = tmp_path / "usage.sqlite3"
    gw = gateway_factory(keys_file(provider, vk_s={"name": "s"}), ["--set", f"usage_db={db}"])
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_s", max_retries=0, timeout=10)
    chunks = list(sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    assert all(c.usage is None for c in chunks)
    # the SDK stops at [DONE]; a client reading to the end of the body (curl) must get there too
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        body = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True}).encode()
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer vk_s\r\n"
            b"content-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while chunk := conn.recv(65536):  # a wrong content-length would leave this waiting
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert b"content-length" not in head.lower() and b"transfer-encoding: chunked" in head.lower()
    assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") and b'"usage"' not in rest
    assert [r["prompt_tokens"] for r in ledger_rows(db, 2)] == [5, 5]


def deepseek_stream(req) -> Reply:
    def chunk(delta, finish=None, **extra):
        return {"id": "ds-1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-chat",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    usage = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15,
             "prompt_cache_hit_tokens": 3, "prompt_cache_miss_tokens": 8}
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "hey"}),
        chunk({"content": ""}, "stop", usage=usage),
    ]
    return Reply.sse([b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"])


def test_deepseek_stream_usage_on_the_last_content_chunk(provider, gateway_factory, tmp_path):
    provider.reset(deepseek_stream)
    db = tmp_path / "usage.sqlite3"
    keys = keys_file(provider)
    keys["virtual_keys"]["vk_ds"] = {"provider": "deepseek", "api_key": REAL_KEY, "name": "ds"}
    gw = gateway_factory(keys, ["--set", f"usage_db={db}"])
    chunks = list(chat(gw, "vk_ds", "deepseek-chat", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hey"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage is None
    asked = list(chat(gw, "vk_ds", "deepseek-chat", stream=True, stream_options={"include_usage": True}))
    assert asked[-1].usage.completion_tokens == 4
    rows = ledger_rows(db, 2)
    assert [(r["provider"], r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"]) for r in rows] == [
        ("deepseek", 11, 4, 3)
    ] * 2
    assert rows[0]["cost_usd"] == pytest.approx((11 * 0.27 + 4 * 1.1) / 1e6)


# --- keys -------------------------------------------------------------------------------


def test_hashed_key(provider, gateway_factory):
    secret = "vk_only_the_client_knows_this"
    keys = keys_file(provider)
    keys["virtual_keys"][f"sha256:{hashlib.sha256(secret.encode()).hexdigest()}"] = {
        "provider": "openai", "api_key": REAL_KEY, "name": "hashed", "models": ["gpt-4o"]}
    gw = gateway_factory(keys)
    assert chat(gw, secret).choices[0].message.content == "hello"
    with pytest.raises(openai.PermissionDeniedError):
        chat(gw, secret, "o3")
    with pytest.raises(openai.AuthenticationError):
        chat(gw, "sha256:" + hashlib.sha256(secret.encode()).hexdigest())
    assert len(provider.received) == 1
    assert secret not in gw.log()


def test_hot_reload_valid_and_invalid_edits(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_a={"name": "a"}), ["--set", "keys_reload_ms=200"])
    keys_path = Path(gw.keys_file)
    with pytest.raises(openai.AuthenticationError):
        chat(gw, "vk_b")

    # a valid edit: a new key, and a policy on the old one
    keys_path.write_text(json.dumps(keys_file(provider, vk_a={"name": "a", "models": ["o3"]}, vk_b={"name": "b"})))
    wait_for(lambda: "keys file reloaded" in gw.log())
    assert chat(gw, "vk_b").choices[0].message.content == "hello"
    with pytest.raises(openai.PermissionDeniedError):
        chat(gw, "vk_a", "gpt-4o")

    # an invalid edit keeps the keys in force and says so once
    keys_path.write_text('{"virtual_keys": {"vk_c": ')
    wait_for(lambda: "not reloaded" in gw.log())
    assert chat(gw, "vk_b").choices[0].message.content == "hello"
    keys_path.write_text(json.dumps({"virtual_keys": {"vk_c": {"provider": "openai", "api_key": REAL_KEY, "rpn": 1}}}))
    wait_for(lambda: gw.log().count("not reloaded") == 2)
    assert "unknown field 'rpn'" in gw.log()
    assert chat(gw, "vk_b").choices[0].message.content == "hello"
    assert gw.log().count("not reloaded") == 2  # one line per bad edit, not one per poll
    assert REAL_KEY not in gw.log()


def test_hot_reload_leaves_requests_in_flight_alone(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_a={"name": "a"}), ["--set", "keys_reload_ms=200"])
    def slow(req):
        events = openai_stream(req.json(), pieces=("one", "two", "three"))
        return Reply.sse(events, delay=0.2)

    provider.reset(slow)
    text = []
    for c in chat(gw, "vk_a", stream=True):
        if not text:  # revoke the key while its request is streaming
            Path(gw.keys_file).write_text(json.dumps(keys_file(provider, vk_b={"name": "b"})))
            wait_for(lambda: "keys file reloaded" in gw.log())
        text.append(c.choices[0].delta.content or "")
    assert "".join(text) == "onetwothree"
    with pytest.raises(openai.AuthenticationError):
        chat(gw, "vk_a")


def test_a_budget_is_charged_what_requests_used_not_what_they_reserved(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider, vk_budget={"budget_tokens": 300}))
    served = 0
    while served < 100:
        try:
            chat(gw, "vk_budget", max_tokens=1)  # reserves its body bytes + 1; uses 7
        except openai.RateLimitError as e:
            assert e.code == "budget_exceeded"
            break
        served += 1
    worst_case = len(provider.received[0].body) + 1
    # admitted while 7 per answer so far + this one's worst case fit in 300 (charged the worst case: 3)
    assert served == (300 - worst_case) // 7 + 1
    assert len(provider.received) == served
