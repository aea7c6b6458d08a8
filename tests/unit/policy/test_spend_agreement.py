"""policy/store.py: when Redis's spend and the ledger's disagree (the start-up check, hooks/stores.py)."""

from __future__ import annotations

from addon.policy.store import BUCKET, spend_disagreement, spend_of


def test_the_ledgers_buckets_are_summed_per_key_from_since_on_without_the_tpm_seeds():
    seeds = [("fp1", "", 100, 1.0, 10 * BUCKET, False), ("fp1", "", 50, 0.5, 20 * BUCKET, False),
             ("fp2", "", 7, 0.0, 5 * BUCKET, False),  # before `since`: Redis no longer keeps it
             ("fp1", "", 30, 0.0, 20 * BUCKET + 5, True)]  # the last minute's tokens: a tpm seed
    assert spend_of(seeds, 10 * BUCKET) == {"fp1": (150, 1.5)}


def test_agreeing_within_one_percent_is_agreement():
    assert spend_disagreement({"a": (10_000, 2.0), "b": (5, 0.0)}, {"a": (9_950, 1.99), "b": (5, 0.0)}) is None
    assert spend_disagreement({}, {}) is None


def test_old_spend_in_redis_and_an_empty_ledger_disagree_on_those_keys_only():
    redis = {"a": (14, 2.0), "b": (7, 1.0), "c": (100, 0.0)}
    ledger = {"c": (100, 0.0)}
    assert spend_disagreement(redis, ledger) == (["a", "b"], (21, 3.0), (0, 0.0))


def test_spend_the_ledger_has_and_redis_lost_disagrees_too():
    assert spend_disagreement({"a": (7, 1.0)}, {"a": (14, 2.0), "b": (3, 0.25)}) == (["a", "b"], (7, 1.0), (17, 2.25))


def test_dollars_alone_can_disagree():
    assert spend_disagreement({"a": (100, 1.0)}, {"a": (100, 2.0)}) == (["a"], (100, 1.0), (100, 2.0))
