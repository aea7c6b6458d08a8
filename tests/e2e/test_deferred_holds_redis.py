"""The deferred-hold contract of tests/unit/policy/test_deferred_holds.py on RedisStore against a
real redis-server (tests/services/redis.py), plus what only a shared store has: a hold made by one
gateway is settled, or charged when due, by another (the one that made it may be gone)."""

import asyncio

import pytest

from addon.policy.redis_store import RedisStore
from addon.policy.store import BUDGET_TOKENS, Demand, Limits
from addon.wire.tokens import Usage
from tests.services.redis import RedisServer
from tests.unit.policy.test_deferred_holds import *  # noqa: F403 (the contract's tests, collected here with the Redis store)
from tests.unit.policy.test_deferred_holds import META

pytestmark = pytest.mark.fleet


class SyncRedisStore:
    """RedisStore driven from a sync test: each call runs to completion on one event loop, and
    what it sends in the background is waited for."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = RedisStore(url, "test:")

    def run(self, call, *args):
        async def go():
            result = call(*args)
            if asyncio.iscoroutine(result):
                result = await result
            await self.store.drain()
            return result
        return self.loop.run_until_complete(go())

    def __getattr__(self, name):
        method = getattr(self.store, name)
        return lambda *args, **kw: self.run(lambda *a: method(*a, **kw), *args)

    def close(self):
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


@pytest.fixture
def server():
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def store(server):
    store = SyncRedisStore(server.url)
    yield store
    store.close()


def test_a_hold_one_gateway_made_is_settled_or_charged_by_another(server):
    first, second = SyncRedisStore(server.url), SyncRedisStore(server.url)
    try:
        for rid in ("resp_a", "resp_b"):
            ticket = first.reserve("k", Limits(budget_tokens=100), Demand(40), 0.0).ticket
            first.defer("k", ticket, rid, 40, 0.0, 100.0, META)
        first.close()  # its gateway is gone
        assert second.reserve("k", Limits(budget_tokens=100), Demand(21), 1.0).refused == BUDGET_TOKENS
        assert second.settle_deferred("k", "resp_a", Usage(3, 2), 2.0)[0] == META
        assert [d.resource_id for d in second.charge_due(100.0)] == ["resp_b"]
        assert second.spend("k", None, 101.0).tokens == 5 + 40
    finally:
        second.close()
