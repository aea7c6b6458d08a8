"""The adapter's decisions, driven through mitmproxy's own addon test helpers (no sockets)."""

import asyncio
import json

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addon.hooks.gateway import Gateway
from addon.hooks.patches import wirekeys
from addon.wire.secrets import fingerprint
from addon.translate.passthrough import PassthroughExchange

REAL = "sk-real-secret-key-123456"
KEYS = {
    "providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1"}},
    "virtual_keys": {
        "vk_o": {"provider": "openai", "api_key": REAL},
        "vk_d": {"provider": "deepseek", "api_key": "sk-deepseek-real-999999", "base_url": "https://ds.example/"},
    },
}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gw(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, keys_file=str(path))
        yield addon


def flow(path="/v1/chat/completions", method="POST", body=CHAT, headers=None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"authorization": "Bearer vk_o", "content-type": "application/json", "host": "127.0.0.1:1"}
    hdrs.update(headers or {})
    req = tutils.treq(method=method.encode(), path=path.encode(), host="127.0.0.1", port=1, scheme=b"http",
                      content=content)
    req.headers.clear()
    for k, v in hdrs.items():
        if v is not None:
            req.headers[k] = v
    f = tflow.tflow(req=req)
    f.client_conn.sockname = ("127.0.0.1", 8080)  # the gateway's listen address
    return f


def error_of(f):
    assert f.response is not None, "the gateway should have answered itself"
    return f.response.status_code, json.loads(f.response.content)["error"]


def test_routes_openai_and_swaps_the_key(gw):
    f = flow(path="/v1/chat/completions?trace=1")
    gw.request(f)
    assert f.response is None
    assert f.request.url == "http://127.0.0.1:9001/v1/chat/completions?trace=1"
    # the flow carries a placeholder; the key is put in the bytes sent to the routed address only
    assert f.request.headers["authorization"] == f"Bearer {wirekeys.placeholder(f.id)}"
    assert REAL not in json.dumps(f.get_state(), default=repr)
    assert wirekeys.on_the_wire(f.request.headers.fields, ("evil.example", 9001)) is None  # popped, not sent
    gw.request(g := flow())
    wire = dict(wirekeys.on_the_wire(g.request.headers.fields, ("127.0.0.1", 9001)))
    assert wire[b"authorization"] == f"Bearer {REAL}".encode()
    assert wirekeys.on_the_wire(g.request.headers.fields, ("127.0.0.1", 9001)) is None  # used once
    assert f.request.headers["host"] == "127.0.0.1:9001"
    assert json.loads(f.request.content) == CHAT
    assert f.metadata["gateway"].provider == "openai"
    assert f.comment == f"key-{fingerprint('vk_o')} -> openai"  # neither the virtual nor the real key
    assert "vk_o" not in f.comment and REAL not in f.comment


def test_x_api_key_and_unversioned_path_route_deepseek(gw):
    f = flow(path="/chat/completions", headers={"authorization": None, "x-api-key": "vk_d"})
    gw.request(f)
    assert f.response is None
    assert f.request.url == "https://ds.example/chat/completions"
    assert f.request.headers["host"] == "ds.example"  # default port: not named
    wire = dict(wirekeys.on_the_wire(f.request.headers.fields, ("ds.example", 443)))
    assert wire[b"authorization"] == b"Bearer sk-deepseek-real-999999"
    assert "x-api-key" not in f.request.headers


def test_client_account_headers_are_not_forwarded(gw):
    f = flow(headers={"openai-organization": "org-x", "openai-project": "p", "cookie": "a=b", "user-agent": "ua"})
    gw.request(f)
    for h in ("openai-organization", "openai-project", "cookie"):
        assert h not in f.request.headers
    assert f.request.headers["user-agent"] == "ua"


