"""The fuzz tests of tests/unit/gateway/test_fuzz.py against the fleet's store: the same Gateway
in-process, its store a RedisStore on a real redis-server (tests/services/redis.py), each request's
store round trips run to their end. And the break it was written for, through real gateways with
redis_url: a string with an unpaired surrogate in a stored object's id got 500 gateway_error
(redis-py cannot encode it) and a UnicodeEncodeError traceback."""

import asyncio
import contextlib
import itertools
import json
import time

import pytest

from addon.policy.redis_store import RedisStore
from tests import rawhttp
from tests.services.redis import RedisServer
from tests.unit.gateway import test_fuzz as unit
from tests.unit.gateway.test_fuzz import *  # noqa: F403 (the unit module's tests, collected here with RedisStore)

pytestmark = pytest.mark.fleet
_prefixes = itertools.count(1)


@pytest.fixture(scope="module")
def redis():
    server = RedisServer().start()
    yield server
    server.close()


@contextlib.contextmanager
def on_redis(addon, url: str):
    """`addon` (a Gateway) with a RedisStore of its own prefix: its awaitables (admission, owner
    lookups) and the store's background sends (settles, releases) run on one loop."""
    loop = asyncio.new_event_loop()
    store = RedisStore(url, f"fuzz{next(_prefixes)}:")
    loop.run_until_complete(store.seed())  # an empty Redis gets its marker (nothing in a ledger)
    addon.live.store = store

    def run(pending) -> None:
        async def until_done():
            if pending is not None:
                await pending
            await store.drain()
        loop.run_until_complete(until_done())

    addon.run_pending = run

    async def record_owners():
        for name, resource_id in unit.RECORDED.items():
            key = addon.live.keys.lookup(name)
            if key is not None:  # (gw's keys)
                await store.note_owner(resource_id, key.fingerprint, time.time())

    loop.run_until_complete(record_owners())
    try:
        yield addon
    finally:
        loop.run_until_complete(store.close())
        loop.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, redis):
    with unit.gateway_with(unit.KEYS, tmp_path_factory.mktemp("fuzz")) as addon, on_redis(addon, redis.url):
        yield addon


@pytest.fixture(scope="module")
def mgw(tmp_path_factory, redis):
    with (
        unit.gateway_with(unit.MESSAGES_KEYS, tmp_path_factory.mktemp("fuzz-messages")) as addon,
        on_redis(addon, redis.url),
    ):
        yield addon


def test_the_fuzzed_gateway_asks_redis(gw, redis):
    """What this module runs on: a limited key's request is admitted through Redis (its rpm
    window there), and a recorded owner is read from it."""
    assert isinstance(gw.live.store, RedisStore)
    body = {"model": "gpt-4o", "input": "hi", "previous_response_id": unit.RECORDED["vk_l"]}
    assert unit.send(gw, "vk_l", json.dumps(body).encode(), b"/v1/responses") is None  # routed: the owner was found
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis.url)
    try:
        assert client.zcard(gw.live.store.keys(gw.live.keys.lookup("vk_l").fingerprint)[0]) >= 1  # its rpm window
    finally:
        client.close()


@pytest.mark.e2e
def test_an_unpaired_surrogate_in_a_stored_objects_id_is_a_400_on_the_fleets_store(
    provider, gateway_factory, redis_server
):
    entry = {
        "providers": {"openai": {"base_url": provider.url + "/v1"}},
        "virtual_keys": {
            "vk_team": {"name": "team", "provider": "openai", "api_key": "sk-fleet-surrogate-0001"},
            "vk_limited": {"name": "limited", "provider": "openai", "api_key": "sk-fleet-surrogate-0002", "rpm": 1000},
        },
    }
    gw = gateway_factory(entry, ["--set", f"redis_url={redis_server.url}"])
    for key in ("vk_team", "vk_limited"):
        for field, value in (
            ("previous_response_id", "\ud800"),
            ("conversation", "\ud800"),
            ("conversation", {"id": "\udfff"}),
        ):
            r = rawhttp.request(
                gw.url,
                "POST",
                "/v1/responses",
                content=json.dumps({"model": "gpt-4o", "input": "hi", field: value}).encode(),
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            )
            error = r.json()["error"]
            assert (r.status_code, error["code"]) == (400, "invalid_string"), (field, r.status_code, error)
            assert r.headers["x-gateway-error-source"] == "gateway"
        # an id no response could have: a 404 without a look in Redis (a megabyte of it, or a control character)
        for value in ("resp_" + "x" * 1_000_000, "resp_a\nb"):
            r = rawhttp.request(
                gw.url,
                "POST",
                "/v1/responses",
                content=json.dumps({"model": "gpt-4o", "input": "hi", "previous_response_id": value}).encode(),
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            )
            assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    assert provider.received == []
    log = gw.log()
    assert "Traceback" not in log and "UnicodeEncodeError" not in log and "gateway_error" not in log
