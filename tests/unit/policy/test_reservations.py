"""The reservation semantics (policy/store.py) on MemoryStore. Every test here that takes `store`
is the contract RedisStore keeps too: tests/e2e/test_reservations_redis.py runs the same tests
against a real redis-server."""

import asyncio
import inspect
import time

import pytest

from addon.policy.memory_store import MemoryStore
from addon.policy.store import (
    BUDGET_TOKENS, BUDGET_USD, PARALLEL, RESERVATION_LEASE, RPM, TPM, Demand, Limits, Verdict, renew_leases,
)


@pytest.fixture
def store():
    return MemoryStore()


def test_concurrent_reservations_never_overshoot_a_token_budget(store):
    limits = Limits(budget_tokens=100)
    first = store.reserve("k", limits, Demand(40), now=0.0)
    second = store.reserve("k", limits, Demand(40), now=0.0)
    assert first.refused is None and second.refused is None and first.ticket != second.ticket
    third = store.reserve("k", limits, Demand(40), now=0.0)  # 80 held + 40 > 100, though 0 is spent
    assert third == Verdict(None, BUDGET_TOKENS, 0.0, 80)
    assert store.reserve("k", limits, Demand(20), now=0.0).refused is None  # the rest still fits exactly


def test_settle_replaces_the_worst_case_by_the_real_usage(store):
    limits = Limits(budget_tokens=100)
    ticket = store.reserve("k", limits, Demand(90), now=0.0).ticket
    assert store.reserve("k", limits, Demand(20), now=0.0).refused == BUDGET_TOKENS
    store.settle("k", ticket, 15, 0.0, when=1.0)
    assert store.reserve("k", limits, Demand(85), now=2.0).refused is None  # 15 spent + 85 = 100


def test_release_frees_the_reservation_and_charges_nothing(store):
    limits = Limits(budget_usd=1.0)
    ticket = store.reserve("k", limits, Demand(10, 0.8), now=0.0).ticket
    assert store.reserve("k", limits, Demand(10, 0.3), now=0.0) == Verdict(None, BUDGET_USD, 0.0, 0.8)
    store.release("k", ticket)
    assert store.reserve("k", limits, Demand(10, 1.0), now=1.0).refused is None


def test_a_used_up_budget_refuses_even_a_request_that_asks_for_nothing(store):
    store.add_usage("k", 100, 0.0, when=0.0)
    assert store.reserve("k", Limits(budget_tokens=100), Demand(0), now=1.0).refused == BUDGET_TOKENS


def test_a_reservation_nobody_renews_expires_after_its_lease(store):
    limits = Limits(budget_tokens=100, max_parallel=1)
    assert store.reserve("k", limits, Demand(100), now=0.0).ticket is not None  # never settled (worker gone)
    assert store.reserve("k", limits, Demand(1), now=RESERVATION_LEASE - 1).refused == BUDGET_TOKENS
    assert store.reserve("k", limits, Demand(1), now=RESERVATION_LEASE).refused is None


def test_a_reservation_its_holder_renews_is_held_past_the_lease_until_it_ends(store):
    """A long stream: its holder renews every third of the lease, so its slot and its worst case
    stay held for as long as it runs, many leases long; settled, both are free at once."""
    limits = Limits(budget_tokens=100, max_parallel=1)
    lease = store.lease
    ticket = store.reserve("k", limits, Demand(90), now=0.0).ticket
    for now in range(1, 10):  # nine leases
        assert store.renew(now * lease - 1) is True
        refused = store.reserve("k", limits, Demand(20), now=now * lease + lease / 2)
        assert (refused.refused, refused.used) == (BUDGET_TOKENS, 90)  # its worst case is still held
        assert store.reserve("k", Limits(max_parallel=1), Demand(), now=now * lease + lease / 2).refused == PARALLEL
    store.settle("k", ticket, 10, 0.0, when=10 * lease)
    assert store.reserve("k", limits, Demand(90), now=10 * lease).refused is None  # 10 spent + 90


def test_renewing_holds_only_what_is_still_in_flight(store):
    limits = Limits(max_parallel=2)
    ended = store.reserve("k", limits, Demand(), now=0.0).ticket
    store.reserve("k", limits, Demand(), now=0.0)
    store.release("k", ended)
    assert store.renew(RESERVATION_LEASE - 1) is True  # a released ticket is not brought back
    assert store.reserve("k", limits, Demand(), now=RESERVATION_LEASE).refused is None
    assert store.reserve("k", limits, Demand(), now=RESERVATION_LEASE).refused == PARALLEL


def test_max_parallel_counts_requests_in_flight(store):
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


