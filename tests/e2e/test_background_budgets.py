"""Background responses are charged (Responses `background: true`), through a real gateway on both
stores (MemoryStore, a real redis-server), against a fake provider that behaves as OpenAI documents
background mode: a create answers `queued` with `usage: null`, each GET moves it on (queued ->
in_progress -> completed with its usage), GET ?stream=true streams it to its end, cancel makes one
still running `cancelled` with `usage: null`.

A create holds its worst case until a later GET, stream or cancel shows the final usage, which
settles it once; one nobody asks about again is charged its worst case when its hold expires
(`background_hold`, 3 s here). Never free."""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.fakeresponses import StoredResponses
from tests.services.redis import RedisServer

pytestmark = pytest.mark.e2e

REAL = "sk-real-provider-key-background-31"
HOLD = 3  # seconds: --set background_hold
USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 16_300,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 16_311}
KEYS = {
    "vk_bg": {"budget_tokens": 50_000},
    "vk_bg_abandoned": {"budget_tokens": 40_000},
    "vk_bg_stream": {"budget_tokens": 200_000},
    "vk_bg_cancel": {"budget_tokens": 100_000},
    "vk_bg_free": {},
}


def keys_file(url: str) -> dict:
    return {
        "providers": {"openai": {"base_url": url + "/v1"}},
        "prices": {"gpt-4o": {"input": 2.5, "output": 10.0}},
        "virtual_keys": {
            vk: {"provider": "openai", "api_key": REAL, "name": vk[3:], **entry} for vk, entry in KEYS.items()
        },
    }


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.fleet)])
def gateway(request, provider_server, gateway_factory, tmp_path_factory):
    server = RedisServer().start() if request.param == "redis" else None
    ledger = tmp_path_factory.mktemp("background") / "usage.sqlite3"
    args = ["--set", f"usage_db={ledger}", "--set", f"background_hold={HOLD}"]
    gw = gateway_factory(
        keys_file(provider_server.url), args + (["--set", f"redis_url={server.url}"] if server else [])
    )
    gw.ledger = ledger
    yield gw
    gw.stop()
    if server:
        server.close()


@pytest.fixture
def fake(provider):
    provider.handler = StoredResponses(USAGE)
    return provider.handler


def call(gw, method: str, path: str, key: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        gw.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def create(gw, key: str, **fields) -> tuple[int, dict]:
    return call(
        gw, "POST", "/v1/responses", key, {"model": "gpt-4o", "input": "write at length", "background": True, **fields}
    )


def rows(gw, key_name: str) -> list[dict]:
    db = sqlite3.connect(gw.ledger)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM usage WHERE key_name = ? ORDER BY id", (key_name,))]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def tokens(gw, key_name: str, settle: float = 0.6) -> int:
    """The key's tokens in the ledger once they stop changing (rows are written in batches)."""
    last = None
    for _ in range(40):
        total = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows(gw, key_name))
        if total == last:
            return total
        last = total
        time.sleep(settle)
    return last


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("not reached in time")


def test_background_creates_hold_their_worst_case_until_a_get_shows_the_usage(gateway, fake):
    # 10 background creates each answered queued with usage null; they were charged 0, the GETs
    # that carried 16,311 tokens each were never counted, and the budget kept admitting
    answers = [create(gateway, "vk_bg") for _ in range(10)]
    admitted = [a for s, a in answers if s == 200]
    assert [a["status"] for a in admitted] == ["queued"] * 3  # each holds 16,384 (gpt-4o's most) + its bytes
    refused = [a for s, a in answers if s != 200]
    assert len(refused) == 7 and {a["error"]["code"] for a in refused} == {"budget_exceeded"}
    assert "no max_output_tokens: 16,384 output tokens held for gpt-4o" in refused[0]["error"]["message"]
    for answer in admitted:
        assert call(gateway, "GET", f"/v1/responses/{answer['id']}", "vk_bg")[1]["status"] == "in_progress"
        done = call(gateway, "GET", f"/v1/responses/{answer['id']}", "vk_bg")[1]
        assert (done["status"], done["usage"]["total_tokens"]) == ("completed", 16_311)
        call(gateway, "GET", f"/v1/responses/{answer['id']}", "vk_bg")  # again: counted once
    assert tokens(gateway, "bg") == 3 * 16_311
    assert not any(r["estimated"] for r in rows(gateway, "bg"))
    status, answer = create(gateway, "vk_bg", max_output_tokens=2000)  # 48,933 spent: 2,000 more does not fit
    assert (status, answer["error"]["code"]) == (429, "budget_exceeded")
    assert "48,933 of 50,000 used or held" in answer["error"]["message"]


