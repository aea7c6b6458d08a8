"""MemoryStore: the sliding windows and spend buckets, with the time passed in."""

from addon.policy.store import BUCKET, MemoryStore, Spend, retry_after_header


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


# --- reservations (reserve / settle / release) -----------------------------------------

from addon.policy.store import (  # noqa: E402
    BUDGET_TOKENS, BUDGET_USD, PARALLEL, RESERVATION_TTL, RPM, TPM, Demand, Limits, Verdict,
)


def test_concurrent_reservations_never_overshoot_a_token_budget():
    store = MemoryStore()
    limits = Limits(budget_tokens=100)
    first = store.reserve("k", limits, Demand(40), now=0.0)
    second = store.reserve("k", limits, Demand(40), now=0.0)
    assert first.refused is None and second.refused is None and first.ticket != second.ticket
    third = store.reserve("k", limits, Demand(40), now=0.0)  # 80 held + 40 > 100, though 0 is spent
    assert third == Verdict(None, BUDGET_TOKENS, 0.0, 80)
    assert store.reserve("k", limits, Demand(20), now=0.0).refused is None  # the rest still fits exactly


def test_settle_replaces_the_worst_case_by_the_real_usage():
    store = MemoryStore()
    limits = Limits(budget_tokens=100)
    ticket = store.reserve("k", limits, Demand(90), now=0.0).ticket
    assert store.reserve("k", limits, Demand(20), now=0.0).refused == BUDGET_TOKENS
    store.settle("k", ticket, 15, 0.0, when=1.0)
    assert store.spend("k", None, now=2.0) == Spend(15, 0.0)
    assert store.reserve("k", limits, Demand(85), now=2.0).refused is None  # 15 spent + 85 = 100


def test_release_frees_the_reservation_and_charges_nothing():
    store = MemoryStore()
    limits = Limits(budget_usd=1.0)
    ticket = store.reserve("k", limits, Demand(10, 0.8), now=0.0).ticket
    assert store.reserve("k", limits, Demand(10, 0.3), now=0.0) == Verdict(None, BUDGET_USD, 0.0, 0.8)
    store.release("k", ticket)
    assert store.spend("k", None, now=1.0) == Spend(0, 0.0)
    assert store.reserve("k", limits, Demand(10, 1.0), now=1.0).refused is None


def test_a_used_up_budget_refuses_even_a_request_that_asks_for_nothing():
    store = MemoryStore()
    store.add_usage("k", 100, 0.0, when=0.0)
    assert store.reserve("k", Limits(budget_tokens=100), Demand(0), now=1.0).refused == BUDGET_TOKENS


def test_a_reservation_expires_after_its_bound():
    store = MemoryStore()
    limits = Limits(budget_tokens=100, max_parallel=1)
    assert store.reserve("k", limits, Demand(100), now=0.0).ticket is not None  # never settled (worker gone)
    assert store.reserve("k", limits, Demand(1), now=RESERVATION_TTL - 1).refused == BUDGET_TOKENS
    assert store.reserve("k", limits, Demand(1), now=RESERVATION_TTL).refused is None


def test_max_parallel_counts_requests_in_flight():
    store = MemoryStore()
    limits = Limits(max_parallel=2)
    a = store.reserve("k", limits, Demand(), now=0.0).ticket
    b = store.reserve("k", limits, Demand(), now=0.0).ticket
    refused = store.reserve("k", limits, Demand(), now=0.0)
    assert (refused.refused, refused.wait, refused.used) == (PARALLEL, 1.0, 2)
    assert store.reserve("other", limits, Demand(), now=0.0).refused is None  # per key
    store.settle("k", a, 5, 0.0, when=1.0)
    c = store.reserve("k", limits, Demand(), now=1.0).ticket
    assert c is not None
    store.release("k", b)
    store.release("k", b)  # twice: harmless
    assert store.reserve("k", limits, Demand(), now=1.0).refused is None
    assert store.reserve("k", limits, Demand(), now=1.0).refused == PARALLEL


def test_tpm_counts_what_requests_in_flight_hold():
    store = MemoryStore()
    limits = Limits(tpm=100)
    held = store.reserve("k", limits, Demand(70), now=0.0).ticket
    refused = store.reserve("k", limits, Demand(40), now=0.0)
    assert (refused.refused, refused.wait) == (TPM, 1.0)  # nothing recorded to wait for: the holder settles
    store.settle("k", held, 70, 0.0, when=5.0)
    refused = store.reserve("k", limits, Demand(40), now=6.0)
    assert (refused.refused, refused.wait) == (TPM, 59.0)  # the 70 recorded at 5 leave at 65
    assert store.reserve("k", limits, Demand(30), now=6.0).refused is None


def test_a_request_alone_in_an_empty_tpm_window_is_admitted_whatever_its_worst_case():
    store = MemoryStore()
    assert store.reserve("k", Limits(tpm=10), Demand(5000), now=0.0).refused is None
    assert store.reserve("k", Limits(tpm=10), Demand(1), now=0.0).refused == TPM


def test_refusals_take_no_rpm_slot_and_rpm_alone_holds_no_reservation():
    store = MemoryStore()
    limits = Limits(rpm=1, budget_tokens=10)
    assert store.reserve("k", limits, Demand(11), now=0.0).refused == BUDGET_TOKENS
    assert store.reserve("k", limits, Demand(5), now=0.0).refused is None  # the slot was still free
    assert store.reserve("k", limits, Demand(1), now=1.0) == Verdict(None, RPM, 59.0, 1)
    assert store.reserve("r", Limits(rpm=5), Demand(), now=0.0) == Verdict()  # admitted, nothing to settle