def test_tpm_counts_what_requests_in_flight_hold(store):
    limits = Limits(tpm=100)
    held = store.reserve("k", limits, Demand(70), now=0.0).ticket
    refused = store.reserve("k", limits, Demand(40), now=0.0)
    assert (refused.refused, refused.wait) == (TPM, 1.0)  # nothing recorded to wait for: the holder settles
    store.settle("k", held, 70, 0.0, when=5.0)
    refused = store.reserve("k", limits, Demand(40), now=6.0)
    assert (refused.refused, refused.wait) == (TPM, 59.0)  # the 70 recorded at 5 leave at 65
    assert store.reserve("k", limits, Demand(30), now=6.0).refused is None


def test_a_request_alone_in_an_empty_tpm_window_is_admitted_whatever_its_worst_case(store):
    assert store.reserve("k", Limits(tpm=10), Demand(5000), now=0.0).refused is None
    assert store.reserve("k", Limits(tpm=10), Demand(1), now=0.0).refused == TPM


def test_refusals_take_no_rpm_slot_and_rpm_alone_holds_no_reservation(store):
    limits = Limits(rpm=1, budget_tokens=10)
    assert store.reserve("k", limits, Demand(11), now=0.0).refused == BUDGET_TOKENS
    assert store.reserve("k", limits, Demand(5), now=0.0).refused is None  # the slot was still free
    assert store.reserve("k", limits, Demand(1), now=1.0) == Verdict(None, RPM, 59.0, 1)
    assert store.reserve("r", Limits(rpm=5), Demand(), now=0.0) == Verdict()  # admitted, nothing to settle


def test_a_window_wait_is_never_longer_than_the_window_when_another_gateway_counted_a_later_now(store):
    # two gateways sharing Redis each stamp a request with their own `now`; one taken a moment
    # earlier may reach the store after the other's: Retry-After must still be at most 60 s
    assert store.reserve("r", Limits(rpm=1), Demand(), now=10.5).refused is None
    assert store.reserve("r", Limits(rpm=1), Demand(), now=10.0) == Verdict(None, RPM, 60.0, 1)
    held = store.reserve("t", Limits(tpm=100), Demand(80), now=10.5).ticket
    store.settle("t", held, 80, 0.0, when=10.5)
    assert store.reserve("t", Limits(tpm=100), Demand(40), now=10.0).wait == 60.0


def test_a_period_budget_counts_the_hours_in_its_period_as_they_pass_and_as_usage_is_counted(store):
    day = 86400
    limits = Limits(budget_tokens=100, budget_period=day)
    start = 100 * day  # the hour buckets start at multiples of 3600
    store.add_usage("k", 60, 0.0, when=start + 10)
    store.add_usage("k", 30, 0.0, when=start + 2 * 3600)
    assert store.reserve("k", limits, Demand(20), now=start + 3 * 3600) == Verdict(None, BUDGET_TOKENS, 0.0, 90)
    store.add_usage("k", 5, 0.0, when=start + 3 * 3600 + 1)  # counted after a check in the same hour
    assert store.reserve("k", limits, Demand(6), now=start + 3 * 3600 + 2) == Verdict(None, BUDGET_TOKENS, 0.0, 95)
    assert store.reserve("k", limits, Demand(5), now=start + 3 * 3600 + 3).refused is None
    # a day later the first hour has left the period: 30 + 5 spent (the 5 held then have expired)
    assert store.reserve("k", limits, Demand(66), now=start + day + 3600) == Verdict(None, BUDGET_TOKENS, 0.0, 35)
    ticket = store.reserve("k", limits, Demand(60), now=start + day + 3600).ticket
    store.settle("k", ticket, 10, 0.0, when=start + day + 3600 + 1)
    assert store.reserve("k", limits, Demand(56), now=start + day + 3600 + 2) == Verdict(None, BUDGET_TOKENS, 0.0, 45)
    assert store.reserve("k", limits, Demand(55), now=start + day + 3600 + 3).refused is None








async def renewed_in_the_background(store, expiry) -> None:
    """renew_leases in real time: a ticket's expiry moves forward while it runs (waited for as a
    condition; the lease is short, the wait only bounds a hang). `expiry(ticket)` reads it."""
    heartbeat = asyncio.get_running_loop().create_task(renew_leases(store))
    try:
        verdict = store.reserve("k", Limits(max_parallel=1), Demand(), now=time.time())
        ticket = (await verdict if inspect.isawaitable(verdict) else verdict).ticket  # RedisStore's is async
        first = await expiry(ticket)
        deadline = time.monotonic() + 60
        while await expiry(ticket) < first + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await expiry(ticket) >= first + 1  # renewed, more than once
    finally:
        heartbeat.cancel()


def test_renew_leases_renews_in_the_background_every_third_of_the_lease():
    store = MemoryStore(lease=1.5)

    async def expiry(ticket) -> float:
        return store._held["k"][ticket][2]

    asyncio.run(renewed_in_the_background(store, expiry))
