"""Issue #11 breaks 7 and 8: the ledger against bad provider numbers, deletion and a full disk."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from addon.usage.ledger import COLUMNS, Ledger, UsageRecord
from addon.usage.tokens import MAX_TOKENS, Usage, usage_from_body, usage_from_dict
from tests.fakeprovider import Reply, openai_completion

REAL_KEY = "sk-real-provider-key-123456"


def row(ts, name="alice", fp="f1", prompt=10, completion=5, usd=0.5, estimated=False):
    return UsageRecord(ts, name, fp, "openai", "gpt-4o", 200, prompt, completion, 0, 12.5, False, usd, estimated)


def count(db: Path, where: str = "1") -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute(f"SELECT COUNT(*) FROM usage WHERE {where}").fetchone()[0]
    finally:
        con.close()


# --- break 8: bad provider numbers --------------------------------------------------------

def test_provider_numbers_are_clamped_to_the_documented_maximum():
    assert usage_from_dict({"prompt_tokens": 10**30, "completion_tokens": 3,
                            "prompt_tokens_details": {"cached_tokens": 10**40}}) == Usage(MAX_TOKENS, 3, MAX_TOKENS)
    body = json.dumps({"usage": {"prompt_tokens": 10**30, "completion_tokens": -5}}).encode()
    assert usage_from_body(body) == Usage(MAX_TOKENS, 0, 0)
    assert usage_from_dict({"prompt_tokens": 1.5e300, "completion_tokens": True}) == Usage(0, 0, 0)


def test_one_row_that_cannot_be_written_does_not_take_the_others_with_it(tmp_path, caplog):
    db = tmp_path / "u.sqlite3"
    ledger = Ledger(str(db))
    ledger.record(row(1.0, name="mallory", fp="m", prompt=10**30))  # past the clamp: SQLite cannot hold it
    for i in range(20):
        ledger.record(row(2.0 + i, name="bob", fp="b"))
    with caplog.at_level(logging.ERROR, "gateway"):
        ledger.flush()
    assert count(db, "key_name = 'bob'") == 20
    assert count(db) == 20
    assert "could not write 1 of 21 rows" in caplog.text
    ledger.close()


def test_an_older_ledger_file_gets_the_estimated_column(tmp_path):
    db = tmp_path / "old.sqlite3"
    con = sqlite3.connect(db)
    con.executescript("""CREATE TABLE usage (id INTEGER PRIMARY KEY, ts REAL NOT NULL, key_name TEXT NOT NULL,
        key_fingerprint TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL, status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
        latency_ms REAL NOT NULL, streamed INTEGER NOT NULL, cost_usd REAL NOT NULL);
        INSERT INTO usage VALUES (1, 1.0, 'old', 'f0', 'openai', 'gpt-4o', 200, 1, 2, 0, 3.0, 0, 0.1);""")
    con.commit()
    con.close()
    ledger = Ledger(str(db))
    ledger.record(row(2.0, estimated=True))
    ledger.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT key_name, estimated FROM usage ORDER BY id").fetchall() == [("old", 0), ("alice", 1)]
    assert [r[1] for r in con.execute("PRAGMA table_info(usage)")][1:] == list(COLUMNS)
    con.close()


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
    keys = {"providers": {"openai": {"base_url": provider.url + "/v1"}},
            "virtual_keys": {"vk_mallory": {"name": "mallory", "provider": "openai", "api_key": REAL_KEY},
                             "vk_bob": {"name": "bob", "provider": "openai", "api_key": REAL_KEY}}}
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
