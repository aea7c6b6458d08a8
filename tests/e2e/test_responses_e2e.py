"""End to end: client.responses (official openai SDK) -> real gateway -> fake provider.
POST /v1/responses plain and streamed (response.* events chunk by chunk), usage from the body
and from response.completed into the ledger, the stored-response paths (GET, DELETE,
input_items) for the same key, other providers a 400, bad requests never forwarded."""

from __future__ import annotations

import threading

import openai
import pytest

from tests import rawhttp
from tests.fakeprovider import Reply
from tests.fakeresponses import USAGE, StoredResponses, response, response_stream
from tests.e2e.test_providers_e2e import rows_where
from tests.e2e.test_policy_e2e import ledger_rows, wait_for

pytestmark = pytest.mark.e2e

REAL = "sk-responses-real-key-7777rrrr"
PRICE = {"input": 1.0, "output": 4.0, "cached_input": 0.5}


@pytest.fixture
def fake(provider):
    provider.handler = StoredResponses()
    return provider


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    return tmp_path_factory.mktemp("responses") / "usage.sqlite3"


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory, ledger):
    url = provider_server.url
    return gateway_factory({
        "providers": {"openai": {"base_url": url + "/v1"}, "anthropic": {"base_url": url + "/anthropic"},
                      "groq": {"base_url": url + "/groq"}},
        "prices": {"gpt-4.1": PRICE},
        "virtual_keys": {
            "vk_resp": {"provider": "openai", "api_key": REAL, "name": "resp"},
            "vk_resp_stream": {"provider": "openai", "api_key": REAL, "name": "resp-stream"},
            "vk_azure": {"provider": "azure", "api_key": REAL, "endpoint": url + "/az", "name": "azure",
                         "api_version": "2024-10-21", "deployment": "chat-dep"},
            "vk_claude": {"provider": "anthropic", "api_key": REAL, "name": "claude"},
            "vk_groq": {"provider": "groq", "api_key": REAL, "name": "groq"},
            "vk_mini_only": {"provider": "openai", "api_key": REAL, "name": "mini-only", "models": ["gpt-4.1-mini"]},
        },
    }, ["--set", f"usage_db={ledger}"])


def client(gateway, key="vk_resp"):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def test_plain_response_passes_through_and_is_counted(gateway, fake, ledger):
    resp = client(gateway).responses.create(model="gpt-4.1", input="hi", instructions="be brief")
    assert resp.output_text == "hello" and resp.id == "resp_fake1"
    [got] = fake.received
    assert (got.method, got.path) == ("POST", "/v1/responses")
    assert got.headers["authorization"] == f"Bearer {REAL}"
    assert got.json() == {"model": "gpt-4.1", "input": "hi", "instructions": "be brief"}
    [row] = rows_where(ledger, "key_name", {"resp"})
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["streamed"]) == (9, 3, 4, 0)
    assert row["cost_usd"] == pytest.approx((5 * 1.0 + 4 * 0.5 + 3 * 4.0) / 1e6)


def test_streamed_response_events_arrive_chunk_by_chunk_and_usage_is_read(gateway, fake, ledger):
    first_seen = threading.Event()
    fake.handler = lambda req: Reply.sse(
        response_stream(req.json(), pieces=("a", "b", "c")), hold_after_first=first_seen
    )
    events = []
    for event in client(gateway, "vk_resp_stream").responses.create(model="gpt-4.1", input="hi", stream=True):
        first_seen.set()  # the provider sends the rest only once the client saw the first event
        events.append(event)
    assert fake.holds_released == [True], "the gateway held the first event back"
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "abc"
    assert events[-1].response.usage.input_tokens == USAGE["input_tokens"]
    body = fake.received[0].json()
    assert "stream_options" not in body, "the Responses stream reports usage itself: nothing added"
    assert fake.received[0].headers["accept-encoding"] == "identity"
    [row] = rows_where(ledger, "key_name", {"resp-stream"})
    assert (
        row["prompt_tokens"],
        row["completion_tokens"],
        row["cached_tokens"],
        row["streamed"],
        row["estimated"],
    ) == (9, 3, 4, 1, 0)


