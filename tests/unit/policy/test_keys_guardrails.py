"""A key names one of the keys file's guardrail sets; a name that is not one, or a set that does
not validate, stops the file from loading (a typo never turns a guardrail off)."""

from __future__ import annotations

import pytest

from addon.policy.keys_parse import KeysError, parse_keys

SETS = {"default": {"detect": ["secrets", "emails"], "action": "mask"}}


def keys(entry: dict, sets=SETS) -> dict:
    return {"guardrails": sets, "virtual_keys": {"vk_a": {"provider": "openai", "api_key": "sk-x", **entry}}}


def test_a_key_gets_its_named_set():
    store = parse_keys(keys({"guardrails": "default", "name": "a"}))
    guard = store.lookup("vk_a").guardrails
    assert guard.name == "default" and guard.detectors == ("secrets", "emails") and guard.action == "mask"
    assert parse_keys(keys({})).lookup("vk_a").guardrails is None  # none named: none applied


@pytest.mark.parametrize("entry, sets, says", [
    ({"guardrails": "strict"}, SETS, 'guardrails must name a set of the top-level "guardrails" (default)'),
    ({"guardrails": ["default"]}, SETS, "guardrails must name a set"),
    ({"guardrails": "default"}, None, "(none defined)"),
    ({}, {"default": {"detect": ["secrets", {"name": "t", "regex": "(a+)+"}]}}, "backtrack catastrophically"),
    ({}, {"default": {"detect": ["ssn"]}}, "unknown detector 'ssn'"),
])
def test_refused_at_load(entry, sets, says):
    data = keys(entry, sets)
    if sets is None:
        del data["guardrails"]
    with pytest.raises(KeysError) as e:
        parse_keys(data)
    assert says in str(e.value) and "sk-x" not in str(e.value)
