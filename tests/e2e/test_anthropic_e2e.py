"""End to end: the official openai SDK -> the real gateway (mitmdump) -> a fake Anthropic API."""

from __future__ import annotations

import json
import time

import openai
import pydantic
import pytest

from tests.fakeprovider import Received, Reply

pytestmark = pytest.mark.e2e

REAL_KEY = "sk-ant-api03-real-test-key-0123456789"
VIRTUAL_KEY = "vk_user1_anthropic"
MODEL = "claude-sonnet-4-6"
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def gateway(gateway_factory, provider_server):
    return gateway_factory({
        "providers": {"anthropic": {"base_url": provider_server.url + "/v1"}},
        "virtual_keys": {VIRTUAL_KEY: {"provider": "anthropic", "api_key": REAL_KEY}},
    })


@pytest.fixture
def client(gateway, provider):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=VIRTUAL_KEY, max_retries=0, timeout=20) as c:
        yield c


# --- Anthropic-shaped answers ------------------------------------------------------------------

def anthropic_message(content: list, stop_reason: str = "end_turn", usage: dict | None = None) -> dict:
    return {"id": "msg_e2e_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage or {"input_tokens": 12, "output_tokens": 4}}


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(
    blocks: list[tuple[dict, list[dict]]], stop_reason: str = "end_turn", error: dict | None = None
) -> list[bytes]:
    """Anthropic SSE for content blocks given as (start block, deltas); optionally cut by an error event."""
    out = [
        event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    **anthropic_message([]),
                    "id": "msg_e2e_stream",
                    "stop_reason": None,
                    "usage": {"input_tokens": 30, "cache_read_input_tokens": 8, "output_tokens": 1},
                },
            },
        ),
        event("ping", {"type": "ping"}),
    ]
    for index, (start, deltas) in enumerate(blocks):
        out.append(
            event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        )
        for delta in deltas:
            out.append(event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
            if error is not None:
                return out + [event("error", {"type": "error", "error": error})]
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
    return out


def text_block(*pieces: str) -> tuple[dict, list[dict]]:
    return {"type": "text", "text": ""}, [{"type": "text_delta", "text": p} for p in pieces]


def tool_block(tool_id: str, name: str, *fragments: str) -> tuple[dict, list[dict]]:
    return ({"type": "tool_use", "id": tool_id, "name": name, "input": {}},
            [{"type": "input_json_delta", "partial_json": f} for f in ("", *fragments)])


def only_request(provider) -> Received:
    assert len(provider.received) == 1
    return provider.received[0]


def assert_anthropic_request(received: Received) -> dict:
    assert received.method == "POST"
    assert received.path == "/v1/messages"
    assert received.headers["x-api-key"] == REAL_KEY
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in received.headers
    assert VIRTUAL_KEY not in json.dumps(received.headers)
    return received.json()


# --- tests -----------------------------------------------------------------------------------

def test_plain_completion(client, provider):
    provider.reset(lambda r: Reply.json(anthropic_message([{"type": "text", "text": "Bonjour!"}])))
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
        max_tokens=50,
        temperature=1.4,
    )
    assert completion.choices[0].message.content == "Bonjour!"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        12,
        4,
        16,
    )
    body = assert_anthropic_request(only_request(provider))
    assert body == {"model": MODEL, "system": [{"type": "text", "text": "Answer in French."}],
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
                    "max_tokens": 50, "temperature": 1.0}


def test_anthropic_beta_header_passes_through(client, provider):
    provider.reset(lambda r: Reply.json(anthropic_message([{"type": "text", "text": "ok"}])))
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                   extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert only_request(provider).headers["anthropic-beta"] == "prompt-caching-2024-07-31"