@pytest.mark.parametrize("kwargs, status, code", [
    (dict(headers={"authorization": None}), 401, "missing_api_key"),
    (dict(headers={"authorization": "Bearer vk_unknown"}), 401, "invalid_api_key"),
    (dict(headers={"authorization": "Basic dms6"}), 401, "missing_api_key"),
    (dict(body=b"{not json"), 400, "invalid_json"),
    (dict(body=[1, 2]), 400, "invalid_request"),
    (dict(body={"messages": CHAT["messages"]}), 400, "missing_model"),
    (dict(body={"model": "gpt-4o"}), 400, "missing_messages"),
    (dict(body={"model": "gpt-4o", "messages": []}), 400, "missing_messages"),
    (dict(path="/v1/files"), 404, "unknown_path"),
    (dict(path="/v1/chat/completions/../../admin"), 404, "unknown_path"),
    (dict(method="GET"), 405, "method_not_allowed"),
    (dict(path="/health", method="POST"), 405, "method_not_allowed"),
])
def test_bad_requests_are_answered_locally_and_not_forwarded(gw, kwargs, status, code):
    f = flow(**kwargs)
    gw.request(f)
    got_status, err = error_of(f)
    assert (got_status, err["code"]) == (status, code)
    assert err["message"] and err["type"]
    # shown as sent to the gateway itself (never the provider; the response is already set)
    assert (f.request.host, f.request.port, f.request.headers["host"]) == ("127.0.0.1", 8080, "127.0.0.1:8080")
    assert REAL not in f.request.headers.get("authorization", "")


def test_health(gw):
    f = flow(path="/health", method="GET", headers={"authorization": None})
    gw.request(f)
    assert f.response.status_code == 200


