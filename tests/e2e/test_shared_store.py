"""Limits shared in Redis: two real gateway processes (standing for two workers or two machines)
with one real redis-server enforce one key's limits as one gateway. Clients are the openai SDK
and plain HTTP; the fake provider records what it was asked and how many requests it held at once.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from addon.wire.secrets import fingerprint
from tests.fakeprovider import Reply, openai_completion, worst_case_reply
from tests.conftest import keys_for, openai_key

pytestmark = [pytest.mark.fleet, pytest.mark.e2e]

REAL_KEY = "sk-real-provider-key-shared-789"
MESSAGES = [{"role": "user", "content": "hi"}]


def keys_file(provider, **entries) -> dict:
    return keys_for(provider, {vk: openai_key(REAL_KEY, name=vk, **entry) for vk, entry in entries.items()},
                    prices={"gpt-4o": {"input": 2.5, "output": 10.0}})


def two_gateways(gateway_factory, keys: dict, redis_url: str):
    args = ["--set", f"redis_url={redis_url}"]
    return gateway_factory(keys, args), gateway_factory(keys, args)


def post(gw, key: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """One chat completion over plain HTTP: status, JSON body, headers."""
    body = body or {"model": "gpt-4o", "messages": MESSAGES}
    request = urllib.request.Request(gw.url + "/v1/chat/completions", method="POST", data=json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def spread(gateways, n: int, key: str, body: dict | None = None) -> list[tuple[int, dict, dict]]:
    """`n` requests at once, alternating between the gateways."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: post(gateways[i % len(gateways)], key, body), range(n)))


def codes(results) -> dict:
    out: dict = {}
    for status, body, _ in results:
        label = status if status == 200 else (status, body["error"]["code"])
        out[label] = out.get(label, 0) + 1
    return out


def test_rpm_5_under_40_concurrent_requests_over_two_gateways_lets_exactly_5_through(
    provider, gateway_factory, redis_server
):
    gateways = two_gateways(gateway_factory, keys_file(provider, vk_rpm={"rpm": 5}), redis_server.url)
    results = spread(gateways, 40, "vk_rpm")
    assert codes(results) == {200: 5, (429, "rate_limit_exceeded"): 35}
    assert len(provider.received) == 5
    assert all(1 <= int(h["retry-after"]) <= 60 for s, _, h in results if s == 429)


def test_a_token_budget_under_30_concurrent_requests_is_never_overshot(provider, gateway_factory, redis_server):
    # every answer uses all it reserved (body bytes + max_tokens), slowly, so the requests overlap
    provider.reset(worst_case_reply)
    budget = 1000
    gateways = two_gateways(gateway_factory, keys_file(provider, vk_budget={"budget_tokens": budget}), redis_server.url)
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 100}
    results = spread(gateways, 30, "vk_budget", body)
    counted = codes(results)
    assert set(counted) <= {200, (429, "budget_exceeded")}
    # each request reserves its body bytes + 100; what the provider was asked for stays within the budget
    asked = sum(len(r.body) + r.json()["max_tokens"] for r in provider.received)
    assert 0 < asked <= budget
    assert counted[200] == len(provider.received) >= 5  # ~175 a request: at least 5 fit, none past the budget
    used = sum(b["usage"]["total_tokens"] for s, b, _ in results if s == 200)
    assert used <= budget
    # and when they are done, the budget is spent by what was used, not by what was reserved
    left = budget - used
    small = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 1}
    status, _, _ = post(gateways[0], "vk_budget", small)
    assert status == (200 if left >= len(json.dumps(small)) + 1 else 429)


def test_max_parallel_2_the_provider_never_sees_more_than_2_at_once(provider, gateway_factory, redis_server):
    provider.reset(lambda req: Reply.json(openai_completion(req.json()), delay=0.4))
    gateways = two_gateways(gateway_factory, keys_file(provider, vk_par={"max_parallel": 2}), redis_server.url)
    results = spread(gateways, 12, "vk_par")
    counted = codes(results)
    assert provider.max_in_flight == 2
    assert counted[200] >= 2 and counted[200] + counted.get((429, "concurrency_limit_exceeded"), 0) == 12
    assert all(h["retry-after"] == "1" for s, _, h in results if s == 429)
    # the slots were given back as the responses ended: two more fit at once again
    assert codes(spread(gateways, 2, "vk_par")) == {200: 2}


