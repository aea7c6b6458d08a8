"""The accounting's side of background responses (hooks/background.py), in-process: the
background_hold option, and what a charged hold's ledger row says. Through a real gateway:
tests/e2e/test_background_budgets.py."""

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.hooks.accounting import UsageAccounting
from addon.hooks.background import BACKGROUND_HOLD
from addon.hooks.live import Live
from addon.policy.memory_store import MemoryStore
from addon.policy.store import Due


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf"])
def test_background_hold_must_be_a_positive_number_of_seconds(value):
    accounting = UsageAccounting(Live(MemoryStore()))
    with taddons.context(accounting) as tctx:
        tctx.configure(accounting, usage_db="")
        assert accounting.background.hold == BACKGROUND_HOLD
        with pytest.raises(exceptions.OptionsError, match="background_hold must be a positive number of seconds"):
            tctx.configure(accounting, background_hold=value)
        tctx.configure(accounting, background_hold="90")
        assert accounting.background.hold == 90.0


def test_a_charged_hold_is_one_estimated_row_with_the_creates_key_model_and_split():
    accounting = UsageAccounting(Live(MemoryStore()))
    meta = json.dumps(
        {
            "key": "team",
            "provider": "openai",
            "model": "gpt-4o",
            "price": [2.5, 10.0, None],
            "target": "",
            "attempts": 1,
            "api": "openai_responses",
            "started": 100.0,
            "input": 60,
            "output": 16384,
        }
    )
    accounting.background.charged(Due("fp1", "resp_1", 16444, 0.16, 3700.0, meta))
    [(row, started, ended, status, usage, streamed)] = accounting.unsettled
    assert (row.key, row.model, row.fingerprint) == ("team", "gpt-4o", "fp1")
    assert (started, ended, status, streamed) == (100.0, 3700.0, 200, False)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (60, 16384, True)
    assert row.counted  # the store has counted it: the ledger row must not count it again
    # a hold of nothing (a key without limits): no row
    accounting.background.charged(Due("fp1", "resp_2", 0, 0.0, 3700.0, meta))
    assert len(accounting.unsettled) == 1
