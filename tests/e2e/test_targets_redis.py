"""Target cooldowns RedisStore shares between gateways through a real redis-server, and keeps
locally while it is down. Selection over MemoryStore: tests/unit/policy/test_targets.py."""

import asyncio
import logging
import random
import time

import pytest

from addon.policy.redis_store import RedisStore
from addon.policy.targets import pick
from tests.unit.policy.test_targets import three

KEYS = ["sk-real-pick-%d-0000000%d" % (i, i) for i in range(5)]


async def settle(store):
    while store._tasks:
        await asyncio.wait(list(store._tasks))


@pytest.mark.fleet
def test_a_cooldown_set_by_one_redis_store_is_honoured_by_another_after_the_sync(redis_server):
    async def scenario():
        vk = three()
        one, two = RedisStore(redis_server.url, "cd:"), RedisStore(redis_server.url, "cd:")
        other_prefix = RedisStore(redis_server.url, "elsewhere:")
        third = RedisStore(redis_server.url, "cd:")
        try:
            now = time.time()
            two.start_cooldown_sync()
            other_prefix.start_cooldown_sync()
            assert one.cool_down(vk.targets[0].id, now + 30) is True
            assert one.cooldown_until(vk.targets[0].id) == now + 30  # local at once, no I/O
            await settle(one)
            # a shorter cooldown from another gateway never shortens the shared one
            assert await third.share_cooldowns([(vk.targets[0].id, now + 5)])
            deadline = time.monotonic() + 3
            while two.cooldown_until(vk.targets[0].id) == 0.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert two.cooldown_until(vk.targets[0].id) == now + 30
            assert {pick(vk, two, now, rand=random.Random(i).random) for i in range(50)} == {1}
            assert other_prefix.cooldown_until(vk.targets[0].id) == 0.0  # another prefix: not shared
            # an ended entry is dropped from Redis by the next write
            one.cool_down("gone", now - 1)
            one.cool_down(vk.targets[1].id, now + 60)
            await settle(one)
        finally:
            for store in (one, two, other_prefix, third):
                await store.close()

    asyncio.run(scenario())
    stored = redis_server.command("HGETALL", "cd:cooldowns").decode()
    assert "gone" not in stored and stored.count("\r\n") == 9  # two fields: *4 + 4 bulk strings
    assert 0 < int(redis_server.command("TTL", "cd:cooldowns")[1:].strip()) <= 61


@pytest.mark.fleet
def test_with_redis_stopped_cooldowns_work_locally_and_are_shared_once_it_is_back(redis_server, caplog):
    async def scenario():
        vk = three()
        one, two = RedisStore(redis_server.url, "cd:"), RedisStore(redis_server.url, "cd:")
        try:
            redis_server.stop()
            now = time.time()
            with caplog.at_level(logging.INFO, logger="gateway"):
                await one.pull_cooldowns(now)
                assert one.cool_down(vk.targets[0].id, now + 30) is True
                await settle(one)
                await one.pull_cooldowns(now)
                # local cooldowns still work while Redis is down
                assert {pick(vk, one, now, rand=random.Random(i).random) for i in range(50)} == {1}
                assert one.cool_down(vk.targets[1].id, now + 30) is True
                assert pick(vk, one, now) == 2
                await settle(one)
                redis_server.start()
                await one.pull_cooldowns(time.time())  # back: ours are written again
                await two.pull_cooldowns(time.time())
            assert two.cooldown_until(vk.targets[0].id) == now + 30
            assert two.cooldown_until(vk.targets[1].id) == now + 30
        finally:
            await one.close()
            await two.close()

    asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in line for line in lines) == 1  # one line per outage
    assert sum("reachable again" in line for line in lines) == 1
    assert not any(secret in caplog.text for secret in KEYS)