def test_a_client_that_hangs_up_gives_its_slot_back(provider, gateway_factory, redis_server):
    provider.reset(lambda req: Reply.json(openai_completion(req.json()), delay=30))  # never answers in time
    gateways = two_gateways(gateway_factory, keys_file(provider, vk_one={"max_parallel": 1}), redis_server.url)
    client = openai.OpenAI(base_url=gateways[0].url + "/v1", api_key="vk_one", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    provider.reset()  # answers at once from now on
    deadline = time.monotonic() + 15
    while (status := post(gateways[1], "vk_one")[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)  # the hang-up reaches the gateway, which releases the slot
    assert status == 200


def test_redis_stopped_limited_keys_503_unlimited_keys_work_and_it_recovers(provider, gateway_factory, redis_server):
    keys = keys_file(provider, vk_limited={"rpm": 100}, vk_free={})
    gw = gateway_factory(keys, ["--set", f"redis_url={redis_server.url}"])
    assert post(gw, "vk_limited")[0] == 200
    redis_server.stop()
    for _ in range(3):
        status, body, headers = post(gw, "vk_limited")
        assert (status, body["error"]["code"], headers.get("retry-after")) == (503, "store_unavailable", "1")
        assert post(gw, "vk_free")[0] == 200
    assert len(provider.received) == 4  # the first limited one and the free ones; no 503 was forwarded
    redis_server.start()
    assert post(gw, "vk_limited")[0] == 200  # no restart: the client reconnects
    log = gw.log()
    assert log.count("unreachable") == 1  # one line per outage, not one per request
    assert log.count("reachable again") == 1
    assert REAL_KEY not in log and "vk_limited" not in log


def test_spend_lives_in_redis_and_is_seeded_from_the_ledger_when_redis_starts_empty(
    provider, gateway_factory, redis_server, tmp_path
):
    db = tmp_path / "usage.sqlite3"
    # prices: a default answer (5 + 2 tokens) costs $1; max_tokens 2 reserves $1
    keys = keys_file(provider, vk_usd={"budget_usd": 2.5})
    keys["prices"] = {"gpt-4o": {"input": 0, "output": 500_000}}
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2}
    first = gateway_factory(keys, ["--set", f"usage_db={db}"])  # no Redis yet: the ledger alone
    assert post(first, "vk_usd", body)[0] == 200
    first.stop()
    # Redis is empty: the gateway loads the ledger's $1 into it
    seeded = gateway_factory(keys, ["--set", f"redis_url={redis_server.url}", "--set", f"usage_db={db}"])
    assert post(seeded, "vk_usd", body)[0] == 200  # $1 + $1 reserved: fits in $2.50
    seeded.stop()
    # a gateway with an empty ledger of its own: the spend is Redis's
    other = gateway_factory(
        keys, ["--set", f"redis_url={redis_server.url}", "--set", f"usage_db={tmp_path / 'other.sqlite3'}"]
    )
    status, answer, _ = post(other, "vk_usd", body)  # $2 spent + $1 reserved > $2.50
    assert (status, answer["error"]["code"]) == (429, "budget_exceeded")
    assert len(provider.received) == 2
    names = redis_server.command("KEYS", "*")
    assert b"llmgw:" in names
    assert b"vk_usd" not in names  # keyed by fingerprint, never the virtual key


def test_redis_restarted_empty_mid_run_is_seeded_again_from_the_ledger(
    provider, gateway_factory, redis_server, tmp_path
):
    # prices: a default answer (5 + 2 tokens) costs $1; max_tokens 2 reserves $1
    keys = keys_file(provider, vk_usd={"budget_usd": 2.5})
    keys["prices"] = {"gpt-4o": {"input": 0, "output": 500_000}}
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2}
    gw = gateway_factory(
        keys, ["--set", f"redis_url={redis_server.url}", "--set", f"usage_db={tmp_path / 'usage.sqlite3'}"]
    )
    assert post(gw, "vk_usd", body)[0] == 200
    assert post(gw, "vk_usd", body)[0] == 200  # $2 spent
    redis_server.stop()
    redis_server.start()  # no persistence: Redis comes back with nothing in it
    assert redis_server.command("KEYS", "*") == b"*0\r\n"
    status, answer, _ = post(gw, "vk_usd", body)  # the ledger's $2 + $1 reserved > $2.50
    assert (status, answer["error"]["code"]) == (429, "budget_exceeded"), answer
    assert len(provider.received) == 2
    spend = f"llmgw:{fingerprint('vk_usd')}:spend"
    assert redis_server.command("HGET", spend, "t") == b"$2\r\n14\r\n"  # the ledger's 2 x 7 tokens, loaded once
    log = gw.log()
    assert log.count("was empty") == 2, log  # at start-up, and once after the restart


def test_a_long_request_keeps_its_slot_past_the_lease_and_a_killed_workers_slot_frees_after_it(
    provider, gateway_factory, redis_server
):
    """max_parallel: 1, a 4 s lease (renewed every third of it). A request held by the provider
    for three leases keeps its slot: the other gateway refuses all along. Its gateway is then
    killed (kill -9) still holding it: nothing releases the slot, and the other gateway admits a
    request once the lease has run out (a condition wait; the deadline only bounds a hang)."""
    lease = 4.0
    stalled = threading.Event()  # the provider sends half its answer, then waits for this (at most 30 s)
    first = []

    def handler(req):
        if not first:
            first.append(req)
            return Reply.json(openai_completion(req.json()), stall=stalled)
        return Reply.json(openai_completion(req.json()))

    provider.reset(handler)
    args = ["--set", f"redis_url={redis_server.url}", "--set", f"reservation_lease={lease}"]
    keys = keys_file(provider, vk_one={"max_parallel": 1})
    holder, other = gateway_factory(keys, args), gateway_factory(keys, args)
    try:
        threading.Thread(target=lambda: _ignore_errors(post, holder, "vk_one"), daemon=True).start()
        assert provider.wait_received(1)
        end = time.monotonic() + 3 * lease
        refused = 0
        while time.monotonic() < end:
            status, body, _ = post(other, "vk_one")
            assert (status, body["error"]["code"]) == (429, "concurrency_limit_exceeded")
            refused += 1
            time.sleep(0.5)
        assert refused >= 3 and len(provider.received) == 1  # nothing else reached the provider
        holder.proc.kill()  # kill -9: no release, no more renewals
        holder.proc.wait(10)
        deadline = time.monotonic() + lease + 60
        while (status := post(other, "vk_one")[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200
        assert len(provider.received) == 2
    finally:
        stalled.set()


def _ignore_errors(call, *args):
    try:
        call(*args)
    except Exception:
        pass
