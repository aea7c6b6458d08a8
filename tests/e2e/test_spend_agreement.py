"""Redis and the ledger agree, or the gateway says so: at start, a gateway that finds Redis holding
spend already compares it with the usage ledger's and, when they differ, says in one line which
one budgets count (Redis's) and how to start over. Real redis-server (with a password, which the
line must not show), real gateway processes, a real fleet.

The case users met: the fleet's own Redis keeps every key's spend in .fleet/redis across
restarts; started over with a new USAGE_DB, budgets still counted the old spend, and nothing said
where it came from."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from addon.wire.secrets import fingerprint
from tests.conftest import ROOT, keys_for, openai_key
from tests.services.haproxy import FleetProcess
from tests.services.redis import RedisServer

pytestmark = [pytest.mark.fleet, pytest.mark.e2e]

REAL_KEY = "sk-real-provider-key-agree-5150"
PASSWORD = "redis-pass-agree-7731"
MESSAGES = [{"role": "user", "content": "hi"}]
# a default answer (5 + 2 tokens) costs $1; max_tokens 2 reserves $1: a $2.50 budget takes two
BODY = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2}


def keys(provider) -> dict:
    return keys_for(provider, {"vk_agree": openai_key(REAL_KEY, name="agree", budget_usd=2.5)},
                    prices={"gpt-4o": {"input": 0, "output": 500_000}})


@pytest.fixture
def redis_server():
    server = RedisServer(password=PASSWORD).start()
    yield server
    server.close()


def post(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/chat/completions", method="POST", data=json.dumps(BODY).encode(),
                                     headers={"authorization": "Bearer vk_agree", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def lines(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def wait_for_line(read_log, text: str, timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while not (found := lines(read_log(), text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def spend_two_dollars(provider, gateway_factory, redis_server, ledger) -> None:
    """Two answered requests ($2) counted into the empty Redis and `ledger` (which fills Redis)."""
    gw = gateway_factory(keys(provider), ["--set", f"redis_url={redis_server.url}", "--set", f"usage_db={ledger}"])
    assert post(gw.url)[0] == 200
    assert post(gw.url)[0] == 200
    gw.stop()
    spend = f"llmgw:{fingerprint('vk_agree')}:spend"
    assert redis_server.command("HGET", spend, "t") == b"$2\r\n14\r\n"


def test_a_new_ledger_with_old_spend_in_redis_is_said_once_and_budgets_count_redis(provider, gateway_factory,
                                                                                   redis_server, tmp_path):
    spend_two_dollars(provider, gateway_factory, redis_server, tmp_path / "old.sqlite3")
    gw = gateway_factory(keys(provider), ["--set", f"redis_url={redis_server.url}",
                                          "--set", f"usage_db={tmp_path / 'new.sqlite3'}"])
    [line] = wait_for_line(gw.log, "disagree")
    assert "the usage ledger" in line and "new.sqlite3" in line
    assert "on the spend of 1 key: Redis has $2.0000 (14 tokens), the ledger $0.0000 (0 tokens)" in line
    assert "Budgets count Redis's" in line
    assert "delete Redis's llmgw:* keys" in line and os.path.join(".fleet", "redis") in line
    assert PASSWORD not in gw.log() and "redis://:***@" in line
    # which one the budget follows: Redis's $2 + $1 reserved > $2.50
    status, answer = post(gw.url)
    assert (status, answer["error"]["code"]) == (429, "budget_exceeded")
    assert len(provider.received) == 2


def test_the_ledger_that_filled_redis_agrees_and_nothing_is_said(provider, gateway_factory, redis_server, tmp_path):
    spend_two_dollars(provider, gateway_factory, redis_server, tmp_path / "usage.sqlite3")
    gw = gateway_factory(keys(provider), ["--set", f"redis_url={redis_server.url}",
                                          "--set", f"usage_db={tmp_path / 'usage.sqlite3'}"])
    assert post(gw.url)[0] == 429  # (Redis seeded, checked: the check comes right after)
    time.sleep(2)
    assert not lines(gw.log(), "disagree") and not lines(gw.log(), "earlier runs"), gw.log()


def test_redis_that_lost_spend_the_ledger_has_is_said_too(provider, gateway_factory, redis_server, tmp_path):
    spend_two_dollars(provider, gateway_factory, redis_server, tmp_path / "usage.sqlite3")
    redis_server.command("DEL", f"llmgw:{fingerprint('vk_agree')}:spend")  # the marker stays
    gw = gateway_factory(keys(provider), ["--set", f"redis_url={redis_server.url}",
                                          "--set", f"usage_db={tmp_path / 'usage.sqlite3'}"])
    [line] = wait_for_line(gw.log, "disagree")
    assert "Redis has $0.0000 (0 tokens), the ledger $2.0000 (14 tokens)" in line


def test_no_ledger_with_spend_in_redis_is_said(provider, gateway_factory, redis_server, tmp_path):
    spend_two_dollars(provider, gateway_factory, redis_server, tmp_path / "usage.sqlite3")
    gw = gateway_factory(keys(provider), ["--set", f"redis_url={redis_server.url}", "--set", "usage_db="])
    [line] = wait_for_line(gw.log, "earlier runs")
    assert "holds the spend of 1 key from earlier runs, $2.0000 (14 tokens), and no usage ledger is kept" in line
    assert "budgets count Redis's" in line


def test_a_fleet_says_it_once(provider, gateway_factory, redis_server, tmp_path):
    spend_two_dollars(provider, gateway_factory, redis_server, tmp_path / "old.sqlite3")
    fleet = FleetProcess(keys(provider), 2, env={"REDIS_URL": redis_server.url}, quiet=False).start()
    try:
        assert wait_for_line(fleet.log, "disagree")
        status, _ = post(fleet.url)
        assert status == 429  # both workers count Redis's spend
        time.sleep(1)
        assert len(lines(fleet.log(), "disagree")) == 1, fleet.log()
        assert PASSWORD not in fleet.log()
    finally:
        fleet.stop()


def test_run_sh_usage_says_where_live_spend_lives(provider, gateway_factory, redis_server, tmp_path):
    spend_two_dollars(provider, gateway_factory, redis_server, tmp_path / "usage.sqlite3")
    env = {**os.environ, "USAGE_DB": str(tmp_path / "usage.sqlite3"), "REDIS_URL": redis_server.url,
           "FLEET_DIR": str(tmp_path / "no-fleet")}
    done = subprocess.run(
        [str(ROOT / "run.sh"), "usage"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "agree" in done.stdout  # the table: the ledger's rows
    assert "budgets count the live spend in Redis (redis://:***@" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    # one gateway without Redis: its budgets come from this ledger, nothing more to say
    env.pop("REDIS_URL")
    done = subprocess.run(
        [str(ROOT / "run.sh"), "usage"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "live spend" not in done.stderr
    # a fleet's own Redis keeps its data in $FLEET_DIR/redis
    (tmp_path / "no-fleet" / "redis").mkdir(parents=True)
    done = subprocess.run(
        [str(ROOT / "run.sh"), "usage"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert f"the fleet's Redis (GATEWAY_WORKERS > 1; its data in {tmp_path / 'no-fleet' / 'redis'})" in done.stderr
