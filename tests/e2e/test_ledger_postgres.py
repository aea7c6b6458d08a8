"""The usage ledger in PostgreSQL (USAGE_DB=postgresql://...): a real throwaway cluster per session."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import openai
import psycopg
import pytest

from addon.usage import ledger as ledger_db
from addon.usage.ledger import open_ledger
from addon.usage.ledger_sql import COLUMNS, UsageRecord
from addon.usage.postgres import PostgresLedger
from addon.policy.store import BUCKET
from tests.conftest import ROOT, keys_for

REAL_KEY = "sk-real-provider-key-pg-4242"
MESSAGES = [{"role": "user", "content": "hi"}]

NOW = 1_764_000_000.0
ROWS = [
    UsageRecord(NOW - 7200.5, "team-a", "fp-a", "openai", "gpt-4o", 200, 5, 2, 1, 12.5, False, 0.000123456789),
    UsageRecord(NOW - 30, "team-a", "fp-a", "openai", "gpt-4o", 200, 10, 20, 0, 3.25, True, 1.5, True),
    UsageRecord(NOW - 10, "team-b", "fp-b", "deepseek", "deepseek-chat", 429, 0, 0, 0, 0.5, False, 0.0),
    UsageRecord(NOW - 5, "team-b", "fp-b", "deepseek", "deepseek-chat", 200, 7, 3, 0, 8.0, True, 2e-7),
]


@pytest.mark.fleet
def test_postgres_ledger_holds_the_sqlite_ledgers_rows_and_answers_the_same(postgres_url, tmp_path):
    sqlite_path = str(tmp_path / "usage.sqlite3")
    for target in (sqlite_path, postgres_url):
        ledger = open_ledger(target)
        for row in ROWS[:2]:
            ledger.record(row)
        asyncio.run(ledger.write())  # a batch during the run...
        for row in ROWS[2:]:
            ledger.record(row)
        ledger.close()  # ...and what is pending at a clean stop
    assert isinstance(open_ledger(postgres_url), PostgresLedger)

    with psycopg.connect(postgres_url) as db:
        columns = dict(db.execute("SELECT column_name, data_type FROM information_schema.columns"
                                  " WHERE table_name = 'usage'").fetchall())
        rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM usage ORDER BY id").fetchall()
    assert set(columns) == {"id", *COLUMNS}
    assert columns["cost_usd"] == columns["ts"] == columns["latency_ms"] == "double precision"
    assert [tuple(r) for r in rows] == [tuple(int(v) if isinstance(v, bool) else v for v in row) for row in ROWS]

    for query in (lambda t: ledger_db.usage_table(t), lambda t: ledger_db.usage_table(t, key="team-b"),
                  lambda t: ledger_db.usage_table(t, since=NOW - 60),
                  lambda t: sorted(ledger_db.spend_buckets(t, BUCKET)),
                  lambda t: ledger_db.recent_tokens(t, NOW - 60)):
        from_sqlite, from_postgres = query(sqlite_path), query(postgres_url)
        assert [tuple(r) for r in from_postgres] == [tuple(r) for r in from_sqlite]
        assert from_postgres, "the query found nothing"


@pytest.mark.fleet
def test_run_sh_usage_reads_postgres(postgres_url, tmp_path):
    ledger = open_ledger(postgres_url)
    for row in ROWS:
        ledger.record(row)
    ledger.close()
    proc = subprocess.run(
        [str(ROOT / "run.sh"), "usage", "--key", "team-a"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "USAGE_DB": postgres_url, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["team-a", "fp-a", "2", "15", "22", "1", "1.500123"]
    assert len(lines) == 2


@pytest.mark.fleet
def test_usage_names_an_unreachable_postgres_without_its_password(tmp_path):
    from tests.conftest import free_port
    url = f"postgresql://gw:hunter2-secret@127.0.0.1:{free_port()}/ledger"
    proc = subprocess.run([str(ROOT / "run.sh"), "usage"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "USAGE_DB": url, "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert "usage: cannot read ledger postgresql://gw:***@127.0.0.1:" in proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr


@pytest.mark.fleet
def test_two_gateways_write_one_postgres_ledger_and_a_new_one_starts_from_its_spend(
        postgres_url, provider, gateway_factory, sdk_body_bytes):
    # 7 tokens per default fake reply; a request reserves its body's bytes + max_tokens 1
    # (docs/shared-state.md): with 49 spent one more fits, with 56 none
    worst_case = sdk_body_bytes(MESSAGES, max_tokens=1) + 1
    keys = keys_for(provider, {"vk_pg_shared": {"provider": "openai", "api_key": REAL_KEY, "name": "pg-team",
                                          "budget_tokens": 55 + worst_case}})
    usage_db = ["--set", f"usage_db={postgres_url}"]
    a, b = gateway_factory(keys, usage_db), gateway_factory(keys, usage_db)
    for gw, n in ((a, 4), (b, 3)):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_pg_shared", max_retries=0)
        for _ in range(n):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
    a.stop()  # SIGTERM right after the answers: the rows still pending are written at the stop
    b.stop()
    with psycopg.connect(postgres_url) as db:
        rows = db.execute("SELECT key_name, status, prompt_tokens + completion_tokens FROM usage").fetchall()
    assert rows == [("pg-team", 200, 7)] * 7
    assert REAL_KEY not in a.log() + b.log()

    # a gateway started now (another machine, a restart) reads the spend: 49 tokens,
    # one more request goes through, the one after is refused
    c = gateway_factory(keys, usage_db)
    client = openai.OpenAI(base_url=c.url + "/v1", api_key="vk_pg_shared", max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
    deadline = time.monotonic() + 10
    with pytest.raises(openai.RateLimitError) as refused:
        while time.monotonic() < deadline:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
            time.sleep(0.1)
    assert refused.value.body["code"] == "budget_exceeded"
    assert len(provider.received) == 8


@pytest.mark.fleet
def test_two_gateways_sharing_redis_and_postgres_enforce_one_budget_under_load_and_write_one_ledger(
        postgres_url, provider, gateway_factory, redis_server):
    from tests.fakeprovider import worst_case_reply
    from tests.e2e.test_shared_store import codes, spread

    provider.reset(worst_case_reply)  # every answer uses what it reserved, slowly: they overlap
    budget = 1000
    keys = keys_for(provider, {"vk_pg_redis": {"provider": "openai", "api_key": REAL_KEY, "name": "pg-redis",
                                             "budget_tokens": budget}})
    args = ["--set", f"usage_db={postgres_url}", "--set", f"redis_url={redis_server.url}"]
    gateways = gateway_factory(keys, args), gateway_factory(keys, args)
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 100}
    results = spread(gateways, 30, "vk_pg_redis", body)  # at once, alternating between the two
    counted = codes(results)
    assert set(counted) <= {200, (429, "budget_exceeded")} and counted[200] == len(provider.received) >= 2
    # one budget: what the provider was asked for (body bytes + max_tokens each) stays within it
    assert sum(len(r.body) + r.json()["max_tokens"] for r in provider.received) <= budget
    for gw in gateways:
        gw.stop()
    # one ledger: every request of both gateways, answered or refused, once
    with psycopg.connect(postgres_url) as db:
        rows = db.execute("SELECT status, prompt_tokens + completion_tokens FROM usage").fetchall()
    used = [len(r.body) + r.json()["max_tokens"] for r in provider.received]
    assert sorted(rows) == sorted([(200, n) for n in used] + [(429, 0)] * counted.get((429, "budget_exceeded"), 0))
    assert sum(tokens for _, tokens in rows) <= budget


@pytest.mark.fleet
def test_postgres_down_keeps_rows_until_it_is_back_and_requests_go_on(provider, gateway_factory):
    from tests.services.postgres import PostgresServer
    server = PostgresServer().start()
    try:
        url = server.create_database("outage")
        keys = keys_for(provider, {"vk_pg_outage": {"provider": "openai", "api_key": REAL_KEY, "name": "pg-outage"}})
        gw = gateway_factory(keys, ["--set", f"usage_db={url}"])
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_pg_outage", max_retries=0)

        def rows() -> int:
            with psycopg.connect(url) as db:
                return db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]

        def wait_rows(n: int) -> int:
            deadline = time.monotonic() + 15
            while (count := rows()) < n and time.monotonic() < deadline:
                time.sleep(0.1)
            return count

        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert wait_rows(1) == 1
        server.halt()
        for _ in range(3):  # the ledger being down does not hold up requests
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        time.sleep(1.0)  # several write attempts fail meanwhile
        server.start()
        assert wait_rows(4) == 4  # the rows kept in memory went in once it was back
        log = gw.log()
        assert log.count("cannot write") == 1 and "writing again" in log, log
        assert REAL_KEY not in log
    finally:
        server.stop()
