"""A stream the client abandons before the usage chunk is still charged, through a real gateway.

The attack: a streaming client hangs up as soon as it sees `finish_reason`, before the provider's
usage chunk arrives. Without the estimate every such request was a ledger row of 0 tokens and a
100-token budget was never used up. The estimator itself: tests/unit/wire/test_abandoned_streams.py."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.fakeprovider import Reply, openai_stream
from tests.e2e.test_policy_e2e import ledger_rows
from tests.conftest import keys_for

REAL_KEY = "sk-real-provider-key-123456"
ANSWER = "x" * 200  # 50 tokens at 4 characters a token


# --- the estimator (pure) ----------------------------------------------------------------


@pytest.mark.e2e
def test_hanging_up_before_the_usage_chunk_is_charged_an_estimate_until_the_budget_refuses(
    provider, gateway_factory, tmp_path
):
    releases: list[threading.Event] = []

    def answer(req):
        body = req.json()
        events = openai_stream(body, pieces=(ANSWER[:100], ANSWER[100:]))
        release = threading.Event()  # the usage chunk waits until the client has hung up
        releases.append(release)
        head, tail = b"".join(events[:-2]), events[-2:]  # [..., usage chunk, [DONE]]
        return Reply.sse([head, *tail], hold_after_first=release)

    provider.reset(answer)
    db = tmp_path / "usage.sqlite3"
    # each request reserves its worst case (its ~90 body bytes + max_tokens 50) and is charged 53:
    # the second fits (53 + ~140 <= 215), the third does not (106 + ~140 > 215)
    keys = keys_for(provider, {"vk_budget": {"provider": "openai", "api_key": REAL_KEY, "budget_tokens": 215}})
    gw = gateway_factory(keys, ["--set", f"usage_db={db}"])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_budget", max_retries=0)

    answered = refused = 0
    for attempt in range(12):
        try:
            stream = client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=50
            )
        except openai.RateLimitError as e:
            assert e.code == "budget_exceeded"
            refused += 1
            break
        text = ""
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                if chunk.choices[0].finish_reason:
                    break  # the attack: hang up before the usage chunk
        stream.close()
        assert text == ANSWER
        answered += 1
        assert len(ledger_rows(db, answered)) == answered  # the hang-up is noticed and counted
        for release in releases:
            release.set()

    assert refused == 1
    # 3 prompt tokens ("gpt-4o", "user", "hi": 12 characters) + 50 for the answer a request
    assert answered == 2
    rows = ledger_rows(db, answered + 1)  # the refusal is recorded too, after the two answers
    assert [(r["prompt_tokens"], r["completion_tokens"], r["estimated"], r["status"]) for r in rows] == \
        [(3, 50, 1, 200)] * 2 + [(0, 0, 0, 429)]
    # the provider notes a released hold on its own thread: give it a moment to note the last one
    deadline = time.monotonic() + 10
    while len(provider.holds_released) < answered and time.monotonic() < deadline:
        time.sleep(0.02)
    assert provider.holds_released == [True] * answered  # the usage chunk came only after the hang-up


@pytest.mark.e2e
def test_a_stream_with_its_usage_chunk_is_charged_exactly_and_not_marked(provider, gateway_factory, tmp_path):
    db = tmp_path / "usage.sqlite3"
    keys = keys_for(provider, {"vk_a": {"provider": "openai", "api_key": REAL_KEY}})
    gw = gateway_factory(keys, ["--set", f"usage_db={db}"])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_a", max_retries=0)
    chunks = list(
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    rows = ledger_rows(db, 1)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["estimated"]) for r in rows] == [(5, 2, 0)]
