"""Stored responses' owners shared through a real Redis (what a fleet shares): RedisStore's method
pair, and two gateways on one Redis agreeing through the official openai SDK. MemoryStore and the
check: tests/unit/policy/test_owners.py; one gateway end to end: tests/e2e/test_responses_e2e.py."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from addon.policy import owners
from addon.wire.secrets import fingerprint
from addon.policy.redis_store import RedisStore
from addon.policy.store import OWNER_TTL
from addon.wire.errors import GatewayError
from tests.fakeresponses import StoredResponses
from tests.conftest import keys_for, openai_key


@pytest.mark.fleet
def test_redis_store_shares_owners_between_gateways_with_a_ttl_and_fails_closed_when_down(redis_server):
    async def scenario():
        one, two = RedisStore(redis_server.url, "own:"), RedisStore(redis_server.url, "own:")
        elsewhere = RedisStore(redis_server.url, "other:")
        try:
            await one.note_owner("resp_shared", "fp-one", time.time())  # the write, awaited
            assert await two.owner_of("resp_shared", time.time()) == "fp-one"
            assert await two.owner_of("resp_unknown", time.time()) is None
            assert await elsewhere.owner_of("resp_shared", time.time()) is None  # another prefix: not shared
            refused = owners.check(two, (("resp_shared", None),), "fp-two", time.time())
            with pytest.raises(GatewayError) as e:
                await refused
            assert e.value.status == 404
            assert await owners.check(two, (("resp_shared", None),), "fp-one", time.time()) is None
            redis_server.stop()
            with pytest.raises(GatewayError) as e:  # cannot know: nothing is forwarded
                await owners.check(two, (("resp_shared", None),), "fp-one", time.time())
            assert (e.value.status, e.value.code) == (503, "store_unavailable")
            await one.note_owner("resp_lost", "fp-one", time.time())  # logged, never raised
        finally:
            for s in (one, two, elsewhere):
                await s.close()

    asyncio.run(scenario())
    redis_server.start()


@pytest.mark.fleet
@pytest.mark.e2e
def test_two_gateways_on_one_redis_agree_who_owns_a_response(provider, gateway_factory, redis_server):
    provider.handler = StoredResponses()
    keys = keys_for(provider, {vk: openai_key("sk-owners-real-0001", name=vk) for vk in ("vk_a", "vk_b")})
    args = ["--set", f"redis_url={redis_server.url}"]
    first, second = gateway_factory(keys, args), gateway_factory(keys, args)

    def client(gw, key):
        return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)

    created = client(first, "vk_a").responses.create(model="gpt-4.1", input="hi")
    # the body reached the client only once the owner was in Redis: the other gateway knows at once
    assert client(second, "vk_a").responses.retrieve(created.id).id == created.id
    with pytest.raises(openai.NotFoundError):
        client(second, "vk_b").responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client(first, "vk_b").responses.retrieve(created.id)
    assert [(r.method, r.path) for r in provider.received] == [
        ("POST", "/v1/responses"),
        ("GET", f"/v1/responses/{created.id}"),
    ]
    ttl = int(redis_server.command("TTL", f"llmgw:owner:{created.id}")[1:].strip())
    assert OWNER_TTL - 60 < ttl <= OWNER_TTL
    # the key's fingerprint, never the virtual key
    assert redis_server.command("GET", f"llmgw:owner:{created.id}").split(b"\r\n")[1] == fingerprint("vk_a").encode()
