"""Worst cases that are true bounds, through a real gateway against the fake provider, on both
stores (MemoryStore, and a real redis-server): `n`, image URLs and inline screenshots, the model's
own maximum output, and a key's max_output_tokens sent to the provider. The fake provider bills
what it was asked for (the body's bytes, n x the maximum output), slowly, so requests overlap."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fakeprovider import Received, Reply, openai_completion
from tests.fakeresponses import response
from tests.services.redis import RedisServer

pytestmark = pytest.mark.e2e

REAL = "sk-real-provider-key-bounds-4242"
PRICES = {"gpt-4o": {"input": 2.5, "output": 10.0}, "gpt-4o-mini": {"input": 0.15, "output": 0.6},
          "gpt-5": {"input": 1.25, "output": 10.0}}
KEYS = {
    "vk_n": {"budget_tokens": 2000},
    "vk_n_usd": {"budget_usd": 0.01},
    "vk_images": {"budget_tokens": 2000},
    "vk_screens": {"budget_tokens": 1_000_000},
    "vk_screens_tpm": {"tpm": 100_000},
    "vk_gpt5": {"budget_tokens": 100_000},
    "vk_capped": {"budget_tokens": 100_000, "max_output_tokens": 4096},
    "vk_cap_only": {"max_output_tokens": 300},
}


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.fleet)])
def gateway(request, provider_server, gateway_factory, tmp_path_factory):
    server = RedisServer().start() if request.param == "redis" else None
    ledger = tmp_path_factory.mktemp("bounds") / "usage.sqlite3"
    keys = {
        "providers": {
            "openai": {"base_url": provider_server.url + "/v1"},
            "deepseek": {"base_url": provider_server.url},
        },
        "prices": PRICES,
        "virtual_keys": {
            vk: {"provider": "openai", "api_key": REAL, "name": vk[3:], **entry} for vk, entry in KEYS.items()
        },
    }
    keys["virtual_keys"]["vk_cap_target"] = {"name": "cap_target", "targets": [
        {"provider": "deepseek", "api_key": REAL, "max_output_tokens": 200}]}
    args = ["--set", f"usage_db={ledger}"] + (["--set", f"redis_url={server.url}"] if server else [])
    gw = gateway_factory(keys, args)
    gw.ledger = ledger
    yield gw
    gw.stop()
    if server:
        server.close()


def bills_what_was_asked(req: Received) -> Reply:
    """A chat answer using everything it was allowed: prompt = its bytes, completion = n x the
    maximum (as a provider that writes to the limit would), after 0.3 s."""
    body = req.json()
    reply = openai_completion(body)
    most = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    prompt, completion = len(req.body), most * (body.get("n") or 1)
    reply["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return Reply.json(reply, delay=0.3)


def post(gw, key: str, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    request = urllib.request.Request(gw.url + path, method="POST", data=json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def at_once(gw, key: str, body: dict, count: int) -> list[tuple[int, dict]]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: post(gw, key, body), range(count)))


def billed(gw, key_name: str, timeout: float = 10.0) -> int:
    """Tokens the ledger counted for the key, once its rows are written (the writer batches)."""
    deadline = time.monotonic() + timeout
    total, last = None, -1
    while time.monotonic() < deadline:
        db = sqlite3.connect(gw.ledger)
        try:
            total = db.execute(
                "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage WHERE key_name = ?", (key_name,)
            ).fetchone()[0]
        except sqlite3.OperationalError:
            total = 0
        db.close()
        if total == last:
            return total
        last = total
        time.sleep(0.5)
    return total


def chat(model="gpt-4o", content="hi", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def test_n_multiplies_what_a_request_holds_so_concurrent_ones_cannot_overshoot(gateway, provider):
    # n=100 with max_tokens 15: each may use 1,500 output tokens. Holding only max_tokens, 16 of
    # 20 concurrent requests fitted a 2,000-token budget and 25,000 tokens were billed
    provider.reset(bills_what_was_asked)
    results = at_once(gateway, "vk_n", chat(max_tokens=15, n=100), 20)
    admitted = [b for s, b in results if s == 200]
    refused = [b for s, b in results if s != 200]
    assert len(admitted) == 1 and len(provider.received) == 1
    asked = sum(len(r.body) + r.json()["max_tokens"] * r.json()["n"] for r in provider.received)
    assert asked <= 2000 and billed(gateway, "n") == asked
    assert {b["error"]["code"] for b in refused} == {"budget_exceeded"}
    assert "max_tokens 15 x n 100 = 1,500 output tokens; lower max_tokens or n to fit" in refused[0]["error"]["message"]


def test_n_128_of_1000_tokens_is_refused_on_a_one_cent_budget(gateway, provider):
    provider.reset(bills_what_was_asked)
    status, body = post(gateway, "vk_n_usd", chat("gpt-4o-mini", max_tokens=1000, n=128))
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")  # it may cost $0.0768
    assert "holds up to $0.07" in body["error"]["message"] and provider.received == []


def image_parts(urls: list[str]) -> list[dict]:
    return [{"type": "text", "text": "what differs?"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]


def test_ten_image_urls_in_a_small_body_are_held_at_an_images_tokens_each(gateway, provider):
    # an 816-byte body with ten image URLs was billed 60,418 tokens against 2,000
    provider.reset(bills_what_was_asked)
    body = chat(content=image_parts([f"https://img.example/{i:02d}.png" for i in range(10)]), max_tokens=10)
    assert len(json.dumps(body)) < 1000
    status, answer = post(gateway, "vk_images", body)
    assert (status, answer["error"]["code"]) == (429, "budget_exceeded")
    assert "(10 images at 1,445 each)" in answer["error"]["message"] and provider.received == []
    status, _ = post(gateway, "vk_images", chat(content=image_parts(["https://img.example/one.png"]), max_tokens=10))
    assert status == 200  # one image (1,445) and the text fit


def test_a_2mb_screenshot_is_held_at_one_images_tokens_not_two_million(gateway, provider):
    # bytes are not tokens for an image: a 2 MB base64 screenshot held 2,000,000 tokens, so a
    # 1,000,000-token budget refused it and a tpm key let one through at a time
    provider.reset(bills_what_was_asked)
    data = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 6000).decode()
    body = chat(content=image_parts([f"data:image/png;base64,{data}"]), max_tokens=100)
    assert len(json.dumps(body)) > 2_000_000
    assert post(gateway, "vk_screens", body)[0] == 200
    results = at_once(gateway, "vk_screens_tpm", body, 3)
    assert [s for s, _ in results] == [200, 200, 200] and provider.max_in_flight >= 2


def test_without_max_tokens_the_models_own_maximum_is_held_and_the_refusal_says_so(gateway, provider):
    provider.reset(bills_what_was_asked)
    status, body = post(gateway, "vk_gpt5", chat("gpt-5"))  # gpt-5 may answer 128,000 tokens: not 32,768
    assert (status, body["error"]["code"]) == (429, "budget_exceeded") and provider.received == []
    assert (
        "no max_tokens: 128,000 output tokens held for gpt-5; set max_tokens or the key's max_output_tokens"
        in body["error"]["message"]
    )
    assert "lower max_tokens" not in body["error"]["message"]
    assert post(gateway, "vk_gpt5", chat("gpt-5", max_tokens=1000))[0] == 200


def test_a_keys_max_output_tokens_is_sent_when_the_client_names_none_and_bounds_hold_and_spend(gateway, provider):
    provider.reset(bills_what_was_asked)
    assert post(gateway, "vk_capped", chat("gpt-5"))[0] == 200  # held 4,096, not 128,000
    assert post(gateway, "vk_capped", chat("gpt-5", max_tokens=50_000))[0] == 200  # lowered to 4,096
    assert post(gateway, "vk_capped", chat("gpt-5", max_tokens=100))[0] == 200
    sent = [r.json() for r in provider.received]
    assert [b.get("max_completion_tokens") for b in sent] == [4096, None, None]
    assert [b.get("max_tokens") for b in sent] == [None, 4096, 100]
    assert billed(gateway, "capped") == sum(len(r.body) for r in provider.received) + 4096 + 4096 + 100
    provider.reset(lambda req: Reply.json(response(req.json())))
    assert post(gateway, "vk_cap_only", {"model": "gpt-4o", "input": "hi"}, "/v1/responses")[0] == 200
    assert provider.received[-1].json()["max_output_tokens"] == 300  # the Responses API's own field
    provider.reset(bills_what_was_asked)
    assert post(gateway, "vk_cap_target", chat("deepseek-chat"))[0] == 200
    assert provider.received[-1].json()["max_tokens"] == 200  # a target's own, in the field DeepSeek reads