def test_streaming_text(client, provider):
    provider.reset(lambda r: Reply.sse(stream_events([text_block("Hel", "lo", " there")])))
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {"msg_e2e_stream"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 38 and chunks[-1].usage.completion_tokens == 21
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 8
    body = assert_anthropic_request(only_request(provider))
    assert body["stream"] is True and "stream_options" not in body


def test_streaming_tool_calls_accumulate_in_the_sdk(client, provider):
    provider.reset(lambda r: Reply.sse(stream_events([
        text_block("Let me check."),
        tool_block("toolu_paris", "get_weather", '{"city":', ' "Paris"}'),
        tool_block("toolu_rome", "get_weather", '{"city": "Rome"}'),
    ], stop_reason="tool_use")))
    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL]
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = [(c.id, c.type, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == [("toolu_paris", "function", "get_weather", {"city": "Paris"}),
                     ("toolu_rome", "function", "get_weather", {"city": "Rome"})]
    body = assert_anthropic_request(only_request(provider))
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]


def test_multi_turn_tools(client, provider):
    replies = iter(
        [
            Reply.json(
                anthropic_message(
                    [
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
                    ],
                    "tool_use",
                )
            ),
            Reply.json(anthropic_message([{"type": "text", "text": "Paris is sunny, Rome is rainy."}])),
        ]
    )
    provider.reset(lambda r: next(replies))
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="required")
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.content is None
    calls = first.choices[0].message.tool_calls
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    for call, result in zip(calls, ["sunny", "rainy"]):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "Paris is sunny, Rome is rainy."

    turn1, turn2 = (assert_anthropic_request(r) for r in provider.received)
    assert turn1["tool_choice"] == {"type": "any"}
    assert turn2["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "rainy"},
            ],
        },
    ]


def test_images_data_url_and_http_url(client, provider):
    provider.reset(lambda r: Reply.json(anthropic_message([{"type": "text", "text": "two images"}])))
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}])
    body = assert_anthropic_request(only_request(provider))
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    assert len(provider.received) == 1  # the gateway did not fetch the http image


def anthropic_error(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_e2e"}


def test_rate_limit_error_becomes_sdk_rate_limit_error(client, provider):
    provider.reset(
        lambda r: Reply.json(
            anthropic_error("rate_limit_error", "Number of request tokens has exceeded your limit"), 429
        )
    )
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 429
    assert info.value.body["message"] == "Number of request tokens has exceeded your limit"
    assert info.value.body["code"] == "rate_limit_error"


def test_overloaded_529(client, provider):
    provider.reset(lambda r: Reply.json(anthropic_error("overloaded_error", "Overloaded"), 529))
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 529
    assert info.value.body == {
        "message": "Overloaded",
        "type": "overloaded_error",
        "param": None,
        "code": "overloaded_error",
    }


def test_request_the_provider_cannot_serve_is_answered_400_without_forwarding(client, provider):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)
    assert info.value.body["param"] == "n"
    assert provider.received == []


def test_mid_stream_error_event_raises_in_the_sdk(client, provider):
    provider.reset(
        lambda r: Reply.sse(
            stream_events([text_block("partial", "never")], error={"type": "overloaded_error", "message": "Overloaded"})
        )
    )
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert "Overloaded" in str(info.value)
    assert received == ["", "partial"]


def test_gzip_encoded_provider_responses(client, provider):
    provider.reset(lambda r: Reply.json(anthropic_message([{"type": "text", "text": "compressed"}]), gzip=True))
    assert (
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        .choices[0]
        .message.content
        == "compressed"
    )
    provider.reset(lambda r: Reply.sse(stream_events([text_block("gz", "ipped")]), gzip=True))
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "gzipped"


def test_stream_chunks_arrive_incrementally(client, provider):
    pieces = [f"p{i} " for i in range(6)]
    delay = 0.25
    provider.reset(lambda r: Reply.sse(stream_events([text_block(*pieces)]), delay=delay))
    start = time.monotonic()
    arrivals = []
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic() - start, chunk.choices[0].delta.content))
    assert [text for _, text in arrivals] == pieces
    total = time.monotonic() - start
    # ~13 upstream events 0.25 s apart: the first text must reach the client long before the end
    assert total > 10 * delay
    assert arrivals[0][0] < total - 5 * delay


def test_real_key_never_in_gateway_output(client, provider, gateway):
    provider.reset(lambda r: Reply.json(anthropic_message([{"type": "text", "text": "ok"}])))
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert only_request(provider).headers["x-api-key"] == REAL_KEY
    assert REAL_KEY not in gateway.log()


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_structured_output_with_sdk_parse(client, provider):
    provider.reset(lambda r: Reply.json(anthropic_message([{"type": "text", "text": '{"name": "Ada", "age": 36}'}])))
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Ada, 36"}], response_format=Person
    )
    assert completion.choices[0].message.parsed == Person(name="Ada", age=36)
    body = assert_anthropic_request(only_request(provider))
    schema = body["output_config"]["format"]["schema"]
    assert body["output_config"]["format"]["type"] == "json_schema"
    assert set(schema["properties"]) == {"name", "age"} and schema["additionalProperties"] is False
