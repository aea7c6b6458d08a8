"""The embeddings and Responses inbound APIs alone (pure): request checks, usage from bodies and
from a Responses stream split anywhere, the stored-response paths; the fake provider's shapes
checked against OpenAI's OpenAPI spec (skipped without ../shared)."""

from __future__ import annotations

import json

import pytest

from addon.apis.openai_embeddings import OPENAI_EMBEDDINGS
from addon.apis.openai_responses import OPENAI_RESPONSES
from addon.apis.registry import api_for_path, resource_for
from addon.wire.tokens import Usage
from addon.wire.errors import GatewayError
from tests.fakeresponses import USAGE, response, response_stream


def test_responses_usage_from_a_whole_body():
    body = json.dumps(response({"model": "gpt-4.1"})).encode()
    assert OPENAI_RESPONSES.usage_from_body(body) == Usage(9, 3, 4)
    assert OPENAI_RESPONSES.usage_from_body(b'{"error": {"message": "x"}}') is None
    assert OPENAI_RESPONSES.usage_from_body(b"not json") is None


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_responses_stream_usage_in_any_split_passes_bytes_unchanged(size):
    raw = b"".join(response_stream({"model": "gpt-4.1"}, pieces=("a", "b", "c")))
    watcher = OPENAI_RESPONSES.stream_usage(strip=False)
    out = []
    for i in range(0, len(raw), size):
        out += watcher.feed(raw[i:i + size])
    out += watcher.feed(b"")
    assert b"".join(out) == raw
    assert watcher.usage == Usage(9, 3, 4)


def test_responses_stream_usage_ignores_usage_outside_the_final_event():
    raw = b"".join(response_stream({"model": "m"})[:-1])  # no response.completed
    watcher = OPENAI_RESPONSES.stream_usage(strip=False)
    watcher.feed(raw.replace(b'"usage": null', b'"usage": {"input_tokens": 99}'))
    watcher.feed(b"")
    assert watcher.usage is None


def test_responses_stream_error_is_an_error_event():
    [event] = OPENAI_RESPONSES.stream_error("boom")
    assert event.startswith(b"event: error\ndata: ")
    data = json.loads(event.split(b"data: ", 1)[1])
    assert data["type"] == "error" and data["message"] == "boom" and data["code"] == "gateway_error"
    [event] = OPENAI_RESPONSES.stream_error("stalled", "stream_idle_timeout")
    assert json.loads(event.split(b"data: ", 1)[1])["code"] == "stream_idle_timeout"


@pytest.mark.parametrize("tail, methods", [
    ("/resp_abc", {"GET", "DELETE"}), ("/resp_abc/input_items", {"GET"}), ("/resp_abc/cancel", {"POST"}),
    ("/abc", None), ("/resp_a/../../x", None), ("/", None), ("/resp_abc/input_items/x", None),
])
def test_stored_response_paths(tail, methods):
    got = OPENAI_RESPONSES.resource(tail)
    assert (set(got) if got else None) == methods


def test_resource_lookup_and_error_shape_by_path():
    assert resource_for("/v1/responses/resp_1") == (OPENAI_RESPONSES, "/resp_1")
    assert resource_for("/v1/files/x") == (None, None)
    assert api_for_path("/v1/responses/resp_1?x=1") is OPENAI_RESPONSES
    assert api_for_path("/v1/embeddings") is OPENAI_EMBEDDINGS


@pytest.mark.parametrize("body, code", [
    ({"model": "m"}, "missing_input"), ({"model": "m", "input": []}, "missing_input"),
    ({"model": "m", "input": "x", "encoding_format": "int8"}, "invalid_value"),
    ({"model": "m", "input": "x", "stream": False}, "invalid_value"), ({"input": "x"}, "missing_model"),
])
def test_embeddings_request_checks(body, code):
    with pytest.raises(GatewayError) as e:
        OPENAI_EMBEDDINGS.parse_request(json.dumps(body).encode())
    assert e.value.status == 400 and e.value.code == code


def test_embeddings_accept_every_input_form():
    for value in ("x", ["x", "y"], [1, 2, 3], [[1, 2], [3]]):
        assert OPENAI_EMBEDDINGS.parse_request(json.dumps({"model": "m", "input": value}).encode())["input"] == value


# --- the fakes against the official spec --------------------------------------------------------

def test_fake_responses_match_the_openapi_spec():
    conformance = pytest.importorskip("tests.unit.translate.test_anthropic_conformance")
    from tests.conftest import SHARED_REFERENCE
    if not (SHARED_REFERENCE / "specs" / "openai-openapi.yaml").exists():
        pytest.skip("../shared/reference is absent")
    conformance.assert_valid("openai-openapi.yaml", "Response", response({"model": "gpt-4.1"}))
    events = [json.loads(e.split(b"data: ", 1)[1]) for e in response_stream({"model": "gpt-4.1"})]
    conformance.assert_valid("openai-openapi.yaml", "ResponseCompletedEvent", events[-1])
    assert events[-1]["response"]["usage"] == USAGE
    conformance.assert_valid(
        "openai-openapi.yaml", "CreateResponse", {"model": "gpt-4.1", "input": "hi", "stream": True}
    )
    conformance.assert_valid("openai-openapi.yaml", "CreateEmbeddingResponse", {
        "object": "list", "model": "m", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
        "usage": {"prompt_tokens": 3, "total_tokens": 3}})
