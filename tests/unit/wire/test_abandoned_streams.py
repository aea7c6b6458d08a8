"""The estimate a stream the client abandons before the usage chunk is charged (addon/wire/estimate.py).
The attack through a real gateway: tests/e2e/test_abandoned_streams.py."""

from __future__ import annotations

import json


from addon.wire.estimate import (CHARS_PER_TOKEN, SAMPLE_BYTES, StreamSample, estimate_usage, prompt_chars,
                                  streamed_text, tokens_for)
from addon.wire.tokens import Usage
from tests.fakeprovider import openai_stream


# --- the estimator (pure) ----------------------------------------------------------------

def test_estimate_counts_prompt_strings_and_streamed_text_at_four_chars_a_token():
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "a" * 94}]}).encode()
    assert prompt_chars(body) == 6 + 4 + 94
    assert estimate_usage(body, "b" * 9) == Usage(26, 3, 0, True)
    assert CHARS_PER_TOKEN == 4 and tokens_for(1) == 1 and tokens_for(0) == 0


def test_known_input_tokens_win_over_the_prompt_estimate():
    assert estimate_usage(b'{"messages": ["' + b"a" * 4000 + b'"]}', "four", prompt_tokens=11) == Usage(11, 1, 0, True)


def test_a_body_that_is_not_json_is_estimated_from_its_bytes():
    assert estimate_usage(b"\xff" * 40, "") == Usage(10, 0, 0, True)


def test_streamed_text_reads_answer_text_from_openai_and_anthropic_chunks():
    sse = b"".join(openai_stream({"model": "m"}, pieces=("hé", 'l"o')))
    assert streamed_text(sse) == 'hél"o'
    tool = b'data: {"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\\"a\\":1}"}}]}}]}\n\n'
    assert streamed_text(tool) == '{"a":1}'
    anthropic = b'event: content_block_delta\ndata: {"delta":{"type":"text_delta","text":"abc"}}\n\n'
    assert streamed_text(anthropic) == "abc"


def test_stream_sample_is_bounded_and_scales_to_all_bytes_sent():
    sample = StreamSample()
    event = b'data: {"choices":[{"delta":{"content":"' + b"y" * 40 + b'"}}]}\n\n'
    count = 4 * SAMPLE_BYTES // len(event)
    for _ in range(count):
        sample.add(event)
    assert sample.sent == count * len(event)
    assert sum(map(len, sample._kept)) <= SAMPLE_BYTES + len(event)
    assert abs(sample.text_chars() - 40 * count) <= 40  # the sample's share, scaled


# --- the attack through the real gateway ---------------------------------------------------