def test_an_abandoned_background_response_is_charged_its_worst_case_when_its_hold_expires(gateway, fake):
    status, answer = create(gateway, "vk_bg_abandoned")
    assert status == 200
    charged = wait_for(lambda: [r for r in rows(gateway, "bg_abandoned") if r["estimated"]], timeout=HOLD + 15)
    [row] = charged
    body_bytes = len(json.dumps({"model": "gpt-4o", "input": "write at length", "background": True}))
    assert (row["prompt_tokens"], row["completion_tokens"]) == (body_bytes, 16_384)  # its worst case
    assert row["model"] == "gpt-4o" and row["cost_usd"] == pytest.approx((body_bytes * 2.5 + 16_384 * 10.0) / 1e6)
    assert "charged its worst case" in gateway.log()
    worst = body_bytes + 16_384
    # asked about later, it shows its real usage: counted already, not again
    call(gateway, "GET", f"/v1/responses/{answer['id']}", "vk_bg_abandoned")
    call(gateway, "GET", f"/v1/responses/{answer['id']}", "vk_bg_abandoned")
    assert tokens(gateway, "bg_abandoned") == worst
    status, answer = create(gateway, "vk_bg_abandoned", max_output_tokens=30_000)
    assert status == 429 and f"{worst:,} of 40,000 used or held" in answer["error"]["message"]


def test_a_get_stream_settles_it_and_a_cancel_without_usage_keeps_holding_it(gateway, fake):
    status, answer = create(gateway, "vk_bg_stream")
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request("GET", f"/v1/responses/{answer['id']}?stream=true", headers={"authorization": "Bearer vk_bg_stream"})
    streamed = conn.getresponse().read()
    conn.close()
    assert b"response.completed" in streamed
    assert tokens(gateway, "bg_stream") == 16_311
    # a cancelled one shows no usage: still held, then charged its worst case when the hold expires
    status, answer = create(gateway, "vk_bg_cancel")
    cancelled = call(gateway, "POST", f"/v1/responses/{answer['id']}/cancel", "vk_bg_cancel")
    assert cancelled[0] == 200 and (cancelled[1]["status"], cancelled[1]["usage"]) == ("cancelled", None)
    status, refused = create(gateway, "vk_bg_cancel", max_output_tokens=90_000)
    assert status == 429 and "used or held" in refused["error"]["message"]  # held: 16,4xx + 90,0xx > 100,000
    wait_for(lambda: [r for r in rows(gateway, "bg_cancel") if r["estimated"]], timeout=HOLD + 15)
    assert tokens(gateway, "bg_cancel") > 16_384


def test_a_background_stream_the_client_left_is_held_then_settled_by_a_get(gateway, fake):
    fake.stream_hold = threading.Event()  # the provider holds the stream after its first event
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    body = json.dumps({"model": "gpt-4o", "input": "go", "background": True, "stream": True})
    conn.request(
        "POST", "/v1/responses", body, {"authorization": "Bearer vk_bg_stream", "content-type": "application/json"}
    )
    reply = conn.getresponse()
    first = reply.read1(65536)
    rid = json.loads(first.split(b"data: ", 1)[1].split(b"\n", 1)[0])["response"]["id"]
    conn.close()  # the client leaves; the response runs on at the provider
    fake.stream_hold.set()
    before = tokens(gateway, "bg_stream")
    done = call(gateway, "GET", f"/v1/responses/{rid}", "vk_bg_stream")[1]
    assert done["status"] == "completed"
    assert tokens(gateway, "bg_stream") == before + 16_311  # the real usage, not an estimate of what was streamed
    assert not any(r["estimated"] for r in rows(gateway, "bg_stream"))


def test_a_key_without_limits_still_counts_a_background_responses_usage_once(gateway, fake):
    status, answer = create(gateway, "vk_bg_free")
    for _ in range(3):
        call(gateway, "GET", f"/v1/responses/{answer['id']}", "vk_bg_free")
    assert tokens(gateway, "bg_free") == 16_311


def test_memorystore_holds_are_charged_at_a_stop_never_lost(provider, gateway_factory, tmp_path):
    provider.handler = StoredResponses(USAGE)
    ledger = tmp_path / "usage.sqlite3"
    args = ["--set", f"usage_db={ledger}", "--set", "background_hold=3600"]
    gw = gateway_factory(keys_file(provider.url), args)
    assert create(gw, "vk_bg_abandoned")[0] == 200
    gw.proc.terminate()
    gw.proc.wait(30)
    gw.ledger = ledger
    [row] = rows(gw, "bg_abandoned")[1:]  # after the create's own row
    assert row["estimated"] == 1 and row["completion_tokens"] == 16_384
    again = gateway_factory(keys_file(provider.url), args)
    status, answer = create(again, "vk_bg_abandoned", max_output_tokens=30_000)
    assert status == 429 and f"{row['prompt_tokens'] + 16_384:,} of 40,000 used or held" in answer["error"]["message"]