def test_stored_response_paths_pass_through_for_the_same_key(gateway, fake, ledger):
    oa = client(gateway)
    created = oa.responses.create(model="gpt-4.1", input="hi")
    again = oa.responses.retrieve(created.id)
    assert again.id == created.id and again.output_text == "hello"
    items = oa.responses.input_items.list(created.id, limit=5)
    assert items.data[0].content[0].text == "hi"
    oa.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(created.id)
    paths = [(r.method, r.path) for r in fake.received]
    assert paths == [("POST", "/v1/responses"), ("GET", f"/v1/responses/{created.id}"),
                     ("GET", f"/v1/responses/{created.id}/input_items?limit=5"),
                     ("DELETE", f"/v1/responses/{created.id}"), ("GET", f"/v1/responses/{created.id}")]
    assert all(r.headers["authorization"] == f"Bearer {REAL}" for r in fake.received)
    # the retrieved response carries usage, but only its creation is charged
    wait_for(lambda: len([r for r in ledger_rows(ledger, 0, 0) if r["key_name"] == "resp"]) >= 6)
    rows = [r for r in ledger_rows(ledger, 0, 0) if r["key_name"] == "resp"]
    assert sum(r["prompt_tokens"] for r in rows) == 2 * 9, "two responses created in this module by vk_resp"


def test_azure_responses_use_the_v1_url(gateway, fake):
    created = client(gateway, "vk_azure").responses.create(model="chat-dep", input="hi")
    client(gateway, "vk_azure").responses.retrieve(created.id)
    assert [r.path for r in fake.received] == ["/az/openai/v1/responses", f"/az/openai/v1/responses/{created.id}"]
    assert all(r.headers["api-key"] == REAL for r in fake.received)


@pytest.mark.parametrize("key, name", [("vk_claude", "anthropic"), ("vk_groq", "groq")])
def test_other_providers_get_a_400_naming_them(gateway, fake, key, name):
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway, key).responses.create(model="m", input="hi")
    assert e.value.body["code"] == "unsupported_endpoint" and name in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client(gateway, key).responses.retrieve("resp_fake1")
    assert fake.received == []


def test_policy_applies(gateway, fake):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(gateway, "vk_mini_only").responses.create(model="gpt-4.1", input="hi")
    assert e.value.body["code"] == "model_not_allowed"
    assert fake.received == []


@pytest.mark.parametrize("method, path, status, code", [
    ("POST", "/v1/responses/resp_abc", 405, "method_not_allowed"),
    ("DELETE", "/v1/responses/resp_abc/input_items", 405, "method_not_allowed"),
    ("GET", "/v1/responses/not-a-response-id", 404, "unknown_path"),
    ("GET", "/v1/responses/resp_abc/../../files", 404, "unknown_path"),
    ("GET", "/v1/responses/resp_abc/cancel", 405, "method_not_allowed"),
    ("GET", "/v1/responses", 405, "method_not_allowed"),
])
def test_paths_the_gateway_does_not_serve_are_never_forwarded(gateway, fake, method, path, status, code):
    r = rawhttp.request(gateway.url, method, path, content=b"{}" if method == "POST" else None,
                        headers={"authorization": "Bearer vk_resp"})
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert fake.received == []


