"""Holds whose usage comes later (policy/store.py, `defer`): a Responses background create's
reservation becomes a hold on the response id, counted against budgets and tpm without a
max_parallel slot, settled once by the first answer that shows the usage, or charged its worst
case when due. The contract, on MemoryStore; tests/e2e/test_deferred_holds_redis.py runs it on
RedisStore against a real redis-server."""

import json

import pytest

from addon.policy.memory_store import MemoryStore
from addon.policy.store import BUDGET_TOKENS, BUDGET_USD, TPM, Demand, Due, Limits
from addon.wire.tokens import Usage

META = json.dumps({"key": "k", "model": "gpt-4o", "price": [2.5, 10.0, 1.25]})
LIMITS = Limits(budget_tokens=100, max_parallel=1)


@pytest.fixture
def store():
    return MemoryStore()


def deferred(store, tokens=60, usd=0.0, until=100.0, rid="resp_1", limits=LIMITS, key="k"):
    ticket = store.reserve(key, limits, Demand(tokens, usd), now=0.0).ticket
    assert ticket is not None
    store.defer(key, ticket, rid, tokens, usd, until, META)
    return ticket


def test_a_deferred_hold_keeps_its_worst_case_against_the_budget_but_no_parallel_slot(store):
    deferred(store)
    assert store.reserve("k", LIMITS, Demand(50), now=1.0).refused == BUDGET_TOKENS  # 60 still held
    assert store.reserve("k", LIMITS, Demand(40), now=1.0).refused is None  # and the one slot is free


def test_it_is_settled_once_to_the_usage_priced_with_its_own_price(store):
    deferred(store, usd=0.5, limits=Limits(budget_tokens=100, budget_usd=1.0))
    usage = Usage(10, 5, 4)
    meta, usd = store.settle_deferred("k", "resp_1", usage, when=2.0)
    assert meta == META and usd == pytest.approx((6 * 2.5 + 4 * 1.25 + 5 * 10.0) / 1e6)
    assert store.settle_deferred("k", "resp_1", usage, when=3.0) is None  # a second GET counts nothing
    assert store.charge_due(10**9) == []
    assert store.reserve("k", Limits(budget_tokens=100), Demand(85), now=4.0).refused is None  # 15 spent + 85
    assert store.reserve("k", Limits(budget_tokens=100), Demand(1), now=4.0).refused == BUDGET_TOKENS


def test_one_nobody_settles_is_charged_its_worst_case_when_due_and_not_before(store):
    deferred(store, tokens=60, usd=0.25)
    assert store.charge_due(99.0) == []
    assert store.reserve("k", Limits(budget_tokens=100), Demand(41), now=99.0).refused == BUDGET_TOKENS  # held
    assert store.charge_due(100.0) == [Due("k", "resp_1", 60, 0.25, 100.0, META)]
    assert store.charge_due(200.0) == []  # once
    assert store.settle_deferred("k", "resp_1", Usage(1, 1), when=201.0) is None  # too late: its worst case was charged
    refused = store.reserve("k", Limits(budget_tokens=100, budget_usd=0.3), Demand(41), now=202.0)
    assert (refused.refused, refused.used) == (BUDGET_TOKENS, 60)  # spent now, no longer held
    assert store.reserve("k", Limits(budget_usd=0.3), Demand(1, 0.06), now=202.0).refused == BUDGET_USD


def test_a_poll_that_shows_it_running_moves_its_due_time_on_never_back(store):
    deferred(store, until=100.0)
    store.extend("k", "resp_1", 200.0)
    store.extend("k", "resp_1", 50.0)
    assert store.charge_due(150.0) == []
    assert [d.resource_id for d in store.charge_due(200.0)] == ["resp_1"]
    store.extend("k", "resp_1", 500.0)  # gone: nothing to move
    assert store.charge_due(500.0) == []


def test_renewing_never_brings_the_deferred_reservation_back(store):
    deferred(store, tokens=60)
    assert store.renew(1.0) is True
    assert store.reserve("k", LIMITS, Demand(40), now=2.0).refused is None  # the slot, and 60 + 40 <= 100


def test_a_deferred_hold_counts_in_tpm_and_a_request_is_not_alone_beside_it(store):
    deferred(store, tokens=60, limits=Limits(tpm=100))
    refused = store.reserve("k", Limits(tpm=100), Demand(50), now=1.0)
    assert refused.refused == TPM


def test_a_key_without_limits_defers_without_a_ticket_and_its_usage_is_counted_once(store):
    store.defer("free", None, "resp_9", 0, 0.0, 100.0, META)
    assert store.settle_deferred("free", "resp_9", Usage(3, 4), when=1.0)[0] == META
    assert store.settle_deferred("free", "resp_9", Usage(3, 4), when=1.0) is None
    assert store.spend("free", None, 2.0).tokens == 7


def test_holds_are_per_key_and_per_response(store):
    deferred(store, rid="resp_a", until=100.0)
    deferred(store, tokens=30, rid="resp_b", until=300.0)
    deferred(store, tokens=10, rid="resp_a", until=100.0, key="other")
    assert store.settle_deferred("other", "resp_b", Usage(1, 1), when=1.0) is None
    assert sorted((d.key, d.resource_id) for d in store.charge_due(100.0)) == [("k", "resp_a"), ("other", "resp_a")]
    assert store.spend("k", None, 101.0).tokens == 60
