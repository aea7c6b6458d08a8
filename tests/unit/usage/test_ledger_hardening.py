"""Issue #11 breaks 7 and 8: the ledger against bad provider numbers, deletion and a full disk."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from addon.usage.ledger_sql import COLUMNS, UsageRecord

from addon.usage.sqlite import SQLiteLedger
from addon.wire.tokens import MAX_TOKENS, Usage, usage_from_body, usage_from_dict
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
    ledger = SQLiteLedger(str(db))
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
    ledger = SQLiteLedger(str(db))
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


# --- break 7: a deleted ledger, a full disk -------------------------------------------------

def remove_ledger(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):  # rm usage.sqlite3*
        Path(str(db) + suffix).unlink(missing_ok=True)


def test_a_deleted_ledger_is_recreated_loudly_and_later_rows_go_to_it(tmp_path, caplog):
    db = tmp_path / "u.sqlite3"
    ledger = SQLiteLedger(str(db))
    ledger.record(row(1.0))
    ledger.flush()
    remove_ledger(db)
    ledger.checkpoint()  # the WAL checkpoint must not quietly recreate an empty file
    assert not db.exists()
    with caplog.at_level(logging.ERROR, "gateway"):
        for i in range(200):
            ledger.record(row(2.0 + i))
        ledger.flush()
    assert count(db) == 200
    assert "was deleted while the gateway ran" in caplog.text
    ledger.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KB tmpfs (root can mount one): a disk that really fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    import subprocess
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_rows_wait_out_a_full_disk_and_are_written_when_space_comes_back(tiny_disk, caplog):
    db = tiny_disk / "u.sqlite3"
    ledger = SQLiteLedger(str(db))
    ledger.record(row(0.0))
    ledger.flush()
    filler = fill(tiny_disk)
    with caplog.at_level(logging.ERROR, "gateway"):
        for batch in range(6):  # 300 rows over several flushes while the disk is full
            for i in range(50):
                ledger.record(row(1.0 + batch * 50 + i, name="bob"))
            ledger.flush()
        full = [r.getMessage() for r in caplog.records]
        filler.unlink()
        ledger.flush()
    assert count(db, "key_name = 'bob'") == 300
    assert len(full) == 1 and "full" in full[0]  # one line, not one per batch
    assert "written again" in caplog.records[-1].getMessage()
    ledger.close()


@pytest.mark.e2e
def test_rm_of_the_ledger_while_running_recreates_it_and_keeps_the_budget(provider, gateway_factory, tmp_path, sdk_body_bytes):
    db = tmp_path / "usage.sqlite3"
    messages = [{"role": "user", "content": "hi"}]
    # a budgeted request reserves its body's bytes + max_tokens: room for exactly 10 answers of 7 tokens
    worst_case = sdk_body_bytes(messages, max_tokens=1) + 1
    keys = {"providers": {"openai": {"base_url": provider.url + "/v1"}},
            "virtual_keys": {"vk_budget": {"name": "budget", "provider": "openai", "api_key": REAL_KEY,
                                           "budget_tokens": 69 + worst_case},  # 63 + worst case fits, 70 + it does not
                             "vk_free": {"name": "free", "provider": "openai", "api_key": REAL_KEY}}}
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
    keys = {"providers": {"openai": {"base_url": provider.url + "/v1"}},
            "virtual_keys": {"vk_a": {"name": "alice", "provider": "openai", "api_key": REAL_KEY}}}
    gw = gateway_factory(keys, ["--set", f"usage_db={db}"])
    filler = fill(tiny_disk)
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)  # keep-alive
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(300):
        conn.request("POST", "/v1/chat/completions", body, {"authorization": "Bearer vk_a", "content-type": "application/json"})
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
