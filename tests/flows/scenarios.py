"""The traffic in the regression corpus: one client request and one scripted provider answer each.

Used by tests/flows/regenerate.py (writes tests/flows/corpus.mitm) and by the record-then-replay
tests (which record the same scenarios afresh). The keys are fake; tests prove they never appear
in a recording.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from addon.recording.replay import url_field
from tests import fakeresponses, rawhttp
from tests.fakeprovider import FakeProvider, Received, Reply, openai_completion, openai_stream

# base URLs are filled in per run: the fake provider when recording, the replay server on replay
KEYS = {
    "providers": {"azure": {"endpoint": "https://corpus-resource.openai.azure.com"}},
    "virtual_keys": {
        "vk_corpus_openai": {"provider": "openai", "api_key": "sk-corpus-openai-real-0001", "name": "corpus-openai"},
        "vk_corpus_deepseek": {
            "provider": "deepseek",
            "api_key": "sk-corpus-deepseek-real-0002",
            "name": "corpus-deepseek",
        },
        "vk_corpus_anthropic": {
            "provider": "anthropic",
            "api_key": "sk-ant-corpus-real-0003",
            "name": "corpus-anthropic",
            "models": ["claude-sonnet-4-6"],
        },
        # its provider is down: nothing listens on port 1
        "vk_corpus_down": {
            "provider": "openai",
            "api_key": "sk-corpus-down-real-0005",
            "name": "corpus-down",
            "base_url": "http://127.0.0.1:1/v1",
        },
        "vk_corpus_azure": {
            "provider": "azure",
            "api_key": "corpus-azure-real-0006",
            "name": "corpus-azure",
            "api_version": "2024-10-21",
            "deployments": {"gpt-4o": "corpus-4o", "text-embedding-3-small": "corpus-embed"},
        },
        "vk_corpus_mistral": {
            "provider": "mistral",
            "api_key": "sk-corpus-mistral-real-0007",
            "name": "corpus-mistral",
        },
        # no "name": the gateway names it by the virtual key itself, which must not reach a recording
        "vk_corpus_unnamed_secret": {"provider": "openai", "api_key": "sk-corpus-unnamed-real-0004"},
    },
}
SECRETS = [s for vk, e in KEYS["virtual_keys"].items() for s in (vk, e["api_key"])]
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@dataclass
class Scenario:
    name: str
    key: str | None  # virtual key sent as Bearer; None sends no key
    body: dict | bytes
    reply: Callable[[Received], Reply] | None = None  # None: the gateway must answer itself
    path: str = "/v1/chat/completions"
    headers: dict | None = None  # besides content-type and the key
    method: str = "POST"


ANTHROPIC_CLIENT = {"anthropic-version": "2023-06-01"}


def messages(model: str, text: str = "hi", **extra) -> dict:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}], **extra}


def messages_scenario(
    name: str, key: str | None, body: dict | bytes, reply=None, path: str = "/v1/messages"
) -> "Scenario":
    """A Messages API request as the anthropic SDK sends it (x-api-key, anthropic-version)."""
    return Scenario(name, key, body, reply, path, ANTHROPIC_CLIENT)


def chat(model: str, text: str = "hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# --- provider answers ----------------------------------------------------------------------

def openai_tool_call(r: Received) -> Reply:
    body = openai_completion(r.json())
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_corpus1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    return Reply.json(body)


def openai_error(status: int, message: str, type_: str) -> Callable[[Received], Reply]:
    return lambda r: Reply.json({"error": {"message": message, "type": type_, "param": None, "code": None}}, status)


def anthropic_message(content: list, stop_reason: str = "end_turn") -> dict:
    return {"id": "msg_corpus_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 4}}


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def anthropic_stream(blocks: list[tuple[dict, list[dict]]], stop_reason: str = "end_turn") -> list[bytes]:
    out = [
        event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    **anthropic_message([]),
                    "id": "msg_corpus_stream",
                    "stop_reason": None,
                    "usage": {"input_tokens": 30, "output_tokens": 1},
                },
            },
        ),
        event("ping", {"type": "ping"}),
    ]
    for index, (start, deltas) in enumerate(blocks):
        out.append(
            event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        )
        out += [
            event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas
        ]
        out.append(event("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": 21},
            },
        )
    )
    out.append(event("message_stop", {"type": "message_stop"}))
    # split one event across two pieces: the translator must reassemble it on replay too
    first = out.pop(0)
    return [first[:40], first[40:]] + out


EMBED = {"model": "text-embedding-3-small", "input": ["corpus"], "encoding_format": "float"}


def embeddings(r: Received) -> Reply:
    return Reply.json(
        {
            "object": "list",
            "model": r.json()["model"],
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        }
    )


TEXT_BLOCK = ({"type": "text", "text": ""}, [{"type": "text_delta", "text": p} for p in ("Bon", "jour")])
TOOL_BLOCK = ({"type": "tool_use", "id": "toolu_corpus1", "name": "get_weather", "input": {}},
              [{"type": "input_json_delta", "partial_json": p} for p in ("", '{"city":', ' "Paris"}')])


SCENARIOS = [
    Scenario("openai plain", "vk_corpus_openai", chat("gpt-4o"), lambda r: Reply.json(openai_completion(r.json()))),
    Scenario(
        "openai stream",
        "vk_corpus_openai",
        chat("gpt-4o", stream=True, stream_options={"include_usage": True}),
        lambda r: Reply.sse(openai_stream(r.json(), pieces=("Hel", "lo", " there"))),
    ),
    Scenario(
        "openai gzip stream",
        "vk_corpus_openai",
        chat("gpt-4o", stream=True),
        lambda r: Reply.sse(openai_stream(r.json()), gzip=True),
    ),
    Scenario(
        "openai tool call",
        "vk_corpus_openai",
        chat("gpt-4o", "weather in Paris?", tools=[WEATHER_TOOL]),
        openai_tool_call,
    ),
    Scenario(
        "openai 429", "vk_corpus_openai", chat("gpt-4o"), openai_error(429, "Rate limit reached", "rate_limit_exceeded")
    ),
    Scenario(
        "openai html 502",
        "vk_corpus_openai",
        chat("gpt-4o"),
        lambda r: Reply(502, b"<html>bad gateway</html>", {"content-type": "text/html"}),
    ),
    Scenario(
        "deepseek plain",
        "vk_corpus_deepseek",
        chat("deepseek-chat"),
        lambda r: Reply.json(openai_completion(r.json(), "ni hao")),
    ),
    Scenario(
        "deepseek stream",
        "vk_corpus_deepseek",
        chat("deepseek-chat", stream=True),
        lambda r: Reply.sse(openai_stream(r.json())),
    ),
    Scenario(
        "unnamed key",
        "vk_corpus_unnamed_secret",
        chat("gpt-4o-mini"),
        lambda r: Reply.json(openai_completion(r.json())),
    ),
    Scenario(
        "anthropic plain",
        "vk_corpus_anthropic",
        chat("claude-sonnet-4-6", max_tokens=50),
        lambda r: Reply.json(anthropic_message([{"type": "text", "text": "Bonjour!"}])),
    ),
    Scenario(
        "anthropic gzip",
        "vk_corpus_anthropic",
        chat("claude-sonnet-4-6"),
        lambda r: Reply.json(anthropic_message([{"type": "text", "text": "zipped"}]), gzip=True),
    ),
    Scenario(
        "anthropic tool call",
        "vk_corpus_anthropic",
        chat("claude-sonnet-4-6", "weather in Paris?", tools=[WEATHER_TOOL]),
        lambda r: Reply.json(
            anthropic_message(
                [{"type": "tool_use", "id": "toolu_corpus1", "name": "get_weather", "input": {"city": "Paris"}}],
                "tool_use",
            )
        ),
    ),
    Scenario(
        "anthropic image",
        "vk_corpus_anthropic",
        {
            "model": "claude-sonnet-4-6",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                    ],
                }
            ],
        },
        lambda r: Reply.json(anthropic_message([{"type": "text", "text": "a pixel"}])),
    ),
    Scenario(
        "anthropic stream",
        "vk_corpus_anthropic",
        chat("claude-sonnet-4-6", stream=True),
        lambda r: Reply.sse(anthropic_stream([TEXT_BLOCK])),
    ),
    Scenario(
        "anthropic stream tool call",
        "vk_corpus_anthropic",
        chat("claude-sonnet-4-6", "weather?", stream=True, tools=[WEATHER_TOOL]),
        lambda r: Reply.sse(anthropic_stream([TEXT_BLOCK, TOOL_BLOCK], "tool_use"), gzip=True),
    ),
    Scenario(
        "anthropic 529",
        "vk_corpus_anthropic",
        chat("claude-sonnet-4-6"),
        lambda r: Reply.json({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 529),
    ),
    Scenario("provider unreachable", "vk_corpus_down", chat("gpt-4o"), lambda r: Reply(599)),
    Scenario("gateway 401 missing key", None, chat("gpt-4o")),
    Scenario("gateway 401 invalid key", "vk_not_in_the_keys_file", chat("gpt-4o")),
    Scenario("gateway 400 invalid json", "vk_corpus_openai", b"{not json"),
    Scenario("gateway 400 missing model", "vk_corpus_openai", {"messages": [{"role": "user", "content": "hi"}]}),
    # refused after the key lookup: the client's key is still on the request (x-api-key is anthropic's header)
    Scenario("gateway 400 anthropic unsupported n", "vk_corpus_anthropic", chat("claude-sonnet-4-6", n=3)),
    Scenario("gateway 403 model not allowed", "vk_corpus_anthropic", chat("claude-opus-4")),
    Scenario("gateway 404 unknown path", "vk_corpus_openai", chat("gpt-4o"), path="/v1/files"),
    Scenario(
        "azure deployment",
        "vk_corpus_azure",
        chat("gpt-4o"),
        lambda r: Reply.json(openai_completion(r.json(), "from azure")),
    ),
    Scenario(
        "mistral stream without stream_options",
        "vk_corpus_mistral",
        chat("mistral-small", stream=True),
        lambda r: Reply.sse(openai_stream(r.json())),
    ),
    Scenario("embeddings float", "vk_corpus_openai", EMBED, embeddings),
    Scenario("embeddings azure", "vk_corpus_azure", EMBED, embeddings),
    Scenario("gateway 400 embeddings unsupported", "vk_corpus_deepseek", EMBED),
    Scenario(
        "responses plain",
        "vk_corpus_openai",
        {"model": "gpt-4.1", "input": "hi"},
        lambda r: Reply.json(fakeresponses.response(r.json())),
        path="/v1/responses",
    ),
    Scenario(
        "responses stream",
        "vk_corpus_openai",
        {"model": "gpt-4.1", "input": "hi", "stream": True},
        lambda r: Reply.sse(fakeresponses.response_stream(r.json())),
        path="/v1/responses",
    ),
    Scenario(
        "responses retrieve",
        "vk_corpus_openai",
        b"",
        lambda r: Reply.json(fakeresponses.response({"model": "gpt-4.1"})),
        path="/v1/responses/resp_fake1",
        method="GET",
    ),
    # a stored response is its creating key's alone (policy/owners.py): azure makes its own first
    Scenario(
        "responses azure",
        "vk_corpus_azure",
        {"model": "gpt-4.1", "input": "hi"},
        lambda r: Reply.json(fakeresponses.response(r.json(), rid="resp_azure1")),
        path="/v1/responses",
    ),
    Scenario(
        "responses delete azure",
        "vk_corpus_azure",
        b"",
        lambda r: Reply.json({"id": "resp_azure1", "object": "response", "deleted": True}),
        path="/v1/responses/resp_azure1",
        method="DELETE",
    ),
    Scenario(
        "gateway 404 responses another key's", "vk_corpus_azure", b"", path="/v1/responses/resp_fake1", method="GET"
    ),
    Scenario(
        "gateway 400 responses unsupported",
        "vk_corpus_anthropic",
        {"model": "claude-sonnet-4-6", "input": "hi"},
        path="/v1/responses",
    ),
    # the Messages API in front: passthrough to anthropic, translation to OpenAI and DeepSeek
    messages_scenario(
        "messages anthropic passthrough",
        "vk_corpus_anthropic",
        messages(
            "claude-sonnet-4-6", system=[{"type": "text", "text": "terse", "cache_control": {"type": "ephemeral"}}]
        ),
        lambda r: Reply.json(anthropic_message([{"type": "text", "text": "Bonjour!"}])),
    ),
    messages_scenario(
        "messages anthropic stream",
        "vk_corpus_anthropic",
        messages("claude-sonnet-4-6", stream=True),
        lambda r: Reply.sse(anthropic_stream([TEXT_BLOCK, TOOL_BLOCK], "tool_use")),
    ),
    messages_scenario(
        "messages openai translated",
        "vk_corpus_openai",
        messages("gpt-4o", system="terse", tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]),
        openai_tool_call,
    ),
    messages_scenario(
        "messages openai stream translated",
        "vk_corpus_openai",
        messages("gpt-4o", stream=True),
        lambda r: Reply.sse(openai_stream(r.json(), pieces=("Hel", "lo"))),
    ),
    messages_scenario(
        "messages deepseek stream translated",
        "vk_corpus_deepseek",
        messages("deepseek-chat", stream=True, context_management={"edits": []}),
        lambda r: Reply.sse(openai_stream(r.json()), gzip=True),
    ),
    messages_scenario(
        "messages openai 429 translated",
        "vk_corpus_openai",
        messages("gpt-4o"),
        openai_error(429, "Rate limit reached", "rate_limit_exceeded"),
    ),
    messages_scenario("gateway 401 messages invalid key", "vk_not_in_the_keys_file", messages("gpt-4o")),
    messages_scenario("gateway 400 messages top_k", "vk_corpus_openai", messages("gpt-4o", top_k=3)),
    messages_scenario(
        "gateway 400 count_tokens for openai", "vk_corpus_openai", messages("gpt-4o"), path="/v1/messages/count_tokens"
    ),
]


def keys_for(base_url: str) -> dict:
    """KEYS with every provider pointed at the fake provider (its path tells them apart)."""
    return {
        "providers": {
            p: {url_field(p): f"{base_url}/{p}"} for p in ("openai", "deepseek", "anthropic", "azure", "mistral")
        },
        "virtual_keys": KEYS["virtual_keys"],
    }


def run(gateway_url: str, provider: FakeProvider, scenarios=SCENARIOS) -> None:
    """Send every scenario through a (recording) gateway, one at a time."""
    for s in scenarios:
        provider.reset(s.reply or (lambda r: Reply(599, b"the gateway should have answered this itself")))
        headers = {"content-type": "application/json", **(s.headers or {})}
        if s.key:
            headers["authorization"] = f"Bearer {s.key}"
        body = s.body if isinstance(s.body, bytes) else json.dumps(s.body).encode()
        resp = rawhttp.request(
            gateway_url, s.method, s.path, content=body if s.method == "POST" else None, headers=headers
        )
        if s.reply is None and provider.received:
            raise AssertionError(f"{s.name}: the gateway forwarded a request it should answer itself")
        if resp.status_code >= 500 and s.reply is None:
            raise AssertionError(f"{s.name}: gateway error {resp.status_code}")