def test_bad_bodies_are_openai_shaped_400s(gateway, fake):
    for body, code in (
        (b"{", "invalid_json"),
        (b'{"input": "hi"}', "missing_model"),
        (b'{"model": "m", "stream": "yes"}', "invalid_value"),
    ):
        r = rawhttp.request(
            gateway.url, "POST", "/v1/responses", content=body, headers={"authorization": "Bearer vk_resp"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == code
    assert fake.received == []


# --- stored responses belong to the virtual key that created them (policy/owners.py) ----------

def other_key_is_refused(call, rid: str, param: str | None = None):
    with pytest.raises(openai.NotFoundError) as e:
        call()
    noun = "Previous response" if param else "Response"
    assert e.value.body == {"message": f"{noun} with id '{rid}' not found.", "type": "invalid_request_error",
                            "param": param, "code": None}
    assert e.value.response.headers["x-gateway-error-source"] == "gateway"


def test_another_key_on_the_same_provider_key_cannot_reach_a_stored_response(gateway, fake):
    """vk_resp and vk_resp_stream share one provider key: OpenAI alone would let either read,
    delete or continue the other's responses."""
    owner, other = client(gateway, "vk_resp"), client(gateway, "vk_resp_stream")
    created = owner.responses.create(model="gpt-4.1", input="secret plans")
    fake.received.clear()
    other_key_is_refused(lambda: other.responses.retrieve(created.id), created.id)
    other_key_is_refused(lambda: other.responses.input_items.list(created.id), created.id)
    other_key_is_refused(lambda: other.responses.delete(created.id), created.id)
    other_key_is_refused(lambda: other.responses.create(model="gpt-4.1", input="and?", previous_response_id=created.id),
                         created.id, "previous_response_id")
    # an id nobody made through the gateway is nobody's: the same answer, for the owner too
    other_key_is_refused(lambda: owner.responses.retrieve("resp_made_elsewhere"), "resp_made_elsewhere")
    with pytest.raises(openai.NotFoundError) as e:
        owner.responses.create(model="gpt-4.1", input="x", conversation="conv_made_elsewhere")
    assert e.value.body["param"] == "conversation"
    assert fake.received == [], "nothing was forwarded"
    # the owner keeps every use of it
    assert owner.responses.retrieve(created.id).output_text == "hello"
    owner.responses.create(model="gpt-4.1", input="and?", previous_response_id=created.id)
    owner.responses.delete(created.id)
    assert [(r.method, r.path) for r in fake.received] == [
        ("GET", f"/v1/responses/{created.id}"), ("POST", "/v1/responses"), ("DELETE", f"/v1/responses/{created.id}")]
    assert fake.received[1].json()["previous_response_id"] == created.id


def test_a_streamed_response_is_its_keys_from_the_first_event(gateway, fake):
    """The id is recorded from `response.created`: the creating key can poll it while the
    provider is still streaming; another key cannot, then or after."""
    stored = fake.handler
    first_seen = threading.Event()

    def handler(req):
        reply = stored(req)
        if req.method == "POST" and req.json().get("stream"):
            reply.hold_after_first = first_seen
        return reply

    fake.handler = handler
    owner, other = client(gateway, "vk_resp_stream"), client(gateway, "vk_resp")
    events = owner.responses.create(model="gpt-4.1", input="hi", stream=True)
    first = next(iter(events))
    assert first.type == "response.created"
    polled = owner.responses.retrieve(first.response.id)  # mid-stream, on another connection
    other_key_is_refused(lambda: other.responses.retrieve(first.response.id), first.response.id)
    first_seen.set()
    assert [e.type for e in events][-1] == "response.completed"
    assert polled.id == first.response.id
    other_key_is_refused(lambda: other.responses.retrieve(first.response.id), first.response.id)
    assert [(r.method, r.path) for r in fake.received] == [
        ("POST", "/v1/responses"),
        ("GET", f"/v1/responses/{polled.id}"),
    ]


def test_a_response_made_without_store_is_not_recorded(gateway, fake):
    fake.handler = lambda req: Reply.json({**response(req.json(), rid="resp_unstored"), "store": False})
    owner = client(gateway)
    assert owner.responses.create(model="gpt-4.1", input="hi", store=False).id == "resp_unstored"
    other_key_is_refused(lambda: owner.responses.retrieve("resp_unstored"), "resp_unstored")
    assert len(fake.received) == 1
