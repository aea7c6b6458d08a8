"""Stored responses' owner records (docs/endpoints.md): kept per key, so one key's creates never
push another key's records out, and read back from the usage ledger at start-up, so a restart
(or a Redis that lost its data) does not turn a key's own responses into 404s. Real gateways, the
official openai SDK, a fake provider that stores responses."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import keys_for, openai_key
from tests.fakeresponses import StoredResponses
from tests.services.redis import command

pytestmark = pytest.mark.e2e

REAL = "sk-owner-records-real-0001"
FIRST = 10**9  # a weight that makes a target every first pick


def two_keys(provider, **extra) -> dict:
    """vk_a and vk_b on one real key (so the provider alone would let either read the other's)."""
    return keys_for(provider, {"vk_a": openai_key(REAL, name="a"), "vk_b": openai_key(REAL, name="b"), **extra})


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_one_keys_creates_never_push_another_keys_records_out(provider, gateway_factory):
    """The attack, scaled down as it was run (the cap then: one FIFO of 100,000 for every key):
    key B's creates made key A's response 404, for a GET and for previous_response_id."""
    provider.handler = StoredResponses()
    gw = gateway_factory(two_keys(provider), ["--set", "owners_per_key=20"])
    a, b = client(gw, "vk_a"), client(gw, "vk_b")
    mine = a.responses.create(model="gpt-4.1", input="a's").id
    theirs = [b.responses.create(model="gpt-4.1", input=f"b {i}").id for i in range(30)]
    assert a.responses.retrieve(mine).id == mine
    a.responses.create(model="gpt-4.1", input="and?", previous_response_id=mine)
    with pytest.raises(openai.NotFoundError):  # B's own oldest went: past its cap
        b.responses.retrieve(theirs[0])
    assert b.responses.retrieve(theirs[-1]).id == theirs[-1]
    with pytest.raises(openai.NotFoundError):  # and A's stays A's
        b.responses.retrieve(mine)


def test_records_survive_a_restart_with_the_ledger(provider, gateway_factory, tmp_path):
    provider.handler = StoredResponses()
    db = tmp_path / "usage.sqlite3"
    a_target = {"provider": "openai", "api_key": "sk-owner-target-a-01", "base_url": provider.url + "/ta/v1"}
    b_target = {"provider": "openai", "api_key": "sk-owner-target-b-02", "base_url": provider.url + "/tb/v1"}
    pooled = {"vk_t": {"name": "t", "targets": [{**a_target, "weight": FIRST}, b_target]}}
    gw = gateway_factory(two_keys(provider, **pooled), ["--set", f"usage_db={db}"])
    whole = client(gw, "vk_a").responses.create(model="gpt-4.1", input="whole").id
    with client(gw, "vk_a").responses.create(model="gpt-4.1", input="streamed", stream=True) as events:
        streamed = [e for e in events if e.type == "response.completed"][0].response.id
    at_a = client(gw, "vk_t").responses.create(model="gpt-4.1", input="at target a").id
    assert provider.received[-1].path.startswith("/ta/")
    gw.stop()  # a clean stop writes the ledger's last rows

    # the same keys, except that target b is now the first pick: the record still names target a
    pooled = {"vk_t": {"name": "t", "targets": [a_target, {**b_target, "weight": FIRST}]}}
    again = gateway_factory(two_keys(provider, **pooled), ["--set", f"usage_db={db}"])
    a, b = client(again, "vk_a"), client(again, "vk_b")
    assert a.responses.retrieve(whole).id == whole
    a.responses.create(model="gpt-4.1", input="and?", previous_response_id=streamed)
    for rid in (whole, streamed):
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(rid)
    received = len(provider.received)
    assert client(again, "vk_t").responses.retrieve(at_a).id == at_a
    assert [r.path for r in provider.received[received:]] == [f"/ta/v1/responses/{at_a}"]


@pytest.mark.fleet
def test_a_redis_that_lost_its_data_gets_the_records_from_the_ledger(provider, gateway_factory, redis_server, tmp_path):
    provider.handler = StoredResponses()
    args = ["--set", f"usage_db={tmp_path / 'usage.sqlite3'}", "--set", f"redis_url={redis_server.url}"]
    gw = gateway_factory(two_keys(provider), args)
    mine = client(gw, "vk_a").responses.create(model="gpt-4.1", input="a's").id
    gw.stop()
    assert command(redis_server.port, "FLUSHALL", password=redis_server.password) == b"+OK\r\n"  # Redis restarted empty
    again = gateway_factory(two_keys(provider), args)
    assert client(again, "vk_a").responses.retrieve(mine).id == mine
    with pytest.raises(openai.NotFoundError):
        client(again, "vk_b").responses.retrieve(mine)
    assert "1 stored responses' owners loaded into it" in again.log()
