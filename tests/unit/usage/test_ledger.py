"""addon/usage/ledger.py: the batched writer, the seeds it gives the store, and the usage table."""

import sqlite3

from addon.usage.ledger import main, recent_tokens, spend_buckets, usage_table

from addon.usage.sqlite import SQLiteLedger

from addon.usage.ledger_sql import UsageRecord


def row(ts, name="alice", fp="f1", prompt=10, completion=5, usd=0.5, status=200):
    return UsageRecord(ts, name, fp, "openai", "gpt-4o", status, prompt, completion, 0, 12.5, False, usd)


def test_rows_are_written_in_batches_and_flushed_on_close(tmp_path):
    db = tmp_path / "u.sqlite3"
    ledger = SQLiteLedger(str(db))
    for i in range(1200):  # more than one batch
        ledger.record(row(1000.0 + i))
    ledger.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*), SUM(prompt_tokens) FROM usage").fetchone() == (1200, 12000)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rows_survive_reopening_and_seed_hourly_spend(tmp_path):
    db = str(tmp_path / "u.sqlite3")
    first = SQLiteLedger(db)
    first.record(row(10.0))
    first.record(row(20.0))
    first.record(row(3700.0, fp="f2", usd=1.0))
    first.close()
    second = SQLiteLedger(db)  # a restart
    second.record(row(30.0))
    second.close()
    assert sorted(spend_buckets(db, 3600)) == [("f1", 0, 45, 1.5), ("f2", 3600, 15, 1.0)]
    assert recent_tokens(db, since=20.0) == [("f1", 20.0, 15), ("f1", 30.0, 15), ("f2", 3700.0, 15)]


def test_usage_table_filters_by_key_and_since(tmp_path):
    db = str(tmp_path / "u.sqlite3")
    ledger = SQLiteLedger(db)
    ledger.record(row(100.0))
    ledger.record(row(200.0, status=429, prompt=0, completion=0, usd=0.0))
    ledger.record(row(300.0, name="bob", fp="f2"))
    ledger.close()
    assert usage_table(db) == [("alice", "f1", 2, 10, 5, 0, 0.5), ("bob", "f2", 1, 10, 5, 0, 0.5)]
    assert usage_table(db, key="f2") == [("bob", "f2", 1, 10, 5, 0, 0.5)]
    assert usage_table(db, since=150.0) == [("alice", "f1", 1, 0, 0, 0, 0.0), ("bob", "f2", 1, 10, 5, 0, 0.5)]


def test_the_usage_command_prints_a_table(tmp_path, capsys):
    db = str(tmp_path / "u.sqlite3")
    ledger = SQLiteLedger(db)
    ledger.record(row(1_800_000_000.0))  # 2027-01-15
    ledger.close()
    assert main(["--db", db, "--key", "alice"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "fingerprint", "requests", "prompt", "completion", "cached", "cost_usd"]
    assert lines[1].split() == ["alice", "f1", "1", "10", "5", "0", "0.500000"]
    assert main(["--db", db, "--since", "2027-02-01"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # header only
    assert main(["--db", db, "--since", "someday"]) == 2
    assert main(["--db", str(tmp_path / "missing.sqlite3")]) == 1


def test_a_flush_writes_the_pending_rows_for_other_readers_at_once(tmp_path):
    db = str(tmp_path / "u.sqlite3")
    ledger = SQLiteLedger(db)
    for i in range(3):
        ledger.record(row(float(i)))
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM usage").fetchone() == (0,)  # batched, not per row
    ledger.flush()
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM usage").fetchone() == (3,)
    ledger.checkpoint()  # from a worker thread in the gateway; must not disturb the writer
    ledger.record(row(4.0))
    ledger.close()
    ledger.flush()  # after close: nothing, no error
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM usage").fetchone() == (4,)


def test_rows_another_writer_locks_out_wait_for_the_next_flush_in_order(tmp_path):
    db = str(tmp_path / "u.sqlite3")
    ledger = SQLiteLedger(db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a second gateway on the same file, mid-transaction
    ledger.record(row(1.0))
    ledger.record(row(2.0))
    ledger.flush()  # waits BUSY_TIMEOUT at most, keeps the rows
    assert len(ledger._pending) == 2
    ledger.record(row(3.0))
    other.execute("COMMIT")
    ledger.flush()
    assert [r[0] for r in sqlite3.connect(db).execute("SELECT ts FROM usage ORDER BY id")] == [1.0, 2.0, 3.0]
    ledger.close()


def test_a_model_name_sqlite_cannot_encode_is_written_repaired_and_the_writer_lives_on(tmp_path):
    db = str(tmp_path / "u.sqlite3")
    ledger = SQLiteLedger(db)
    bad = row(1.0)._replace(model="gpt-\ud800")  # a client's JSON may escape a lone surrogate
    ledger.record(bad)
    ledger.record(row(2.0))
    ledger.close()
    assert sqlite3.connect(db).execute("SELECT ts, model FROM usage ORDER BY ts").fetchall() == [
        (1.0, "gpt-?"), (2.0, "gpt-4o")]


def test_usage_key_is_a_name_a_fingerprint_or_the_virtual_key(tmp_path, capsys):
    from addon.wire.secrets import fingerprint
    db = str(tmp_path / "u.sqlite3")
    ledger = SQLiteLedger(db)
    ledger.record(row(100.0, name="carol", fp=fingerprint("vk_carol_secret")))
    ledger.record(row(200.0, name="dave", fp="f9"))
    ledger.close()
    for given in ("carol", fingerprint("vk_carol_secret"), "vk_carol_secret"):
        assert main(["--db", db, "--key", given]) == 0
        out = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in out[1:]] == ["carol"], given
    assert main(["--db", db, "--key", "vk_nobody"]) == 1
    captured = capsys.readouterr()
    assert "no such key" in captured.err and "vk_nobody" not in captured.err + captured.out
    assert main(["--db", "", "--key", "carol"]) == 1
    assert "keeps no usage ledger" in capsys.readouterr().err


def test_usage_names_a_ledger_it_cannot_read(tmp_path, capsys):
    """A file that is not a SQLite database: one line saying so, exit 1, no traceback."""
    db = tmp_path / "usage.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    assert main(["--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("usage: cannot read ledger") and "Traceback" not in err
