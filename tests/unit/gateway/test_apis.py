"""The inbound-API seam: the route table, errors shaped by the endpoint, the mapping tables in
both directions, and a third API added as a module (registered in the tables) without touching
Gateway.route."""

from __future__ import annotations

import json

import pytest

from addon.hooks.patches import wirekeys
from mitmproxy import http
from mitmproxy.test import tutils

from addon.routing import routes as routes_module
from addon.apis import registry as api_registry
from addon.apis.openai_chat import OPENAI_CHAT
from addon.apis.registry import APIS, DEFAULT_API, ENDPOINTS, api_for_path
from addon.routing.routes import ROUTES
from addon.providers.catalog import CATALOG
from addon.providers.registry import PROVIDERS
from addon.translate.base import UpstreamRequest
from addon.translate.passthrough import Passthrough
from addon.translate.registry import PAIRS
from addon.apis.anthropic_messages import ERROR_STATUSES
from addon.translate.tables import ERROR_TYPES, FINISH_REASONS, ROLES, TOOL_CHOICES
from addon.wire.tokens import StreamUsage, usage_from_body
from addon.wire.errors import GatewayError
from tests.unit.gateway.test_gateway import REAL, flow, gw  # noqa: F401 (fixture)


# --- tables -----------------------------------------------------------------------------------

def test_every_endpoint_has_one_api_and_every_provider_a_route():
    assert ENDPOINTS["/v1/chat/completions"] is OPENAI_CHAT and ENDPOINTS["/chat/completions"] is OPENAI_CHAT
    assert set(PROVIDERS) == set(CATALOG)
    for name, provider in PROVIDERS.items():
        assert provider.api == CATALOG[name].api
        route = ROUTES["openai_chat"][name]
        assert route.provider is provider and route.pair is PAIRS[("openai_chat", provider.api)]


def test_api_for_path_ignores_the_query_and_defaults_to_openai():
    assert api_for_path("/v1/chat/completions?x=1") is OPENAI_CHAT
    assert api_for_path("/nowhere") is DEFAULT_API


@pytest.mark.parametrize("table", [FINISH_REASONS, ERROR_TYPES, ERROR_STATUSES, ROLES, TOOL_CHOICES])
def test_mapping_tables_serve_both_directions(table):
    rows = set(table.rows)
    for a, b in table.rows:
        # each direction answers with a row of the one table: the first that names the value
        assert (a, table.forward(a)) in rows and (table.reverse(b), b) in rows
        assert table.forward(a) == next(y for x, y in table.rows if x == a)
        assert table.reverse(b) == next(x for x, y in table.rows if y == b)


def test_mapping_table_details():
    assert FINISH_REASONS.forward("tool_use") == "tool_calls" and FINISH_REASONS.reverse("tool_calls") == "tool_use"
    assert FINISH_REASONS.forward("stop_sequence") == "stop" and FINISH_REASONS.reverse("stop") == "end_turn"
    assert FINISH_REASONS.forward("never-heard-of") == "stop" and FINISH_REASONS.reverse(None) == "end_turn"
    assert ERROR_TYPES.forward("rate_limit_error") == "rate_limit_exceeded"
    assert ERROR_TYPES.reverse("rate_limit_exceeded") == "rate_limit_error"
    assert ERROR_STATUSES.reverse(529) == "overloaded_error" and ERROR_STATUSES.reverse(418) == "api_error"
    assert ROLES.reverse("tool") == "user" and ROLES.forward("assistant") == "assistant"
    assert TOOL_CHOICES.reverse("required") == "any" and TOOL_CHOICES.forward("any") == "required"


# --- errors take the endpoint's shape --------------------------------------------------------


def test_gateway_answers_use_the_endpoints_error_shape(gw):  # noqa: F811
    f = flow(headers={"authorization": None})
    gw.request(f)
    assert f.response.status_code == 401
    assert json.loads(f.response.content)["error"]["code"] == "missing_api_key"  # OpenAI's shape
    f = flow(path="/nowhere")
    gw.request(f)
    assert (
        f.response.status_code == 404
        and "POST /v1/chat/completions" in json.loads(f.response.content)["error"]["message"]
    )


# --- a third API is a module plus table rows --------------------------------------------------


class ToyAPI:
    """A made-up inbound API with its own error shape: {"problem": ...}."""

    name = "toy"
    paths = frozenset({"/v1/toy"})
    methods = frozenset({"PUT"})
    usage_in_stream = True

    def parse_request(self, raw: bytes) -> dict:
        body = json.loads(raw)
        if "model" not in body:
            raise GatewayError(400, "toy needs a model")
        return body

    def prepare_usage(self, body, raw):
        return None, True

    def error_body(self, error: GatewayError) -> bytes:
        return json.dumps({"problem": error.message, "status": error.status}).encode()

    def is_error(self, body: bytes) -> bool:
        return body.startswith(b'{"problem"')

    def foreign_error(self, status: int, body: bytes) -> bytes:
        return json.dumps({"problem": body.decode(), "status": status}).encode()

    def stream_error(self, message: str) -> list[bytes]:
        return [b"event: problem\n\n"]

    def usage_from_body(self, body):
        return usage_from_body(body)

    def stream_usage(self, strip):
        return StreamUsage(strip)


