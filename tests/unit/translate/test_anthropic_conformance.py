"""Conformance: generated Anthropic requests against Anthropic's OpenAPI spec, generated completions
and chunks against OpenAI's. Skips without the shared reference specs (or without jsonschema)."""

from __future__ import annotations

import json
from functools import cache

import pytest

from addon.translate.openai_chat_anthropic import OpenAIChatToAnthropic

from addon.translate.openai_chat_anthropic_response import StreamTranslator
from tests.conftest import SHARED_REFERENCE
from tests.unit.translate.test_anthropic import PNG_B64, WEATHER_TOOL, message, text_stream
from tests.unit.translate.test_anthropic_boundaries import FIXTURE, RECORDED

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

SPECS = SHARED_REFERENCE / "specs"
pytestmark = pytest.mark.skipif(not SPECS.exists(), reason="shared reference specs absent")


@cache
def components(spec_file: str) -> dict:
    path = SPECS / spec_file
    spec = json.loads(path.read_text()) if spec_file.endswith(".json") else yaml.safe_load(path.read_text())
    return allow_nullable(spec["components"])


def allow_nullable(node):
    """OpenAI's spec still marks nulls the OpenAPI 3.0 way (`nullable: true`); JSON Schema needs null in type/enum."""
    if isinstance(node, list):
        return [allow_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: allow_nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if isinstance(node.get("enum"), list) and None not in node["enum"]:
            node["enum"] = [*node["enum"], None]
    return node


def validator(spec_file: str, schema_name: str):
    # both specs are OpenAPI 3.1 (JSON Schema 2020-12); "#/components/..." refs resolve against this root
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": components(spec_file)}
    return jsonschema.Draft202012Validator(schema)


def assert_valid(spec_file: str, schema_name: str, instance: dict) -> None:
    errors = sorted(validator(spec_file, schema_name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message[:300]}" for e in errors[:5])


REQUESTS = {
    "plain": {"messages": [{"role": "user", "content": "hi"}]},
    "everything": {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "checking",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "developer", "content": "answer in French"},
            {"role": "user", "content": "and now?"},
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 1.7,
        "top_p": 0.9,
        "stop": "END",
        "max_completion_tokens": 300,
        "user": "u-1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 3,
    },
    "named_tool": {
        "messages": [{"role": "user", "content": "x"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
    },
    "reasoning": {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low"},
    "tool_history_without_tools": {
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            {"role": "user", "content": "summarise"},
        ]
    },
    "json_schema": {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "p", "strict": True, "schema": {"type": "object", "properties": {}}},
        },
    },
}


@pytest.mark.parametrize("name", REQUESTS)
def test_generated_requests_match_create_message_params(name):
    request = {"model": "claude-sonnet-4-6", **REQUESTS[name]}
    upstream, _ = OpenAIChatToAnthropic().prepare(request)
    assert_valid("anthropic-openapi.json", "CreateMessageParams", json.loads(upstream.body))


def test_the_validator_can_fail():
    assert list(
        validator("anthropic-openapi.json", "CreateMessageParams").iter_errors({"model": "m", "messages": [], "n": 2})
    )


RESPONSES = {
    "text": message([{"type": "text", "text": "hello"}]),
    "tools": message(
        [{"type": "text", "text": "x"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
        "tool_use",
        usage={"input_tokens": 1, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2, "output_tokens": 3},
    ),
    "tool_only": message([{"type": "tool_use", "id": "t1", "name": "f", "input": {}}], "tool_use"),
    "thinking": message(
        [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "ok"}], "max_tokens"
    ),
}


@pytest.mark.parametrize("name", RESPONSES)
def test_generated_completions_match_openai_response(name):
    _, exchange = OpenAIChatToAnthropic().prepare({"model": "claude", "messages": [{"role": "user", "content": "x"}]})
    assert_valid(
        "openai-openapi.yaml", "CreateChatCompletionResponse", json.loads(exchange.translate_body(200, RESPONSES[name]))
    )


def stream_chunks(raw: bytes) -> list[dict]:
    translator = StreamTranslator(1700000000, "claude", True)
    out = b"".join(translator(raw)) + b"".join(translator(b""))
    return [json.loads(f[6:]) for f in out.decode().split("\n\n") if f.startswith("data: {")]


@pytest.mark.parametrize(
    "raw",
    [b"".join(text_stream("a", "b")), FIXTURE.read_bytes(), *[p.read_bytes() for p in RECORDED]],
    ids=["text", "fixture", *[p.name for p in RECORDED]],
)
def test_generated_chunks_match_openai_stream_response(raw):
    chunks = stream_chunks(raw)
    assert len(chunks) > 3
    check = validator("openai-openapi.yaml", "CreateChatCompletionStreamResponse")
    for chunk in chunks:
        errors = list(check.iter_errors(chunk))
        assert not errors, f"{chunk}: {errors[0].message[:300]}"


CASSETTES = sorted((SHARED_REFERENCE / "recorded" / "anthropic").glob("*.yaml")) if SHARED_REFERENCE.exists() else []


def recorded_responses() -> list:
    cases = []
    for path in CASSETTES:
        for i, interaction in enumerate(yaml.safe_load(path.read_text())["interactions"]):
            response = interaction["response"]
            cases.append(pytest.param(response["status"]["code"], response["parsed_body"], id=f"{path.stem}-{i}"))
    return cases


@pytest.mark.skipif(not CASSETTES, reason="shared reference recordings absent")
@pytest.mark.parametrize("status,body", recorded_responses())
def test_recorded_real_responses_translate_to_valid_openai(status, body):
    _, exchange = OpenAIChatToAnthropic().prepare({"model": "claude", "messages": [{"role": "user", "content": "x"}]})
    translated = json.loads(exchange.translate_body(status, json.dumps(body).encode()))
    if status >= 400:
        assert translated["error"]["message"] == body["error"]["message"]
        assert translated["error"]["code"] == body["error"]["type"]
        return
    assert_valid("openai-openapi.yaml", "CreateChatCompletionResponse", translated)
    assert translated["id"] == body["id"]
    tool_uses = [b for b in body["content"] if b["type"] == "tool_use"]
    calls = translated["choices"][0]["message"].get("tool_calls") or []
    assert [(c["id"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (b["id"], b["input"]) for b in tool_uses
    ]
