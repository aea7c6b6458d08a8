"""End to end: guardrails in the real gateway. Every inbound API, plain and streamed, through the
official SDKs: what the fake provider received is masked, what the client got back is masked
(secrets split across stream chunks at several offsets), a block is a 400 content_blocked in the
client's shape that never reaches the provider, and no matched text is anywhere the run wrote:
the gateway's log (most verbose), the recording, the ledger."""

from __future__ import annotations

import json
import re
import sqlite3
import time

import anthropic
import openai
import pytest

from tests import rawhttp
from tests.conftest import free_port
from tests.e2e.test_metrics import scrape_until
from tests.unit.hooks.test_metrics import value
from tests.e2e.test_anthropic_e2e import anthropic_message, stream_events, text_block, tool_block
from tests.fakeprovider import Received, Reply, openai_completion, openai_stream
from tests.fakeresponses import response, response_stream
from tests.unit.guard.corpus import AWS_ID, JWT

pytestmark = pytest.mark.e2e

CARD = "4111 1111 1111 1111"
EMAIL = "ada.lovelace@example.com"
# what the provider answers: every kind the default set masks, for the answers' side
ANSWER = f"Found {AWS_ID} and card {CARD}; write to {EMAIL}. Done."
MASKED_ANSWER = "Found [REDACTED:secrets] and card [REDACTED:credit_cards]; write to [REDACTED:emails]. Done."
MATCHED = (AWS_ID, CARD, EMAIL, JWT, "4111111111111111")
SETS = {
    "default": {"detect": ["secrets", "private_keys", "credit_cards", "emails"], "action": "mask",
                "responses": "mask"},
    "strict": {"detect": ["secrets", "credit_cards", {"name": "ticket", "regex": "ACME-[0-9]{6}"}],
               "action": "block"},
}
KEYS = {
    "vk_guard_openai": {"provider": "openai", "api_key": "sk-guard-openai-real-01", "name": "guard-openai",
                        "guardrails": "default"},
    "vk_guard_claude": {"provider": "anthropic", "api_key": "sk-guard-claude-real-02", "name": "guard-claude",
                        "guardrails": "default"},
    "vk_guard_strict": {"provider": "openai", "api_key": "sk-guard-strict-real-03", "name": "guard-strict",
                        "guardrails": "strict"},
    "vk_guard_none": {"provider": "openai", "api_key": "sk-guard-none-real-04", "name": "guard-none"},
}


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# chunk boundaries inside each matched part of ANSWER (every offset is the unit tests' job)
CUTS = [[ANSWER.index(AWS_ID) + 3, ANSWER.index(CARD) + 7, ANSWER.index(EMAIL) + 5],
        [ANSWER.index(AWS_ID) + 17, ANSWER.index(CARD) + 1, ANSWER.index(EMAIL) + 12, ANSWER.index(EMAIL) + 20]]


class Provider:
    """Answers each API with ANSWER, streams cut at `cuts`."""

    def __init__(self) -> None:
        self.cuts = CUTS[0]

    def __call__(self, req: Received) -> Reply:
        body = req.json()
        pieces = split(ANSWER, self.cuts)
        if req.path.endswith("/embeddings"):
            return Reply.json({"object": "list", "model": body["model"],
                               "usage": {"prompt_tokens": 3, "total_tokens": 3},
                               "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})
        if req.path.endswith("/messages"):
            if body.get("stream"):
                return Reply.sse(stream_events([text_block(*pieces), tool_block("t1", "note", '{"to": "',
                                                                                 EMAIL[:9], EMAIL[9:] + '"}')]))
            return Reply.json(anthropic_message([{"type": "text", "text": ANSWER}]))
        if req.path.endswith("/responses"):
            if body.get("stream"):
                return Reply.sse(response_stream(body, pieces))
            return Reply.json(response(body, ANSWER))
        if body.get("stream"):
            return Reply.sse(openai_stream(body, pieces))
        reply = openai_completion(body, ANSWER)
        reply["choices"][0]["message"]["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
            "name": "note", "arguments": json.dumps({"to": EMAIL})}}]
        return Reply.json(reply)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tmp_path_factory.mktemp("guardrails")


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def gateway(gateway_factory, provider_server, run, metrics_port):
    keys = {"providers": {"openai": {"base_url": provider_server.url + "/v1"},
                          "anthropic": {"base_url": provider_server.url + "/v1"}},
            "guardrails": SETS, "virtual_keys": KEYS}
    return gateway_factory(keys, ["--set", f"record_file={run / 'flows.mitm'}", "--set", f"usage_db={run / 'usage.db'}",
                                  "--set", "termlog_verbosity=debug", "--set", "flow_detail=4",
                                  "--set", f"metrics_port={metrics_port}"])


@pytest.fixture
def fake(provider):
    provider.handler = Provider()
    return provider


def sent(fake) -> dict:
    assert fake.wait_received(1)
    assert len(fake.received) == 1
    return fake.received[0].json()