class ToyToOpenAI:
    def prepare(self, request: dict):
        body = json.dumps(
            {"model": request["model"], "messages": [{"role": "user", "content": request["say"]}]}
        ).encode()
        return UpstreamRequest({"x-toy": "1"}, body), Passthrough(ToyAPI()).exchange


@pytest.fixture
def toy(monkeypatch):
    api = ToyAPI()
    monkeypatch.setitem(APIS, api.name, api)
    monkeypatch.setitem(ENDPOINTS, "/v1/toy", api)
    monkeypatch.setitem(PAIRS, ("toy", "openai_chat"), ToyToOpenAI())
    # what routing/routes.py builds at import from the three tables above
    monkeypatch.setitem(ROUTES, "toy", {"openai": routes_module.build_route("toy", PROVIDERS["openai"])})
    assert api_registry.api_for_path("/v1/toy") is api
    return api


def test_a_third_api_routes_through_the_tables(gw, toy):  # noqa: F811
    f = flow(path="/v1/toy", method="PUT", body={"model": "gpt-4o", "say": "hello"})
    gw.request(f)
    assert f.response is None
    assert f.request.url == "http://127.0.0.1:9001/v1/chat/completions"
    wire = dict(wirekeys.on_the_wire(f.request.headers.fields, ("127.0.0.1", 9001)))  # the key is put in on the wire
    assert wire[b"authorization"] == f"Bearer {REAL}".encode() and f.request.headers["x-toy"] == "1"
    assert json.loads(f.request.content)["messages"][0]["content"] == "hello"
    assert f.metadata["gateway"].api == "toy"
    f.response = tutils.tresp(status_code=503, content=b"down", headers=http.Headers(content_type="text/plain"))
    gw.responseheaders(f)
    gw.response(f)
    assert json.loads(f.response.content) == {"problem": "down", "status": 503}  # the toy's shape


def test_a_third_api_gets_its_own_error_shape_and_methods(gw, toy):  # noqa: F811
    f = flow(path="/v1/toy", method="POST", body={"model": "m"})
    gw.request(f)
    assert f.response.status_code == 405 and f.response.headers["allow"] == "PUT"
    assert json.loads(f.response.content)["problem"].startswith("method POST not allowed")
    f = flow(path="/v1/toy", method="PUT", body={"model": "m"}, headers={"authorization": "Bearer vk_nope"})
    gw.request(f)
    assert f.response.status_code == 401 and json.loads(f.response.content) == {
        "problem": "invalid virtual key",
        "status": 401,
    }
    f = flow(path="/v1/toy", method="PUT", body={"say": "x"})
    gw.request(f)
    assert json.loads(f.response.content) == {"problem": "toy needs a model", "status": 400}


def test_a_provider_without_a_pair_for_the_api_is_refused(gw, toy):  # noqa: F811
    f = flow(path="/v1/toy", method="PUT", body={"model": "m", "say": "x"}, headers={"authorization": "Bearer vk_d"})
    gw.request(f)
    assert f.response.status_code == 400
    assert (
        json.loads(f.response.content)["problem"]
        == "/v1/toy is not available for this virtual key's provider (deepseek)"
    )
    assert f.request.port == 8080  # nothing forwarded: shown at the gateway's own address


# --- the Messages API's routes -----------------------------------------------------------------


@pytest.fixture
def messages_gw(tmp_path):
    from mitmproxy.test import taddons

    from addon.hooks.gateway import Gateway
    keys = {"virtual_keys": {
        "vk_ds_anthropic": {"provider": "deepseek-anthropic", "api_key": "sk-ds-real-000001", "name": "ds-a"},
        "vk_ds": {"provider": "deepseek", "api_key": "sk-ds-real-000002", "name": "ds"}}}
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, keys_file=str(path))
        yield addon


def test_deepseek_anthropic_passes_messages_through_and_deepseek_translates(messages_gw):
    body = {"model": "deepseek-chat", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    f = flow(path="/v1/messages?beta=true", body=body, headers={"authorization": None, "x-api-key": "vk_ds_anthropic",
                                                                "anthropic-version": "2023-06-01"})
    messages_gw.request(f)
    assert f.response is None
    assert f.request.url == "https://api.deepseek.com/anthropic/v1/messages?beta=true"
    wire = dict(
        wirekeys.on_the_wire(f.request.headers.fields, ("api.deepseek.com", 443))
    )  # the key goes in on the wire
    assert wire[b"x-api-key"] == b"sk-ds-real-000001" and "authorization" not in f.request.headers
    assert json.loads(f.request.content) == body and f.request.headers["anthropic-version"] == "2023-06-01"
    f = flow(
        path="/v1/messages/count_tokens", body=body, headers={"authorization": None, "x-api-key": "vk_ds_anthropic"}
    )
    messages_gw.request(f)
    assert f.request.url == "https://api.deepseek.com/anthropic/v1/messages/count_tokens"
    f = flow(path="/v1/messages?beta=true", body=body, headers={"authorization": "Bearer vk_ds"})
    messages_gw.request(f)
    assert f.request.url == "https://api.deepseek.com/chat/completions"  # translated; the query is Anthropic's
    assert (
        dict(wirekeys.on_the_wire(f.request.headers.fields, ("api.deepseek.com", 443)))[b"authorization"]
        == b"Bearer sk-ds-real-000002"
    )
    assert json.loads(f.request.content)["messages"] == [{"role": "user", "content": "hi"}]
