"""addon/hooks/stores.py: the redis_url / redis_prefix options choose the store every part shares.
At a clean stop with a real Redis: tests/e2e/test_stores_redis.py."""

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.policy.redis_store import RedisStore
from addon.policy.memory_store import MemoryStore
from addon.policy.store import Demand, Limits
from addon.hooks.live import Live
from addon.hooks.stores import StoreChoice


def test_without_redis_url_the_parts_keep_the_memory_store():
    memory = MemoryStore()
    live = Live(memory)
    choice = StoreChoice(live)
    with taddons.context(choice) as tctx:
        tctx.configure(choice)
    assert live.store is memory


def test_redis_url_gives_every_part_one_redis_store_with_the_prefix():
    a = Live(MemoryStore())
    choice = StoreChoice(a)
    with taddons.context(choice) as tctx:
        tctx.configure(choice, redis_url="redis://:s3cret@127.0.0.1:1/2", redis_prefix="team-a:")
        assert isinstance(a.store, RedisStore)
        assert a.store.prefix == "team-a:" and a.store.keys("fp")[0] == "team-a:fp:rpm"
        with pytest.raises(exceptions.OptionsError, match="cannot change while the gateway runs"):
            tctx.configure(choice, redis_url="redis://127.0.0.1:2/0")


@pytest.mark.parametrize("options, message", [
    ({"redis_url": "http://127.0.0.1:6379"}, "must start with redis://"),
    ({"redis_url": "redis://127.0.0.1:notaport/0"}, "redis_url"),
    ({"redis_prefix": ""}, "redis_prefix"),
    ({"redis_prefix": "has space"}, "redis_prefix"),
    ({"reservation_lease": "0.5"}, "reservation_lease must be at least 1 seconds"),
    ({"reservation_lease": "soon"}, "reservation_lease must be a positive number"),
    ({"reservation_lease": "inf"}, "reservation_lease must be a positive number"),
])
def test_bad_options_are_refused_at_start_up(options, message):
    choice = StoreChoice(Live(MemoryStore()))
    with taddons.context(choice) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(choice, **options)


@pytest.mark.parametrize("redis_url", ["", "redis://127.0.0.1:1/0"])
def test_reservation_lease_is_the_shared_stores_lease_and_may_change_while_running(redis_url):
    a = Live(MemoryStore())
    choice = StoreChoice(a)
    with taddons.context(choice) as tctx:
        tctx.configure(choice, redis_url=redis_url)
        assert a.store.lease == 60.0  # the default
        tctx.configure(choice, reservation_lease="4.5")
        assert a.store.lease == 4.5
        if not redis_url:  # (the Redis one is not running here: tests/e2e/test_reservations_redis.py)
            limits = Limits(max_parallel=1)
            assert a.store.reserve("k", limits, Demand(), now=0.0).ticket is not None
            assert a.store.reserve("k", limits, Demand(), now=4.4).refused == "max_parallel"
            assert a.store.reserve("k", limits, Demand(), now=4.5).refused is None


