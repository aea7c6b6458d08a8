"""hooks/guardrails.py on mitmproxy's test flows: the request replaced masked (or answered 400
content_blocked, masked too), what is noted where, the answer's header, a stream wrapped after
the gateway's own (True or a callable) and ended fail-closed when masking fails, a recording's
raw provider answer masked."""

from __future__ import annotations

import asyncio
import json

from mitmproxy import http
from mitmproxy.test import tflow

from addon.hooks.guardrails import Guardrails, masked_stream
from addon.guard.stream import StreamGuard
from addon.apis.registry import APIS
from addon.policy.keys_parse import parse_keys
from addon.routing.state import state_of
from tests.unit.guard.corpus import AWS_ID

KEYS = parse_keys({
    "guardrails": {"default": {"detect": ["secrets", "emails"], "responses": "mask"},
                   "strict": {"detect": ["secrets"], "action": "block"}},
    "virtual_keys": {"vk_m": {"provider": "openai", "api_key": "sk-x", "name": "m", "guardrails": "default"},
                     "vk_b": {"provider": "openai", "api_key": "sk-y", "name": "b", "guardrails": "strict"},
                     "vk_n": {"provider": "openai", "api_key": "sk-z", "name": "n"}}})


class Holder:
    keys = KEYS


def flow(key: str, body: dict, path: str = "/v1/chat/completions") -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.path = path
    f.request.content = json.dumps(body).encode()
    f.metadata["gateway"] = {"fingerprint": KEYS.lookup(key).fingerprint}
    return f


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"key {AWS_ID} mail bob@example.com"}]}


def test_a_masked_request_and_its_answer():
    g = Guardrails(Holder())
    f = flow("vk_m", CHAT)
    assert g.requests.request(f) is None
    sent = json.loads(f.request.content)
    assert sent["messages"][0]["content"] == "key [REDACTED:secrets] mail [REDACTED:emails]"
    assert state_of(f).guardrails.to_dict() == {"set": "default", "action": "mask",
                                                "masked": {"emails": 1, "secrets": 1}, "where": ["messages[0].content"]}
    assert "guardrails masked=emails:1,secrets:1" in f.comment
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"it is {AWS_ID}"}}]}
    f.response = http.Response.make(200, json.dumps(answer).encode(), {"content-type": "application/json"})
    raw = json.dumps(answer).encode()
    f.metadata["record"] = {"upstream": {"pieces": [raw[:20], raw[20:]]}}
    g.answers.responseheaders(f)
    assert f.response.headers["x-gateway-guardrails"] == "masked=emails:1,secrets:1"
    g.answers.response(f)
    assert json.loads(f.response.content)["choices"][0]["message"]["content"] == "it is [REDACTED:secrets]"
    assert state_of(f).guardrails.answer_masked == {"secrets": 1}
    assert AWS_ID.encode() not in b"".join(f.metadata["record"]["upstream"]["pieces"])
    assert g.sets == {}  # nothing left per flow


def test_a_block_answers_in_the_clients_shape_and_keeps_the_request_masked():
    g = Guardrails(Holder())
    f = flow("vk_b", {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": f"k {AWS_ID}"}]},
             "/v1/messages")
    g.requests.request(f)
    assert f.response.status_code == 400
    body = json.loads(f.response.content)
    assert body["type"] == "error" and "secrets in messages[0].content" in body["error"]["message"]
    assert f.response.headers["x-gateway-guardrails"] == "blocked=secrets"
    assert AWS_ID.encode() not in f.response.content and AWS_ID.encode() not in f.request.content
    assert state_of(f).guardrails.blocked == ["secrets"]


def test_keys_without_a_set_paths_without_text_and_bad_json_are_left_alone():
    g = Guardrails(Holder())
    f = flow("vk_n", CHAT)
    before = f.request.content
    g.requests.request(f)
    assert f.request.content == before and state_of(f).guardrails is None
    f = flow("vk_m", CHAT, "/v1/responses/resp_1")
    g.requests.request(f)
    assert state_of(f).guardrails is None
    f = flow("vk_m", CHAT)
    f.request.content = b"{not json " + AWS_ID.encode()
    g.requests.request(f)
    assert f.response is None  # the gateway answers invalid_json


def test_a_large_body_is_scanned_off_the_loop():
    g = Guardrails(Holder())
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (1 << 20) + f" {AWS_ID}"}]}
    f = flow("vk_m", big)
    pending = g.requests.request(f)
    assert pending is not None
    asyncio.run(pending)
    assert json.loads(f.request.content)["messages"][0]["content"].endswith(" [REDACTED:secrets]")


def chat_event(text: str) -> bytes:
    event = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def test_a_stream_is_masked_after_the_gateways_own_and_fails_closed():
    api = APIS["openai_chat"]
    scanner = KEYS.lookup("vk_m").guardrails.scanner
    half = len(AWS_ID) // 2
    raw = [chat_event("key " + AWS_ID[:half]), chat_event(AWS_ID[half:] + " ok"), b"data: [DONE]\n\n"]
    for inner in (True, lambda piece: [piece]):  # the gateway's True, or its translator (may return a list)
        fn = masked_stream(inner, StreamGuard("openai_chat", scanner), api)
        out = b"".join(fn(p) for p in raw) + fn(b"")
        assert AWS_ID.encode() not in out and b"[REDACTED:secrets]" in out



