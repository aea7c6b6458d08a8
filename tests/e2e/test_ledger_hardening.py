"""The ledger under a running gateway: a provider's absurd token counts, the ledger file deleted,
the disk full. The writer alone: tests/unit/usage/test_ledger_hardening.py."""

from __future__ import annotations

import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest


from addon.wire.tokens import MAX_TOKENS
from tests.unit.usage.test_ledger_hardening import count, fill, remove_ledger
from tests.fakeprovider import Reply, openai_completion
from tests.conftest import keys_for

REAL_KEY = "sk-real-provider-key-123456"


@pytest.mark.e2e
def test_a_provider_answer_with_10_to_the_30_tokens_loses_no_other_keys_rows(provider, gateway_factory, tmp_path):
    def answer(req):
        body = req.json()
        reply = openai_completion(body)
        if body["model"] == "gpt-4o-huge":
            reply["usage"] = {"prompt_tokens": 10**30, "completion_tokens": 1, "total_tokens": 10**30 + 1}
        return Reply.json(reply)

    provider.reset(answer)
    db = tmp_path / "usage.sqlite3"
    keys = keys_for(provider, {"vk_mallory": {"name": "mallory", "provider": "openai", "api_key": REAL_KEY},
                             "vk_bob": {"name": "bob", "provider": "openai", "api_key": REAL_KEY}})
    gw = gateway_factory(keys, ["--set", f"usage_db={db}"])

    def chat(key_model):
        key, model = key_model
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])

    work = [("vk_mallory", "gpt-4o-huge")] + [("vk_bob", "gpt-4o")] * 20
    with ThreadPoolExecutor(8) as pool:  # in flight together: one ledger batch
        list(pool.map(chat, work))
    deadline = time.monotonic() + 15
    while count(db) < 21 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(db, "key_name = 'bob' AND prompt_tokens = 5") == 20
    assert count(db, f"key_name = 'mallory' AND prompt_tokens = {MAX_TOKENS}") == 1
    assert "OverflowError" not in gw.log() and "Traceback" not in gw.log()


@pytest.mark.e2e
def test_rm_of_the_ledger_while_running_recreates_it_and_keeps_the_budget(
    provider, gateway_factory, tmp_path, sdk_body_bytes
):
    db = tmp_path / "usage.sqlite3"
    messages = [{"role": "user", "content": "hi"}]
    # a budgeted request reserves its body's bytes + max_tokens: room for exactly 10 answers of 7 tokens
    worst_case = sdk_body_bytes(messages, max_tokens=1) + 1
    keys = keys_for(provider, {"vk_budget": {"name": "budget", "provider": "openai", "api_key": REAL_KEY,
                                           "budget_tokens": 69 + worst_case},  # 63 + worst case fits, 70 + it does not
                             "vk_free": {"name": "free", "provider": "openai", "api_key": REAL_KEY}})
    gw = gateway_factory(keys, ["--set", f"usage_db={db}"])
    budget = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_budget", max_retries=0)
    free = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_free", max_retries=0)
    for _ in range(9):  # 63 tokens
        budget.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=1)
    wait_count(db, 9)
    remove_ledger(db)
    budget.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=1)  # 70: the budget is used up
    for _ in range(20):
        free.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.RateLimitError):  # the spend before the rm still counts
        budget.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=1)
    wait_count(db, 22)
    assert count(db, "key_name = 'free'") == 20 and count(db, "key_name = 'budget'") == 2  # 1 served, 1 refused
    assert gw.log().count("was deleted while the gateway ran") == 1


@pytest.mark.e2e
def test_a_full_disk_under_the_running_gateway_loses_no_row(provider, gateway_factory, tiny_disk):
    db = tiny_disk / "usage.sqlite3"
    keys = keys_for(provider, {"vk_a": {"name": "alice", "provider": "openai", "api_key": REAL_KEY}})
    gw = gateway_factory(keys, ["--set", f"usage_db={db}"])
    filler = fill(tiny_disk)
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)  # keep-alive
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(300):
        conn.request(
            "POST", "/v1/chat/completions", body, {"authorization": "Bearer vk_a", "content-type": "application/json"}
        )
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    conn.close()
    deadline = time.monotonic() + 10
    while "cannot be written" not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    filler.unlink()
    wait_count(db, 300)
    assert count(db, "key_name = 'alice'") == 300
    assert gw.log().count("cannot be written") == 1


def wait_count(db: Path, rows: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if db.exists() and count(db) >= rows:
                return
        except sqlite3.Error:
            pass
        time.sleep(0.05)
