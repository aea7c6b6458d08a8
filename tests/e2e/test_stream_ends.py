"""Stream ends and the ledger when the provider resets, stalls or sends garbage, through a real
gateway. The tails themselves: tests/unit/hooks/test_stream_ends.py."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from tests.fakeprovider import Reply, openai_completion, openai_stream
from tests.e2e.test_policy_e2e import ledger_rows

REAL_KEY = "sk-real-provider-key-123456"
ANTHROPIC_KEY = "sk-ant-api03-real-test-key-0123456789"
TEXT = "x" * 80  # 20 tokens at 4 characters a token


# --- pure parts -----------------------------------------------------------------------------



# --- through the real gateway ---------------------------------------------------------------

def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def anthropic_head() -> list[bytes]:
    """An Anthropic stream up to the middle of its first text block: 11 input tokens known."""
    return [
        event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_cut",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-6",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 11, "output_tokens": 1},
                },
            },
        ),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TEXT}},
        ),
    ]


@pytest.fixture
def gateway(provider, gateway_factory, tmp_path):
    db = tmp_path / "usage.sqlite3"
    keys = {
        "providers": {"openai": {"base_url": provider.url + "/v1"}, "anthropic": {"base_url": provider.url + "/v1"}},
        "virtual_keys": {
            "vk_openai": {"name": "o", "provider": "openai", "api_key": REAL_KEY},
            "vk_claude": {"name": "c", "provider": "anthropic", "api_key": ANTHROPIC_KEY},
        },
    }
    gw = gateway_factory(keys, ["--set", f"usage_db={db}", "--set", "stream_idle_timeout=1"])
    gw.db = db
    return gw


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


@pytest.mark.e2e
def test_an_anthropic_stream_that_resets_mid_way_ends_with_a_finish_chunk_and_done(provider, gateway):
    provider.reset(lambda req: Reply.sse(anthropic_head(), cut=True))
    chunks = list(
        client(gateway, "vk_claude").chat.completions.create(
            model="claude-sonnet-4-6", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )  # no exception: a proper end
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    [row] = ledger_rows(gateway.db, 1)
    # what the client got (200, a stream), the 11 input tokens the provider had reported, and
    # the answer estimated from the text sent
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (200, 11, 20, 1)


@pytest.mark.e2e
def test_an_openai_stream_that_resets_mid_way_ends_with_an_error_event(provider, gateway):
    def cut(req):
        events = openai_stream(req.json(), pieces=(TEXT,), usage=False)
        return Reply.sse(events[:2], cut=True)  # role chunk, the text; no finish, no [DONE]

    provider.reset(cut)
    stream = client(gateway, "vk_openai").chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = ""
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == TEXT
    assert "broke off" in str(e.value)
    [row] = ledger_rows(gateway.db, 1)
    assert (row["status"], row["completion_tokens"], row["estimated"]) == (200, 20, 1)


@pytest.mark.e2e
def test_a_stream_that_stalls_is_ended_by_stream_idle_timeout_with_an_error_event(provider, gateway):
    release = threading.Event()

    def stall(req):
        events = openai_stream(req.json(), pieces=(TEXT,), usage=False)
        return Reply.sse(events[:2], stall=release)

    provider.reset(stall)
    started = time.monotonic()
    stream = client(gateway, "vk_openai").chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = ""
    try:
        with pytest.raises(openai.APIError) as e:
            for chunk in stream:
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    finally:
        release.set()
    assert time.monotonic() - started < 15  # stream_idle_timeout=1, not tcp_timeout's 600 s
    assert text == TEXT and "sent nothing for 1s" in str(e.value)
    [row] = ledger_rows(gateway.db, 1)
    assert (row["status"], row["completion_tokens"], row["estimated"]) == (200, 20, 1)
    assert "stream ended, nothing from the provider for 1s" in gateway.log()


@pytest.mark.e2e
def test_a_corrupt_gzip_200_still_gets_its_ledger_row(provider, gateway):
    provider.reset(
        lambda req: Reply(
            200, b"\x1f\x8bnot gzip at all", {"content-type": "application/json", "content-encoding": "gzip"}
        )
    )
    with pytest.raises(Exception):
        client(gateway, "vk_openai").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    [row] = ledger_rows(gateway.db, 1)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (200, 0, 0)
    assert "Traceback" not in gateway.log()


@pytest.mark.e2e
def test_a_plain_body_the_provider_cut_is_a_502_for_the_client_and_in_the_ledger(provider, gateway):
    provider.reset(lambda req: Reply.json(openai_completion(req.json()), cut=True))
    with pytest.raises(openai.APIStatusError) as e:
        client(gateway, "vk_openai").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == 502
    [row] = ledger_rows(gateway.db, 1)
    assert row["status"] == 502


@pytest.mark.e2e
def test_a_whole_body_that_stalls_after_its_headers_is_a_504_after_stream_idle_timeout(provider, gateway):
    release = threading.Event()
    provider.reset(lambda req: Reply.json(openai_completion(req.json()), stall=release))  # headers, half the body
    started = time.monotonic()
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client(gateway, "vk_openai").chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        release.set()
    assert time.monotonic() - started < 15  # stream_idle_timeout=1, not tcp_timeout's 600 s
    assert e.value.status_code == 504 and "not the body within 1s" in str(e.value)
    [row] = ledger_rows(gateway.db, 1)
    assert row["status"] == 504
