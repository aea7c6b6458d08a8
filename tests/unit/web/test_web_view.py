"""addon/web: the text mitmweb shows for a gateway flow (both sides, streams, refusals), no secrets."""

from __future__ import annotations

import gzip
import json

from mitmproxy import contentviews, http
from mitmproxy.test import tflow, tutils

from addon.web.contentview import request_sides, response_sides
from addon.web.sides import header_changes, header_value, render_body


def sse(*events: tuple[str | None, dict | str]) -> bytes:
    out = b""
    for name, data in events:
        out += (f"event: {name}\n" if name else "").encode()
        out += b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"
    return out


def test_secret_headers_are_hidden_unless_already_redacted_or_marked():
    assert header_value("x-api-key", "REDACTED") == "REDACTED"
    assert header_value("Authorization", "Bearer vkfp:0123456789abcdef") == "Bearer vkfp:0123456789abcdef"
    assert header_value("authorization", "Bearer sk-live-secret") == "(hidden)"
    assert header_value("api-key", "azure-secret") == "(hidden)"
    assert header_value("Cookie", "session=abc") == "(hidden)"
    assert header_value("content-type", "application/json") == "application/json"


def test_header_changes_list_what_the_gateway_set_and_dropped():
    before = [("Host", "127.0.0.1:8080"), ("authorization", "Bearer vkfp:ab"), ("accept", "*/*")]
    after = [("Host", "api.openai.com"), ("accept", "*/*"), ("x-api-key", "REDACTED")]
    assert header_changes(after, before) == ["+ Host: api.openai.com", "+ x-api-key: REDACTED", "- authorization"]
    assert header_changes(before, before) == ["(headers unchanged)"]


def test_a_stream_is_listed_event_by_event_without_repeating_fields():
    first = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [{"delta": {"role": "assistant"}}]}
    body = sse((None, first), (None, {**first, "choices": [{"delta": {"content": "Hi"}}]}), (None, "[DONE]"))
    text = render_body(body, "text/event-stream")
    lines = text.splitlines()
    assert lines[0] == "3 events, as they went over the wire:"
    assert (
        lines[1]
        == '#1  {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [{"delta": {"role": "assistant"}}]}'
    )
    assert lines[2] == '#2  {"choices": [{"delta": {"content": "Hi"}}]}'
    assert lines[3] == "#3  [DONE]"


def test_named_events_line_up_and_drop_a_type_repeating_the_name():
    body = sse(("message_start", {"type": "message_start", "message": {"id": "msg_1"}}),
               ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"text": "Hi"}}))
    assert render_body(body, "text/event-stream").splitlines()[1:3] == [
        '#1 message_start        {"message": {"id": "msg_1"}}',
        '#2 content_block_delta  {"index": 0, "delta": {"text": "Hi"}}',
    ]


def test_bodies_json_pretty_and_empty_or_missing_said_so():
    assert render_body(b'{"a":1}', "application/json") == '{\n  "a": 1\n}'
    assert render_body(b"", "application/json") == "(empty body)"
    assert render_body(None, "") == "(no body kept)"
    assert render_body("é".encode() + b"\xff", "text/plain") == "é\ufffd"


def gateway_flow(answered: str | None = None, keep: bool = True) -> http.HTTPFlow:
    upstream_body = json.dumps(
        {"model": "claude-x", "max_tokens": 4096, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    req = tutils.treq(method=b"POST", host="api.anthropic.com", port=443, scheme=b"https", path=b"/v1/messages",
                      content=upstream_body)
    req.headers.clear()
    req.headers["host"] = "api.anthropic.com"
    req.headers["x-api-key"] = "REDACTED"
    f = tflow.tflow(req=req, resp=tutils.tresp(content=b'{"choices": []}'))
    f.metadata["gateway"] = {"key": "team-a", "fingerprint": "ab" * 8, "provider": "anthropic", "model": "claude-x"}
    if answered:
        f.metadata["gateway"]["answered"] = answered
        f.response = http.Response.make(429, json.dumps({"error": {"message": "token budget used up"}}).encode(),
                                        {"content-type": "application/json"})
    if keep:
        f.metadata["record"] = {
            "client_request": {
                "method": "POST",
                "path": "/v1/chat/completions",
                "http_version": "HTTP/1.1",
                "headers": [
                    ["host", "127.0.0.1:8080"],
                    ["authorization", "Bearer vkfp:abababababababab"],
                    ["content-encoding", "gzip"],
                ],
                "content": gzip.compress(b'{"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}'),
            },
            "upstream": {
                "status": 200,
                "reason": "OK",
                "headers": [["content-type", "text/event-stream"]],
                "pieces": [
                    sse(("message_start", {"type": "message_start"})),
                    sse(("message_stop", {"type": "message_stop"})),
                ],
            },
        }
    return f


def test_the_request_view_shows_the_client_request_then_the_upstream_one():
    text = request_sides(gateway_flow())
    client, upstream = (
        text.index("CLIENT → GATEWAY   POST /v1/chat/completions"),
        text.index("GATEWAY → PROVIDER (anthropic)"),
    )
    assert text.startswith("Routed by the gateway: key team-a → anthropic, model claude-x")
    assert client < upstream
    assert '"content": "hi"' in text[client:upstream]  # the client's gzip body, decoded for display
    assert "POST https://api.anthropic.com/v1/messages" in text[upstream:]
    assert '"max_tokens": 4096' in text[upstream:]
    assert "+ x-api-key: REDACTED" in text[upstream:] and "- authorization" in text[upstream:]


def test_the_response_view_shows_the_provider_stream_then_what_the_client_got():
    text = response_sides(gateway_flow(), sse((None, {"choices": []}), (None, "[DONE]")))
    provider, client = text.index("PROVIDER (anthropic) → GATEWAY   200 OK"), text.index("GATEWAY → CLIENT")
    assert "#1 message_start" in text[provider:client] and "#2 message_stop" in text[provider:client]
    assert "#2  [DONE]" in text[client:]


def test_without_a_snapshot_the_view_says_how_to_keep_the_client_side():
    text = request_sides(gateway_flow(keep=False))
    assert "(not kept)" in text and "replayable_flows" in text
    assert "GATEWAY → PROVIDER (anthropic)" in text


def test_a_refused_flow_says_why_and_shows_only_the_client_side():
    f = gateway_flow(answered="budget_exceeded", keep=False)
    text = request_sides(f)
    assert text.startswith("Answered by the gateway, never forwarded: 429 budget_exceeded — token budget used up")
    assert "GATEWAY → PROVIDER" not in text and "not forwarded" in text
    assert "GATEWAY → CLIENT   429" in response_sides(f, f.response.content)


def test_the_view_is_picked_first_for_gateway_flows_only():
    from mitmproxy.test import taddons
    from addon.web.contentview import WebViews
    with taddons.context(WebViews()):  # registers the view on load, as in mitmweb
        check_view_choice()


def check_view_choice():
    f = gateway_flow()
    assert contentviews.prettify_message(f.request, f).view_name == "LLM gateway"
    assert contentviews.prettify_message(f.response, f).view_name == "LLM gateway"
    plain = tflow.tflow(resp=tutils.tresp(content=b'{"a": 1}', headers=http.Headers(content_type="application/json")))
    assert contentviews.prettify_message(plain.response, plain).view_name != "LLM gateway"