def test_internal_error_fails_closed(gw, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("bug")
    monkeypatch.setattr("addon.translate.passthrough.Passthrough.prepare", boom)
    f = flow()
    gw.request(f)
    status, err = error_of(f)
    assert status == 500 and err["code"] == "gateway_error"
    assert f.request.port == 8080  # not rewritten to the provider: the gateway's own address


def test_key_is_redacted_once_the_response_starts(gw):
    f = flow()
    gw.request(f)
    f.response = tutils.tresp(content=b'{"ok": true}')
    gw.responseheaders(f)
    assert f.request.headers["authorization"] == "REDACTED"
    gw.response(f)
    assert REAL.encode() not in json.dumps(f.get_state(), default=repr).encode()


def test_key_is_redacted_on_error(gw):
    f = flow()
    gw.request(f)
    f.response = None
    gw.error(f)
    assert f.request.headers["authorization"] == "REDACTED"
    assert not gw.live.in_flight


def test_streams_pass_through_untouched(gw):
    f = flow(body={**CHAT, "stream": True})
    gw.request(f)
    assert f.request.headers["accept-encoding"] == "identity"
    f.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream"), content=b"")
    gw.responseheaders(f)
    assert f.response.stream is True


def test_foreign_provider_errors_are_wrapped_openai_errors_kept(gw):
    f = flow()
    gw.request(f)
    f.response = tutils.tresp(
        status_code=502, content=b"<html>bad gateway</html>", headers=http.Headers(content_type="text/html")
    )
    gw.responseheaders(f)
    gw.response(f)
    assert f.response.status_code == 502
    err = json.loads(f.response.content)["error"]
    assert "bad gateway" in err["message"] and err["code"] == "upstream_error"

    original = b'{"error": {"message": "nope", "type": "invalid_request_error", "param": null, "code": "x"}}'
    f = flow()
    gw.request(f)
    f.response = tutils.tresp(status_code=400, content=original)
    gw.responseheaders(f)
    gw.response(f)
    assert f.response.content == original


def test_translation_failure_becomes_502(gw, monkeypatch):
    monkeypatch.setattr(PassthroughExchange, "translate_body", lambda self, s, b: 1 / 0)
    f = flow()
    gw.request(f)
    f.response = tutils.tresp(status_code=500, content=b"{}")
    gw.responseheaders(f)
    gw.response(f)
    assert f.response.status_code == 502
    assert json.loads(f.response.content)["error"]["code"] == "gateway_error"


def test_passthrough_success_body_is_not_read(gw, monkeypatch):
    monkeypatch.setattr(PassthroughExchange, "translate_body", lambda self, s, b: 1 / 0)
    f = flow()
    gw.request(f)
    f.response = tutils.tresp(content=b'{"id": "x"}')
    gw.responseheaders(f)
    gw.response(f)
    assert f.response.status_code == 200 and f.response.content == b'{"id": "x"}'


def test_bad_keys_file_on_reload_keeps_the_old_keys(gw, tmp_path):
    from mitmproxy import ctx, exceptions
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(exceptions.OptionsError):
        ctx.options.update(keys_file=str(bad))
    f = flow()
    gw.request(f)
    assert f.response is None and f.request.port == 9001


def test_http2_authority_follows_the_upstream(gw):
    f = flow()
    f.request.data.authority = b"127.0.0.1:1"
    gw.request(f)
    assert f.request.authority == "127.0.0.1:9001"


def test_replace_body_sets_framing_headers_like_mitmproxy():
    from addon.hooks.messages import replace_body

    resp = tutils.tresp(
        headers=http.Headers(content_type="text/plain", content_encoding="gzip", content_length="3", x_keep="1")
    )
    replace_body(resp, b'{"a":1}', b"application/json")
    assert resp.headers["content-type"] == "application/json" and "content-encoding" not in resp.headers
    assert resp.headers["content-length"] == "7" and resp.headers["x-keep"] == "1"
    assert resp.raw_content == resp.content == b'{"a":1}'
    chunked = tutils.tresp(headers=http.Headers(transfer_encoding="chunked", content_type="text/event-stream"))
    replace_body(chunked, b"x")
    assert "content-length" not in chunked.headers and chunked.headers["content-type"] == "text/event-stream"


def test_a_gzipped_request_body_is_decoded_and_a_broken_encoding_is_a_400(gw):
    import gzip

    f = flow(
        body=gzip.compress(json.dumps({**CHAT, "model": "gpt-4o-mini"}).encode()), headers={"content-encoding": "gzip"}
    )
    asyncio.run(gw.request(f))  # an encoded body is decoded and parsed in a worker thread: the hook waits
    assert f.response is None and f.metadata["gateway"].model == "gpt-4o-mini"
    assert json.loads(f.request.content)["model"] == "gpt-4o-mini"

    f = flow(body=b"not gzip at all", headers={"content-encoding": "gzip"})
    asyncio.run(gw.request(f))
    status, err = error_of(f)
    assert status == 400 and err["code"] == "invalid_encoding"
    assert (f.request.host, f.request.port) == ("127.0.0.1", 8080)  # not routed: the gateway answered


def test_duplicate_authorization_headers_are_not_guessed_between(gw):
    f = flow()
    f.request.headers.fields += ((b"Authorization", b"Bearer vk_d"),)
    gw.request(f)
    status, err = error_of(f)
    assert status == 401 and err["code"] == "invalid_api_key"


def test_header_and_plain_content_read_raw_fields_like_mitmproxy():
    import gzip

    from addon.hooks.messages import field_value, header, lower_names, plain_content

    resp = http.Response.make(200, b"", {"Content-Encoding": "GZIP", "X-Dup": "a"})
    resp.raw_content = gzip.compress(b"hello")
    resp.headers.fields += ((b"x-dup", b"b"),)
    assert header(resp.headers, b"x-dup") == resp.headers.get("x-dup") == "a, b"
    assert header(resp.headers, b"x-missing") is None
    names = lower_names(resp.headers.fields)
    assert field_value(resp.headers.fields, names, b"x-dup") == "a, b"
    assert field_value(resp.headers.fields, names, b"content-encoding") == "GZIP"
    assert field_value(resp.headers.fields, names, b"x-missing") is None
    assert plain_content(resp) == plain_content(resp, names) == resp.content == b"hello"
    identity = http.Response.make(200, b"raw", {"content-encoding": "identity"})
    assert plain_content(identity) == b"raw"


@pytest.mark.parametrize("field, value", [("stream", "false"), ("stream", 1), ("stream_options", "include_usage")])
def test_stream_fields_of_the_wrong_type_are_400(gw, field, value):
    f = flow(body={**CHAT, field: value})
    gw.request(f)
    status, err = error_of(f)
    assert status == 400 and err["param"] == field and err["code"] == "invalid_value"


def test_a_request_the_provider_refuses_does_not_use_up_the_rpm_slot(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"virtual_keys": {"vk_a": {"provider": "anthropic", "api_key": REAL, "rpm": 1}}}))
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, keys_file=str(path))
        refused = flow(body={**CHAT, "model": "claude-sonnet-4-6", "n": 2}, headers={"authorization": "Bearer vk_a"})
        addon.request(refused)
        assert error_of(refused)[0] == 400
        ok = flow(body={**CHAT, "model": "claude-sonnet-4-6"}, headers={"authorization": "Bearer vk_a"})
        addon.request(ok)
        assert ok.response is None  # routed: the 400 did not count against rpm 1
        again = flow(body={**CHAT, "model": "claude-sonnet-4-6"}, headers={"authorization": "Bearer vk_a"})
        addon.request(again)
        assert error_of(again)[0] == 429


