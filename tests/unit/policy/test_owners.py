"""Stored responses' owners (policy/owners.py): the store method pair in MemoryStore and the check the
Gateway makes. Through a real Redis and two gateways: tests/e2e/test_owners_redis.py."""

from __future__ import annotations


import pytest

from addon.policy import owners
from addon.policy.memory_store import MemoryStore
from addon.policy.store import OWNER_TTL, OWNERS_PER_KEY
from addon.wire.errors import GatewayError

NOW = 1_800_000_000.0


def test_memory_store_keeps_owners_for_the_ttl_and_a_bounded_number_per_key():
    store = MemoryStore()
    store.note_owner("resp_a", "fp-one", NOW)
    assert store.owner_of("resp_a", NOW + OWNER_TTL - 1) == "fp-one"
    assert store.owner_of("resp_a", NOW + OWNER_TTL) is None  # expired
    assert store.owner_of("resp_unknown", NOW) is None
    store.note_owner("resp_a", "fp-two", NOW)  # recorded again: the latest creator, and the newest entry
    assert store.owner_of("resp_a", NOW) == "fp-two"
    store.owners_per_key = 3
    for name in ("resp_b", "resp_c", "resp_d", "resp_e"):
        store.note_owner(name, "fp-one", NOW)
    assert [store.owner_of(n, NOW) for n in ("resp_a", "resp_b", "resp_c", "resp_e")] == [
        "fp-two",
        None,
        "fp-one",
        "fp-one",
    ]
    assert len(store._owners) == 4 and set(store._owned) == {"fp-one", "fp-two"}


def test_one_keys_creates_never_evict_another_keys_records():
    """The attack: with one FIFO of 100,000 records for every key, key B's creates pushed key A's
    records out (A's GET and previous_response_id got 404). Each key has its own cap now."""
    store = MemoryStore()
    mine = [f"resp_a{i}" for i in range(5)]
    for i, rid in enumerate(mine):
        store.note_owner(rid, owners.record("fp-a", "t1" if i % 2 else None), NOW)
    for i in range(OWNERS_PER_KEY + 10):
        store.note_owner(f"resp_b{i}", "fp-b", NOW + i * 1e-6)
    assert [store.owner_of(rid, NOW) for rid in mine] == ["fp-a", "fp-a/t1"] * 2 + ["fp-a"]
    assert [store.owner_of(f"resp_b{i}", NOW) for i in (0, 9, 10, OWNERS_PER_KEY + 9)] == [None, None, "fp-b", "fp-b"]
    assert len(store._owners) == OWNERS_PER_KEY + 5


def test_a_keys_expired_records_go_before_its_live_ones():
    store = MemoryStore()
    store.owners_per_key = 2
    store.note_owner("resp_old", "fp-a", NOW)
    store.note_owner("resp_new", "fp-a", NOW + OWNER_TTL - 10)
    store.note_owner("resp_newest", "fp-a", NOW + OWNER_TTL + 1)  # resp_old has expired: it goes, resp_new stays
    assert [store.owner_of(n, NOW + OWNER_TTL + 1) for n in ("resp_old", "resp_new", "resp_newest")] == [
        None,
        "fp-a",
        "fp-a",
    ]
    assert list(store._owned["fp-a"]) == ["resp_new", "resp_newest"]
    store.note_owner("resp_new", "fp-b", NOW + OWNER_TTL + 2)  # (an id recorded again by another key moves)
    assert list(store._owned["fp-a"]) == ["resp_newest"] and list(store._owned["fp-b"]) == ["resp_new"]


def test_check_refuses_the_first_id_the_key_did_not_create_with_openais_404():
    store = MemoryStore()
    store.note_owner("resp_mine", "fp-one", NOW)
    assert owners.check(store, (("resp_mine", None),), "fp-one", NOW) is None
    with pytest.raises(GatewayError) as e:
        owners.check(store, (("resp_mine", None),), "fp-two", NOW)
    assert (e.value.status, e.value.message, e.value.type, e.value.param) == (
        404, "Response with id 'resp_mine' not found.", "invalid_request_error", None)
    with pytest.raises(GatewayError) as e:
        owners.check(store, (("resp_mine", "previous_response_id"), ("conv_x", "conversation")), "fp-one", NOW)
    assert (e.value.message, e.value.param) == ("Conversation with id 'conv_x' not found.", "conversation")
    long_id = "resp_" + "x" * 300
    with pytest.raises(GatewayError) as e:
        owners.check(store, ((long_id, None),), "fp-one", NOW)
    assert len(e.value.message) < 120  # a client's long id is not echoed whole


def test_check_returns_the_target_holding_the_response_and_reads_records_without_one():
    store = MemoryStore()
    store.note_owner("resp_old", "fp-one", NOW)  # a single-target key's record, or one from before targets
    store.note_owner("resp_new", owners.record("fp-one", "t1d0f0000000000a"), NOW)
    assert owners.record("fp-one", None) == "fp-one"
    assert owners.check(store, (("resp_old", None),), "fp-one", NOW) is None
    assert owners.check(store, (("resp_new", None),), "fp-one", NOW) == "t1d0f0000000000a"
    assert (
        owners.check(store, (("resp_old", "previous_response_id"), ("resp_new", None)), "fp-one", NOW)
        == "t1d0f0000000000a"
    )
    for rid in ("resp_old", "resp_new"):
        with pytest.raises(GatewayError) as e:  # another key's, with or without a target: 404 alike
            owners.check(store, ((rid, None),), "fp-two", NOW)
        assert e.value.status == 404




