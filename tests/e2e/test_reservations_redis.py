"""The reservation contract of tests/unit/policy/test_reservations.py, run against RedisStore and a
real redis-server (tests/services/redis.py), plus what only a shared store has to survive: a lost
release, a killed holder, an outage longer than the lease."""

import asyncio

import pytest

from addon.policy.redis_store import RedisStore
from addon.policy.store import BUDGET_TOKENS, PARALLEL, RESERVATION_LEASE, Demand, Limits
from tests.services.redis import RedisServer
from tests.unit.policy import test_reservations as contract
from tests.unit.policy.test_reservations import *  # noqa: F403 (the contract's tests, collected here with the Redis store)

pytestmark = pytest.mark.fleet
del test_renew_leases_renews_in_the_background_every_third_of_the_lease  # noqa: F821 (the memory one; Redis's is below)


@pytest.fixture
def store():
    server = RedisServer().start()
    store = SyncRedisStore(server.url)
    yield store
    store.close()
    server.close()


class SyncRedisStore:
    """RedisStore driven from a sync test: each call runs to completion on one event loop
    (settle/release/add_usage are sent in the background, and waited for here)."""

    def __init__(self, url: str, lease: float = RESERVATION_LEASE) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = RedisStore(url, "test:", lease)

    @property
    def lease(self):
        return self.store.lease

    def renew(self, now):
        return self.loop.run_until_complete(self.store.renew(now))

    def reserve(self, key, limits, demand, now):
        return self.loop.run_until_complete(self.store.reserve(key, limits, demand, now))

    def settle(self, key, ticket, tokens, usd, when):
        self.sent(self.store.settle, key, ticket, tokens, usd, when)

    def release(self, key, ticket):
        self.sent(self.store.release, key, ticket)

    def add_usage(self, key, tokens, usd, when):
        self.sent(self.store.add_usage, key, tokens, usd, when)

    def sent(self, call, *args):
        async def run():
            call(*args)
            await self.store.drain()
        self.loop.run_until_complete(run())

    def close(self):
        self.loop.run_until_complete(self.store.close())
        self.loop.close()



@pytest.mark.fleet
def test_a_release_redis_did_not_get_is_sent_again_once_it_answers():
    """Redis unreachable when a request ended: its reservation (here a max_parallel slot) would be
    held until its lease ends. The release goes with the next round trip after the outage."""
    server = RedisServer().start()
    store = SyncRedisStore(server.url)
    try:
        limits = Limits(max_parallel=1)
        ticket = store.reserve("k", limits, Demand(), now=0.0).ticket
        server.command("CONFIG", "SET", "save", "3600 1")  # Redis keeps its data over the restart (RDB at shutdown)
        server.stop()
        store.release("k", ticket)  # not sent: Redis is down
        server.start()
        assert server.command("HLEN", "test:k:held") == b":1\r\n"  # the slot is still taken there
        assert store.reserve("k", limits, Demand(), now=1.0).refused is None  # the release went first
    finally:
        store.close()
        server.close()



@pytest.mark.fleet
def test_a_killed_holders_reservations_are_free_after_the_lease_while_a_live_ones_stay():
    """Two gateways on one Redis: one is killed (its store dropped, nothing settled or released,
    no more renewals), the other renews. After the lease only the live one's slot is held."""
    server = RedisServer().start()
    killed, live = SyncRedisStore(server.url, lease=10.0), SyncRedisStore(server.url, lease=10.0)
    try:
        limits = Limits(max_parallel=2, budget_tokens=100)
        assert killed.reserve("k", limits, Demand(50), now=0.0).ticket is not None
        assert live.reserve("k", limits, Demand(40), now=0.0).ticket is not None
        assert live.reserve("k", limits, Demand(1), now=1.0).refused == PARALLEL  # both slots held (and 90 tokens)
        killed.loop.close()  # killed: renews nothing from now on
        assert live.renew(9.0) is True
        assert live.reserve("k", limits, Demand(60), now=10.0).refused is None  # the killed one's 50 and slot are free
        assert (
            live.reserve("k", Limits(max_parallel=2), Demand(), now=11.0).refused == PARALLEL
        )  # the live one's (renewed) is not
    finally:
        live.close()
        server.close()



@pytest.mark.fleet
def test_reservations_lost_in_an_outage_are_held_again_once_redis_answers():
    """Redis down longer than the lease, then back without its data: a renewal fails while it is
    down (False: renew_leases retries within a second) and writes the live ticket back whole as
    soon as it answers, so its slot and worst case count again."""
    server = RedisServer().start()
    store = SyncRedisStore(server.url, lease=10.0)
    try:
        limits = Limits(max_parallel=1, budget_tokens=100)
        assert store.reserve("k", limits, Demand(70), now=0.0).ticket is not None
        server.stop()
        assert store.renew(5.0) is False
        server.start()  # empty: the held hash is gone
        assert server.command("EXISTS", "test:k:held") == b":0\r\n"
        assert store.renew(20.0) is True
        refused = store.reserve("k", limits, Demand(40), now=21.0)
        assert (refused.refused, refused.used) == (BUDGET_TOKENS, 70)
        assert store.reserve("k", Limits(max_parallel=1), Demand(), now=21.0).refused == PARALLEL
    finally:
        store.close()
        server.close()


def test_renew_leases_renews_a_redis_ticket_in_the_background_every_third_of_the_lease():
    server = RedisServer().start()

    async def go():
        store = RedisStore(server.url, "test:", lease=1.5)

        async def expiry(ticket) -> float:
            return float((await store.redis.hget("test:k:held", ticket)).split()[2])

        try:
            await contract.renewed_in_the_background(store, expiry)
        finally:
            await store.close()

    try:
        asyncio.run(go())
    finally:
        server.close()
