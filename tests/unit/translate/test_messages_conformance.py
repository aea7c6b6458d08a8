"""Conformance of the Messages -> Chat Completions pair: the chat requests it builds against
OpenAI's spec, the Messages and stream events it answers with against Anthropic's. Skips without
the shared reference specs."""

from __future__ import annotations

import json

import pytest

from functools import cache

from tests.unit.translate.test_anthropic_conformance import SPECS, validator

validator = cache(validator)  # one compiled schema per (spec, name): the stream test checks many events


def assert_valid(spec_file: str, schema_name: str, instance: dict) -> None:
    errors = sorted(validator(spec_file, schema_name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message[:300]}" for e in errors[:5])
from tests.unit.translate.test_messages_translate import STREAM, completion, events, prepare, translate
from addon.translate.anthropic_messages_openai_chat import MessagesExchange

pytestmark = pytest.mark.skipif(not SPECS.exists(), reason="shared reference specs absent")
ANTHROPIC = "anthropic-openapi.json"
OPENAI = "openai-openapi.yaml"
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
CLAUDE_CODE_LIKE = {
    "model": "gpt-5",
    "max_tokens": 32000,
    "stream": True,
    "metadata": {"user_id": "user_x"},
    "thinking": {"type": "adaptive"},
    "output_config": {"effort": "high"},
    "context_management": {"edits": []},
    "system": [{"type": "text", "text": "You are Claude Code", "cache_control": {"type": "ephemeral"}}],
    "tools": [
        {"name": f"T{i}", "description": "d", "input_schema": {"type": "object", "properties": {}}} for i in range(24)
    ],
    "tool_choice": {"type": "auto"},
    "stop_sequences": ["END"],
    "temperature": 1,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "ok"}, {"type": "tool_use", "id": "t", "name": "T1", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "done"}]},
        {"role": "system", "content": "reminder"},
        {"role": "user", "content": "go on"},
    ],
}


def test_the_claude_code_like_request_is_valid_anthropic_and_becomes_valid_openai():
    assert_valid(
        ANTHROPIC,
        "CreateMessageParams",
        {
            k: v
            for k, v in CLAUDE_CODE_LIKE.items()
            if k not in ("context_management", "output_config", "thinking") and not (k == "messages")
        }
        | {"messages": CLAUDE_CODE_LIKE["messages"][:3]},
    )
    body, _ = prepare(**json.loads(json.dumps(CLAUDE_CODE_LIKE)))
    assert_valid(OPENAI, "CreateChatCompletionRequest", body)


def test_translated_message_and_error_match_anthropics_spec():
    message = json.loads(
        MessagesExchange("gpt-4o").translate_body(
            200,
            completion(
                {
                    "content": "hi",
                    "reasoning_content": "r",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                "tool_calls",
            ),
        )
    )
    assert_valid(ANTHROPIC, "Message", message)
    error = json.loads(
        MessagesExchange("gpt-4o").translate_body(429, b'{"error": {"message": "slow down", "type": "x"}}')
    )
    assert_valid(ANTHROPIC, "ErrorResponse", error)


def test_translated_stream_events_match_anthropics_spec():
    for event in events(translate([STREAM])):
        assert_valid(ANTHROPIC, "MessageStreamEvent", event)