def no_match_in(raw: bytes) -> None:
    for text in MATCHED:
        assert text.encode() not in raw, text


def oai(gateway, key="vk_guard_openai"):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20)


def claude(gateway, key="vk_guard_claude"):
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)


def test_chat_completions_plain(gateway, fake):
    raw = oai(gateway).chat.completions.with_raw_response.create(model="gpt-4o", messages=[
        {"role": "system", "content": f"the deploy key is {AWS_ID}"},
        {"role": "user", "content": [{"type": "text", "text": f"charge {CARD}"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "mail", "arguments": json.dumps({"to": EMAIL})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"token {JWT}"}])
    body = sent(fake)
    assert body["messages"][0]["content"] == "the deploy key is [REDACTED:secrets]"
    assert body["messages"][1]["content"][0]["text"] == "charge [REDACTED:credit_cards]"
    assert json.loads(body["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"to": "[REDACTED:emails]"}
    assert body["messages"][3]["content"] == "token [REDACTED:secrets]"
    no_match_in(fake.received[0].body)
    assert raw.headers["x-gateway-guardrails"] == "masked=credit_cards:1,emails:1,secrets:2"
    message = raw.parse().choices[0].message
    assert message.content == MASKED_ANSWER
    assert json.loads(message.tool_calls[0].function.arguments) == {"to": "[REDACTED:emails]"}


@pytest.mark.parametrize("cuts", CUTS)
def test_chat_completions_streamed(gateway, fake, cuts):
    fake.handler.cuts = cuts
    stream = oai(gateway).chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": f"key {AWS_ID}"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert sent(fake)["messages"][0]["content"] == "key [REDACTED:secrets]"
    assert text == MASKED_ANSWER


def test_anthropic_messages_plain_and_streamed(gateway, fake):
    message = claude(gateway).messages.create(model="claude-sonnet-4-6", max_tokens=50, system=f"key {AWS_ID}",
                                              messages=[{"role": "user", "content": [
                                                  {"type": "text", "text": f"mail {EMAIL}"},
                                                  {"type": "document", "source": {"type": "text",
                                                                                  "media_type": "text/plain",
                                                                                  "data": f"card {CARD}"}}]}])
    body = sent(fake)
    assert body["system"] == "key [REDACTED:secrets]"
    assert body["messages"][0]["content"][0]["text"] == "mail [REDACTED:emails]"
    assert body["messages"][0]["content"][1]["source"]["data"] == "card [REDACTED:credit_cards]"
    assert message.content[0].text == MASKED_ANSWER
    fake.reset(Provider())
    for cuts in CUTS:
        fake.handler.cuts = cuts
        with claude(gateway).messages.stream(model="claude-sonnet-4-6", max_tokens=50,
                                             messages=[{"role": "user", "content": "hi"}]) as stream:
            final = stream.get_final_message()
        assert final.content[0].text == MASKED_ANSWER
        assert final.content[1].input == {"to": "[REDACTED:emails]"}  # tool input deltas too


def test_anthropic_messages_translated_for_an_openai_key(gateway, fake):
    """An Anthropic client on an OpenAI key: masked in the client's shape before translation."""
    message = claude(gateway, "vk_guard_openai").messages.create(
        model="gpt-4o", max_tokens=50, messages=[{"role": "user", "content": f"key {AWS_ID}"}])
    assert sent(fake)["messages"][-1]["content"] == "key [REDACTED:secrets]"
    assert message.content[0].text == MASKED_ANSWER


def test_responses_plain_and_streamed(gateway, fake):
    got = oai(gateway).responses.create(model="gpt-4.1", instructions=f"key {AWS_ID}", input=[
        {"role": "user", "content": [{"type": "input_text", "text": f"card {CARD}"}]},
        {"type": "function_call_output", "call_id": "c1", "output": f"sent to {EMAIL}"}])
    body = sent(fake)
    assert body["instructions"] == "key [REDACTED:secrets]"
    assert body["input"][0]["content"][0]["text"] == "card [REDACTED:credit_cards]"
    assert body["input"][1]["output"] == "sent to [REDACTED:emails]"
    assert got.output_text == MASKED_ANSWER
    for cuts in CUTS:
        fake.reset(Provider())
        fake.handler.cuts = cuts
        events = list(oai(gateway).responses.create(model="gpt-4.1", input="hi", stream=True))
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == MASKED_ANSWER
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[-1].response.output_text == MASKED_ANSWER


def test_embeddings_input(gateway, fake):
    oai(gateway).embeddings.create(model="text-embedding-3-small", input=[f"key {AWS_ID}", "plain"])
    assert sent(fake)["input"] == ["key [REDACTED:secrets]", "plain"]


BLOCKED = [{"role": "user", "content": "hi"},
           {"role": "user", "content": [{"type": "text", "text": "x"},
                                        {"type": "text", "text": f"see ACME-123456 {CARD}"}]}]


@pytest.mark.parametrize("path, headers, body, shape", [
    ("/v1/chat/completions", {"authorization": "Bearer vk_guard_strict"}, {"model": "gpt-4o", "messages": BLOCKED},
     "openai"),
    ("/v1/messages", {"x-api-key": "vk_guard_strict", "anthropic-version": "2023-06-01"},
     {"model": "gpt-4o", "max_tokens": 5, "messages": BLOCKED}, "anthropic"),
])
def test_block_never_forwards_and_names_where_without_the_text(gateway, fake, path, headers, body, shape):
    got = rawhttp.request(gateway.url, "POST", path, json=body, headers=headers)
    assert got.status_code == 400
    assert got.headers["x-gateway-guardrails"] == "blocked=credit_cards,ticket"
    error = got.json()["error"]
    if shape == "openai":
        assert error["code"] == "content_blocked"
    else:
        assert got.json()["type"] == "error" and error["type"] == "invalid_request_error"
    assert "credit_cards, ticket in messages[1].content[1].text" in error["message"]
    no_match_in(got.content)
    assert b"ACME-123456" not in got.content
    time.sleep(0.3)
    assert fake.received == []


def test_a_key_without_guardrails_is_untouched(gateway, provider):
    other = "AKIA" + "ZZZZYYYYXXXXWWWW"  # (not one the search below looks for)
    oai(gateway, "vk_guard_none").chat.completions.create(model="gpt-4o", messages=[
        {"role": "user", "content": f"key {other}"}])
    assert sent(provider)["messages"][0]["content"] == f"key {other}"  # (the control: the fake can see one)


def test_counts_are_in_the_access_line_the_ledger_the_metrics_and_the_flow_view(gateway, fake, run, metrics_port):
    oai(gateway).chat.completions.create(model="gpt-4o", messages=[
        {"role": "user", "content": f"x {AWS_ID} y {EMAIL}"}])
    sent(fake)
    deadline = time.time() + 10
    while time.time() < deadline and "guardrails=emails:1,secrets:1 guardrails_answer=" not in gateway.log():
        time.sleep(0.1)
    assert re.search(r"200 key=guard-openai provider=openai model=gpt-4o .*guardrails=emails:1,secrets:1 "
                     r"guardrails_answer=credit_cards:1,emails:2,secrets:1 ", gateway.log())
    assert re.search(r"400 content_blocked key=guard-strict .*guardrails_blocked=credit_cards,ticket", gateway.log())
    db = sqlite3.connect(run / "usage.db")
    try:
        values = [row[0] for row in db.execute("SELECT guardrails FROM usage WHERE key_name = 'guard-openai'")]
    finally:
        db.close()
    assert "masked=emails:1,secrets:1;answer=credit_cards:1,emails:2,secrets:1" in values
    found = scrape_until(metrics_port, lambda s: value(s, "gateway_guardrails_total", action="masked") > 0)
    assert value(found, "gateway_guardrails_total", action="masked", detector="secrets") >= 1
    assert value(found, "gateway_guardrails_total", action="blocked", detector="ticket") >= 1
    assert value(found, "gateway_guardrails_total", action="answer_masked", detector="credit_cards") >= 1
    # mitmweb's gateway view of the recorded flow says where
    from mitmproxy import io
    from addon.web.contentview import summary

    with open(run / "flows.mitm", "rb") as f:
        flows = [fl for fl in io.FlowReader(f).stream() if fl.comment and "guard-openai" in fl.comment]
    view = summary(flows[-1])
    assert "Guardrails (default):" in view and "masked in the request: 1 emails, 1 secrets" in view
    assert "at messages[0].content" in view and "masked in the answer:" in view


def test_nothing_matched_is_anywhere_the_run_wrote(gateway, fake, run, metrics_port):
    """Last in this module: every test above sent and received matched text through guarded
    keys, blocked ones included, and the log printed every flow whole (flow_detail=4)."""
    oai(gateway).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"x {AWS_ID}"}])
    sent(fake)
    deadline = time.time() + 10
    while time.time() < deadline and b"guard-openai" not in (run / "flows.mitm").read_bytes():
        time.sleep(0.1)
    log = gateway.log().encode()
    (run / "gateway.log").write_bytes(log)  # (kept with the run's other files, for a failure's reader)
    assert b"guardrails default masked=secrets:1" in log  # (the search reads the real log)
    flows = (run / "flows.mitm").read_bytes()
    db = sqlite3.connect(run / "usage.db")
    ledger = "\n".join(repr(row) for row in db.execute("SELECT * FROM usage")).encode()
    db.close()
    metrics = scrape_until(metrics_port, lambda s: True)
    assert b"blocked=credit_cards,ticket" in log and len(flows) > 10_000
    for name, raw in (("log", log), ("flows", flows), ("ledger", ledger), ("metrics", repr(metrics).encode())):
        for text in (*MATCHED, "ACME-123456"):
            assert text.encode() not in raw, (name, text)
