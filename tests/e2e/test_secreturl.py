"""Passwords in REDIS_URL / USAGE_DB stay out of argv and logs, the way a user starts the gateway
(run.sh: one process, and a two-worker fleet) against a redis-server with requirepass and a
PostgreSQL URL with a password: the password is in no process's /proc/PID/cmdline nor the output,
while a key's limit is counted in that Redis. The options themselves: tests/unit/hooks/test_secreturl.py."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from pathlib import Path

import openai
import psycopg
import pytest

from tests.conftest import ROOT, free_port, keys_for, openai_key
from tests.services.haproxy import FleetProcess, cmdlines_holding, require, wait_healthy
from tests.services.redis import RedisServer

REAL_KEY = "sk-real-provider-key-secreturl-4321"
VIRTUAL_KEY = "vk_secreturl_user"


# --- the helpers -------------------------------------------------------------------------


def keys(provider, rpm: int) -> dict:
    return keys_for(provider, {VIRTUAL_KEY: openai_key(REAL_KEY, name="secreturl", rpm=rpm)})


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def chat(base_url: str) -> int:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=VIRTUAL_KEY, max_retries=0, timeout=60)
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        return 200
    except openai.APIStatusError as e:
        return e.status_code


def ledger_rows(url: str) -> int:
    with psycopg.connect(url) as db:
        return db.execute("SELECT count(*) FROM usage").fetchone()[0]


@pytest.fixture
def secret_services(postgres_url):  # noqa: F811 (fixture)
    """A Redis with requirepass and a PostgreSQL URL with a password in it (the throwaway cluster
    trusts loopback, so libpq never sends it: what counts here is where the URL travels)."""
    require("redis-server")
    password = "pw-" + secrets.token_hex(12)
    redis = RedisServer(password=password).start()
    pg = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")
    assert cmdlines_holding(password) == []  # redis-server read it from a file
    yield password, redis, pg
    redis.close()


class Output:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.data = bytearray()
        self.thread = threading.Thread(target=lambda: [self.data.extend(line) for line in proc.stdout], daemon=True)
        self.thread.start()

    def text(self) -> str:
        return self.data.decode(errors="replace")


@pytest.mark.fleet
def test_one_process_reads_redis_url_and_usage_db_from_its_environment(provider, secret_services, tmp_path):
    password, redis, pg = secret_services
    (tmp_path / "keys.json").write_text(json.dumps(keys(provider, rpm=1)))
    port = free_port()
    env = {**os.environ, "KEYS_FILE": str(tmp_path / "keys.json"), "GATEWAY_PORT": str(port), "GATEWAY_WORKERS": "1",
           "USAGE_DB": pg, "REDIS_URL": redis.url}
    proc = subprocess.Popen([str(ROOT / "run.sh"), "--set", f"confdir={tmp_path}"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = Output(proc)
    try:
        wait_healthy(port, proc, log=out.text)
        # the limit is counted in that Redis: rpm 1, the second request is refused
        assert [chat(f"http://127.0.0.1:{port}") for _ in range(2)] == [200, 429]
        assert len(provider.received) == 1 and provider.received[0].headers["authorization"] == f"Bearer {REAL_KEY}"
        assert b":rpm" in redis.command("KEYS", "llmgw:*")
        argv = cmdline(proc.pid)  # run.sh exec'd mitmdump
        assert "redis_url=env:REDIS_URL" in argv and "usage_db=env:USAGE_DB" in argv, argv
        assert cmdlines_holding(password) == []
    finally:
        proc.terminate()
        proc.wait(30)
    out.thread.join(10)
    log = out.text()
    assert password not in log
    # its log names both, masked
    assert f"Redis redis://:***@127.0.0.1:{redis.port}/0" in log and "usage ledger postgresql://postgres:***@" in log, (
        log
    )
    assert ledger_rows(pg) == 2  # written at the stop: the 200 and the 429


@pytest.mark.fleet
def test_a_fleet_passes_redis_url_and_usage_db_to_its_workers_through_the_environment(provider, secret_services):
    require("haproxy")
    password, redis, pg = secret_services
    f = FleetProcess(keys(provider, rpm=2), 2, env={"REDIS_URL": redis.url, "USAGE_DB": pg}, quiet=False).start()
    try:
        state = f.state()
        assert state["redis"] is None and len(state["workers"]) == 2
        tree = descendants(f.proc.pid)  # run.sh exec'd the supervisor
        assert {w["pid"] for w in state["workers"]} | {state["haproxy"]} <= set(tree)
        for w in state["workers"]:
            assert "redis_url=env:REDIS_URL" in cmdline(w["pid"]) and "usage_db=env:USAGE_DB" in cmdline(w["pid"])
        assert cmdlines_holding(password) == []
        # the key's rpm counted in that Redis, across both workers
        assert [chat(f.url) for _ in range(4)] == [200, 200, 429, 429]
        assert len(provider.received) == 2
        assert b":rpm" in redis.command("KEYS", "llmgw:*")
        assert cmdlines_holding(password) == []  # (a worker restarted meanwhile would show here too)
    finally:
        f.proc.send_signal(2)  # SIGINT: drain and stop; the workers write their ledger rows
        f.wait(60)
        log = f.log()
        f.stop()
    assert password not in log
    assert f"(Redis redis://:***@127.0.0.1:{redis.port}/0;" in log, log
    assert "usage ledger postgresql://postgres:***@" in log, log
    assert ledger_rows(pg) == 4
