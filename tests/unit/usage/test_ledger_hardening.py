"""The ledger's writer against bad provider numbers, deletion and a full disk (a real 512 KB tmpfs).
The same under a running gateway: tests/e2e/test_ledger_hardening.py."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path


from addon.usage.ledger_sql import COLUMNS, UsageRecord

from addon.usage.sqlite import SQLiteLedger
from addon.wire.tokens import MAX_TOKENS, Usage, usage_from_body, usage_from_dict


def row(ts, name="alice", fp="f1", prompt=10, completion=5, usd=0.5, estimated=False):
    return UsageRecord(ts, name, fp, "openai", "gpt-4o", 200, prompt, completion, 0, 12.5, False, usd, estimated)


def count(db: Path, where: str = "1") -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute(f"SELECT COUNT(*) FROM usage WHERE {where}").fetchone()[0]
    finally:
        con.close()


# --- bad provider numbers --------------------------------------------------------

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


# --- a deleted ledger, a full disk -------------------------------------------------

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


