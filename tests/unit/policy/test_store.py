"""MemoryStore: the sliding windows and spend buckets, with the time passed in."""

from addon.policy.memory_store import MemoryStore
from addon.policy.store import BUCKET, Spend, retry_after_header


def test_rpm_admits_up_to_the_limit_then_says_when_a_slot_frees():
    store = MemoryStore()
    assert store.take_request("k", 2, now=100.0) is None
    assert store.take_request("k", 2, now=110.0) is None
    assert store.take_request("k", 2, now=120.0) == 40.0  # the request at 100 leaves at 160
    # a refused request takes no slot: at 160 the first one has left the window
    assert store.take_request("k", 2, now=160.0) is None
    assert store.take_request("k", 2, now=161.0) == 9.0


def test_rpm_is_per_key():
    store = MemoryStore()
    assert store.take_request("a", 1, now=0.0) is None
    assert store.take_request("b", 1, now=0.0) is None
    assert store.take_request("a", 1, now=1.0) is not None


def test_tpm_counts_recorded_tokens_of_the_last_minute():
    store = MemoryStore()
    assert store.tokens_wait("k", 100, now=0.0) is None
    store.add_usage("k", 60, 0.0, when=10.0)
    assert store.tokens_wait("k", 100, now=11.0) is None
    store.add_usage("k", 50, 0.0, when=20.0)
    # 110 >= 100: wait until the 60 recorded at 10 leave (at 70)
    assert store.tokens_wait("k", 100, now=21.0) == 49.0
    assert store.tokens_wait("k", 100, now=70.0) is None


def test_spend_lifetime_and_rolling_period():
    store = MemoryStore()
    day = 86400
    store.add_usage("k", 100, 1.0, when=0.0)
    store.add_usage("k", 10, 0.5, when=3 * day)
    assert store.spend("k", None, now=3 * day) == Spend(110, 1.5)
    assert store.spend("k", day, now=3 * day + 10) == Spend(10, 0.5)
    assert store.spend("other", None, now=0.0) == Spend(0, 0.0)


def test_spend_period_counts_whole_overlapping_hours():
    store = MemoryStore()
    store.add_usage("k", 5, 0.0, when=BUCKET + 10)
    # a 1h window ending at 2h+20 starts at 1h+20, inside the bucket of the usage: counted
    assert store.spend("k", 3600, now=2 * BUCKET + 20).tokens == 5
    assert store.spend("k", 3600, now=3 * BUCKET + 20).tokens == 0


def test_seed_spend_does_not_count_towards_tpm():
    store = MemoryStore()
    store.seed_spend("k", 1000, 2.0, when=0.0)
    assert store.tokens_wait("k", 10, now=1.0) is None
    assert store.spend("k", None, now=1.0) == Spend(1000, 2.0)


def test_retry_after_rounds_up_to_whole_seconds():
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(40.0) == "40"
    assert retry_after_header(40.2) == "41"


def test_seed_tokens_fills_only_the_tpm_window():
    store = MemoryStore()
    store.seed_tokens("k", 10, when=100.0)
    assert store.tokens_wait("k", 10, now=101.0) == 59.0
    assert store.spend("k", None, now=101.0) == Spend(0, 0.0)


def test_the_tpm_window_stays_one_minute_long_for_keys_nobody_asks_about():
    store = MemoryStore()
    for i in range(10_000):  # a key with no tpm limit: tokens_wait is never called for it
        store.add_usage("k", 5, 0.0, when=1000.0 + i)
    assert len(store._tokens["k"]) <= 61
    assert store.tokens_wait("k", tpm=10**9, now=1000.0 + 9_999) is None
    assert store._token_sums["k"] == 5 * len(store._tokens["k"])
    assert store.spend("k", None, 20_000.0).tokens == 50_000  # spend still counts everything


def test_spend_buckets_are_kept_only_as_long_as_a_budget_period_can_reach():
    from addon.policy.store import MAX_BUDGET_PERIOD, RETENTION_HOURS

    store = MemoryStore()
    for hour in range(3 * 366 * 24):  # three years of hourly usage
        store.add_usage("k", 10, 0.01, when=hour * BUCKET)
    now = 3 * 366 * 24 * BUCKET
    assert len(store._spend["k"].buckets) <= RETENTION_HOURS + 1
    assert store.spend("k", None, now).tokens == 3 * 366 * 24 * 10  # lifetime: everything
    assert store.spend("k", MAX_BUDGET_PERIOD, now).tokens == 366 * 24 * 10


def test_a_rolling_period_answer_follows_new_usage_and_the_hour_moving_on():
    store = MemoryStore()
    day = 86400
    store.add_usage("k", 100, 1.0, when=0.0)
    assert store.spend("k", day, now=10.0) == Spend(100, 1.0)
    store.add_usage("k", 5, 0.5, when=20.0)  # after the answer was computed
    assert store.spend("k", day, now=30.0) == Spend(105, 1.5)
    store.add_usage("k", 7, 0.25, when=day + 2 * BUCKET)
    # a day later the first hour has left the window, the new usage is in it
    assert store.spend("k", day, now=day + 2 * BUCKET + 1) == Spend(7, 0.25)
    assert store.spend("k", 2 * day, now=day + 2 * BUCKET + 1) == Spend(112, 1.75)  # another period
    assert store.spend("k", day, now=day + 2 * BUCKET + 2) == Spend(7, 0.25)