def test_a_timeout_mark_only_turns_its_own_502_into_a_504(monkeypatch):
    from addon.hooks.patches import errorpages
    clock = [1000.0]
    monkeypatch.setattr(errorpages.time, "monotonic", lambda: clock[0])
    errorpages.answer_next_as_timeout("server closed connection", "provider did not answer within 5s")
    status, text, code = errorpages._classify(502, "server closed connection")
    assert (status, code) == (504, "upstream_timeout") and "within 5s" in text
    # used once only
    assert errorpages._classify(502, "server closed connection")[0] == 502
    # a mark whose page was never rendered (the client had gone) expires
    errorpages.answer_next_as_timeout("server closed connection", "provider did not answer within 5s")
    clock[0] += 5
    assert errorpages._classify(502, "server closed connection")[0] == 502
    assert errorpages._timeouts == {}


def test_client_secrets_are_hidden_on_headers_and_proxy_authorization_is_not_forwarded(gw):
    f = flow(headers={"proxy-authorization": "Basic dXNlcjpwYXNz"})
    gw.requestheaders(f)  # before any view sees the flow
    assert f.request.headers["authorization"] == f"Bearer vkfp:{fingerprint('vk_o')}"
    assert "dXNlcjpwYXNz" not in f.request.headers["proxy-authorization"]
    gw.request(f)
    assert f.response is None and "proxy-authorization" not in f.request.headers
    assert "vk_o" not in json.dumps(f.get_state(), default=repr)


def test_account_response_headers_do_not_reach_the_client(gw):
    f = flow()
    gw.requestheaders(f)
    gw.request(f)
    f.response = tutils.tresp(
        content=b'{"ok": true}',
        headers=http.Headers(
            [
                (b"set-cookie", b"__cf_bm=x"),
                (b"openai-organization", b"org-gw"),
                (b"openai-project", b"proj_gw"),
                (b"anthropic-organization-id", b"uuid"),
                (b"x-ratelimit-remaining-requests", b"99"),
                (b"x-request-id", b"req_1"),
                (b"content-type", b"application/json"),
            ]
        ),
    )
    gw.responseheaders(f)
    names = {k.lower() for k in f.response.headers}
    assert not names & {"set-cookie", "openai-organization", "openai-project", "anthropic-organization-id"}
    assert {"x-ratelimit-remaining-requests", "x-request-id", "content-type"} <= names


def test_the_mitmweb_comment_names_the_key_the_answering_target_and_the_model():
    from dataclasses import replace

    from addon.routing.routes import describe_attempt
    from addon.routing.state import FlowState

    state = FlowState(key="team-alpha", provider="openai")
    assert describe_attempt(state) == "team-alpha -> openai"  # before the body is read
    state.model, state.api = "gpt-4o", "openai_chat"
    assert describe_attempt(state) == "team-alpha -> openai gpt-4o"
    assert describe_attempt(replace(state, attempts=2)) == "team-alpha -> openai gpt-4o (attempt 2)"
    state.provider, state.model, state.fallback, state.attempts = "anthropic", "claude-haiku-4-5", True, 2
    assert describe_attempt(state) == "team-alpha -> anthropic claude-haiku-4-5 (fallback, attempt 2)"
    assert describe_attempt(replace(state, api="openai_embeddings", fallback=False, attempts=1)) == \
        "team-alpha -> anthropic claude-haiku-4-5 (embeddings)"
