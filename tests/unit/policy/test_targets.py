"""Target selection and cooldowns: policy/targets.py over MemoryStore. The cooldowns RedisStore
shares: tests/e2e/test_targets_redis.py."""

import logging
import random
from collections import Counter


from addon.policy.keys_parse import parse_keys
from addon.policy.memory_store import MemoryStore
from addon.policy.targets import cool, pick, retry_after

NOW = 1_800_000_000.0
KEYS = ["sk-real-pick-%d-0000000%d" % (i, i) for i in range(5)]


def key(*targets, name="team-alpha"):
    conf = [{"provider": provider, "api_key": KEYS[i], **extra} for i, (provider, extra) in enumerate(targets)]
    return parse_keys({"virtual_keys": {"vk": {"name": name, "targets": conf}}}).lookup("vk")


def three():
    """Primaries 3:1 (openai, openai), then two fallbacks (anthropic, deepseek)."""
    return key(
        ("openai", {"weight": 3}), ("openai", {}), ("anthropic", {"fallback": True}), ("deepseek", {"fallback": True})
    )


def test_weights_3_to_1_over_4000_picks():
    vk, store, rng = three(), MemoryStore(), random.Random(14)
    counts = Counter(pick(vk, store, NOW, rand=rng.random) for _ in range(4000))
    assert set(counts) == {0, 1}  # fallbacks only when no primary can serve
    # expected 3000 : 1000; binomial sd is ~27, so 3 sd is ~82: allow 100
    assert abs(counts[0] - 3000) <= 100, counts


def test_weights_among_the_primaries_left_when_one_cools():
    vk = key(("openai", {"weight": 1}), ("openai", {"weight": 2}), ("openai", {"weight": 6}))
    store, rng = MemoryStore(), random.Random(7)
    store.cool_down(vk.targets[2].id, NOW + 30, NOW)
    counts = Counter(pick(vk, store, NOW, rand=rng.random) for _ in range(3000))
    assert set(counts) == {0, 1}
    assert abs(counts[1] - 2000) <= 80, counts  # 1:2 of the two left: the redraw keeps the weights


def test_cooled_targets_are_skipped_and_tried_ones_too():
    vk, store = three(), MemoryStore()
    store.cool_down(vk.targets[0].id, NOW + 30, NOW)
    assert {pick(vk, store, NOW, rand=random.Random(i).random) for i in range(200)} == {1}
    assert {pick(vk, store, NOW, tried={1}, rand=random.Random(i).random) for i in range(50)} == {2}
    store.forget_cooldown(vk.targets[0].id)
    assert {pick(vk, store, NOW, tried=(1,), rand=random.Random(i).random) for i in range(50)} == {0}
    assert {pick(vk, store, NOW, tried=(0,), rand=random.Random(i).random) for i in range(50)} == {1}


def test_fallbacks_only_when_no_primary_can_serve_and_in_file_order():
    vk, store = three(), MemoryStore()
    store.cool_down(vk.targets[0].id, NOW + 30, NOW)
    store.cool_down(vk.targets[1].id, NOW + 30, NOW)
    assert pick(vk, store, NOW) == 2  # the first fallback in file order
    assert pick(vk, store, NOW, tried=[2]) == 3
    store.cool_down(vk.targets[2].id, NOW + 30, NOW)
    assert pick(vk, store, NOW) == 3
    assert pick(vk, store, NOW, tried=[3]) is None
    assert pick(vk, store, NOW, tried=[0, 1, 2, 3]) is None


def test_serves_is_respected_for_primaries_and_fallbacks():
    vk, store = three(), MemoryStore()
    asked = []

    def only(provider):
        def serves(target):
            asked.append(target.label)
            return target.provider == provider
        return serves

    assert {pick(vk, store, NOW, serves=only("anthropic"), rand=random.Random(i).random) for i in range(20)} == {2}
    assert {pick(vk, store, NOW, serves=only("deepseek")) for _ in range(5)} == {3}
    assert pick(vk, store, NOW, serves=only("groq")) is None
    asked.clear()
    assert pick(vk, store, NOW, serves=only("openai"), rand=lambda: 0.1) == 0
    assert asked == ["0"]  # the healthy drawn target is the only one looked at