def test_a_stream_whose_masking_fails_ends_with_the_apis_error_and_logs_one_line(caplog, monkeypatch):
    """Fail closed: the client gets the API's error event and nothing after it; the log gets the
    exception's type, never its traceback or its message (which may quote what was caught)."""
    api = APIS["openai_chat"]
    scanner = KEYS.lookup("vk_m").guardrails.scanner
    guard = StreamGuard("openai_chat", scanner)

    def broken(data: bytes) -> bytes:
        raise ValueError(f"could not mask {AWS_ID} in {data!r}")

    monkeypatch.setattr(guard, "feed", broken)
    fn = masked_stream(True, guard, api)
    with caplog.at_level("DEBUG", logger="gateway"):
        first = fn(chat_event(f"key {AWS_ID}"))
        rest = fn(chat_event("more")) + fn(b"")
    assert first == b"".join(api.stream_error("the gateway could not check this answer", "gateway_error"))
    assert json.loads(first.split(b"data: ", 1)[1].split(b"\n")[0])["error"]["code"] == "gateway_error"
    assert rest == b""  # nothing of the answer after the error, not even at its end
    assert [r.getMessage() for r in caplog.records] == [
        "gateway: guardrails could not mask a stream (ValueError); ended for the client"]
    assert all(r.exc_info is None and r.exc_text is None for r in caplog.records)
    assert AWS_ID not in caplog.text and "Traceback" not in caplog.text


def test_the_gateway_reads_the_body_the_guard_parsed_once(tmp_path, monkeypatch):
    """The guard's parse (the API's own) is handed to the Gateway: one parse per request, the
    masked object forwarded as parsed; a body replaced after the guard is read again."""
    from mitmproxy.test import taddons

    from addon.apis.openai_chat import OpenAIChat
    from addon.hooks.chain import AddonChain
    from addon.hooks.gateway import Gateway
    from addon.hooks.live import Live
    from addon.policy.memory_store import MemoryStore

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"guardrails": {"default": {"detect": ["secrets", "emails"]}}, "virtual_keys": {
        "vk_m": {"provider": "openai", "api_key": "sk-m-000000000000", "name": "m", "guardrails": "default",
                 "base_url": "http://127.0.0.1:9/v1"}}}))
    parsed = []
    original = OpenAIChat.parse_request

    def counting(self, raw):
        parsed.append(raw)
        return original(self, raw)

    monkeypatch.setattr(OpenAIChat, "parse_request", counting)
    live = Live(MemoryStore())
    gateway, guard = Gateway(live), Guardrails(live)
    chain = AddonChain(guard.requests, gateway)

    def request(body: dict) -> http.HTTPFlow:
        return tflow.tflow(req=http.Request.make("POST", "http://127.0.0.1:8080/v1/chat/completions",
                                                 json.dumps(body).encode(),
                                                 {"authorization": "Bearer vk_m", "content-type": "application/json"}))

    with taddons.context(chain) as tctx:
        tctx.configure(chain, keys_file=str(keys))
        clean = request({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]})
        chain.requestheaders(clean)
        chain.request(clean)
        assert clean.response is None and clean.request.host == "127.0.0.1" and clean.request.port == 9
        assert len(parsed) == 1 and state_of(clean).parsed is None  # (taken: nothing left on the flow)
        assert json.loads(clean.request.content)["messages"][0]["content"] == "hello"

        parsed.clear()
        masked = request(CHAT)
        chain.requestheaders(masked)
        chain.request(masked)
        assert masked.response is None and len(parsed) == 1
        sent = json.loads(masked.request.content)
        assert sent["messages"][0]["content"] == "key [REDACTED:secrets] mail [REDACTED:emails]"

        parsed.clear()
        replaced = request({"model": "gpt-4o", "messages": [{"role": "user", "content": "first"}]})
        chain.requestheaders(replaced)
        guard.requests.request(replaced)
        assert state_of(replaced).parsed is not None
        replaced.request.content = json.dumps({"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "second"}]}).encode()  # a part after the guard rewrote it
        gateway.request(replaced)
        assert len(parsed) == 2 and state_of(replaced).model == "gpt-4o-mini"
        assert json.loads(replaced.request.content)["messages"][0]["content"] == "second"


def test_a_body_its_api_refuses_is_masked_all_the_same_and_not_handed_on():
    g = Guardrails(Holder())
    f = flow("vk_m", {"messages": [{"role": "user", "content": f"no model, key {AWS_ID}"}]})  # the gateway: 400
    g.requests.request(f)
    assert AWS_ID.encode() not in f.request.content and b"[REDACTED:secrets]" in f.request.content
    assert state_of(f).parsed is None