def test_a_cooldown_that_ended_is_logged_once_with_the_masked_key_and_forgotten(caplog):
    vk, store = three(), MemoryStore()
    target = vk.targets[2]
    assert store.cool_down(target.id, NOW + 30, NOW) is True
    store.cool_down(vk.targets[0].id, NOW + 30, NOW)
    store.cool_down(vk.targets[1].id, NOW + 30, NOW)
    assert pick(vk, store, NOW + 29) == 3  # still cooling: the next fallback
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert pick(vk, store, NOW + 31, tried=(0, 1)) == 2
        assert pick(vk, store, NOW + 32, tried=(0, 1)) == 2
    healthy = [r.getMessage() for r in caplog.records if "healthy again" in r.getMessage()]
    assert healthy == ["gateway: target anthropic[2] (sk-...002) of team-alpha is healthy again"]
    assert store.cooldown_until(target.id) == 0.0
    assert not any(secret in caplog.text for secret in KEYS)


def test_cool_logs_entering_once_and_keeps_the_later_until(caplog):
    vk, store = three(), MemoryStore()
    with caplog.at_level(logging.INFO, logger="gateway"):
        cool(vk, 1, store, 30, NOW, "HTTP 503")
        cool(vk, 1, store, 10, NOW + 1, "HTTP 503")  # shorter: the running one stays
        cool(vk, 1, store, 600, NOW + 2, "HTTP 401: the real key was refused")  # longer: extended, not logged again
    entered = [r.getMessage() for r in caplog.records if "cooling down" in r.getMessage()]
    assert entered == ["gateway: target openai[1] (sk-...001) of team-alpha cooling down for 30s (HTTP 503)"]
    assert store.cooldown_until(vk.targets[1].id) == NOW + 602
    assert not any(secret in caplog.text for secret in KEYS)


def test_retry_after_is_the_first_cooldown_to_end_at_least_one_second():
    vk, store = three(), MemoryStore()
    for i, seconds in enumerate((40, 25, 600, 90)):
        store.cool_down(vk.targets[i].id, NOW + seconds, NOW)
    assert pick(vk, store, NOW) is None
    assert retry_after(vk, store, NOW) == 25
    assert retry_after(vk, store, NOW + 24.5) == 1.0  # never below a second
    assert retry_after(vk, store, NOW + 30) == 1.0  # one has ended: it can be picked at once
    assert pick(vk, store, NOW + 30) == 1


def test_pool_targets_share_cooldowns_across_keys():
    store_keys = parse_keys(
        {
            "pools": {"main": [{"provider": "openai", "api_key": KEYS[0]}, {"provider": "openai", "api_key": KEYS[1]}]},
            "virtual_keys": {
                "vk_a": {"targets": "main"},
                "vk_b": {"targets": "main"},
                "vk_c": {
                    "targets": [{"provider": "openai", "api_key": KEYS[0]}, {"provider": "groq", "api_key": KEYS[2]}]
                },
            },
        }
    )
    store = MemoryStore()
    cool(store_keys.lookup("vk_a"), 0, store, 30, NOW, "connect error")
    assert {pick(store_keys.lookup("vk_b"), store, NOW, rand=random.Random(i).random) for i in range(50)} == {1}
    # the same real key at the same URL in another key's own list: cooling too
    assert {pick(store_keys.lookup("vk_c"), store, NOW, rand=random.Random(i).random) for i in range(50)} == {1}


def test_a_classic_key_ignores_cooldowns():
    vk = parse_keys({"virtual_keys": {"vk": {"provider": "openai", "api_key": KEYS[0]}}}).lookup("vk")
    store = MemoryStore()
    store.cool_down(vk.targets[0].id, NOW + 30, NOW)
    assert pick(vk, store, NOW) == 0
    assert pick(vk, store, NOW, tried={0}) is None
    assert pick(vk, store, NOW, serves=lambda t: False) is None


def test_memory_store_cooldowns():
    store = MemoryStore()
    assert store.cooldown_until("t1") == 0.0
    assert store.cool_down("t1", NOW + 30, NOW) is True
    assert store.cool_down("t1", NOW + 10, NOW + 1) is False  # cooling: not "entered" again
    assert store.cooldown_until("t1") == NOW + 30
    assert store.cool_down("t1", NOW + 60, NOW + 2) is False
    assert store.cooldown_until("t1") == NOW + 60
    assert store.cool_down("t1", NOW + 200, NOW + 100) is True  # the old one had ended
    store.forget_cooldown("t1")
    store.forget_cooldown("t-unknown")
    assert store.cooldown_until("t1") == 0.0


# --- RedisStore: cooldowns shared between gateways --------------------------------------






