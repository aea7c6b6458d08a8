"""End to end, every named OpenAI-compatible provider and Azure: the official openai SDK -> one
real gateway -> one fake provider on 127.0.0.1, one virtual key per provider (each key's
base_url points at its own path prefix on the fake, so what each provider received is told
apart). The catalog's defaults (the real providers' URLs) are checked in tests/unit/providers/test_providers.py."""

from __future__ import annotations

import json
import time

import openai
import pytest

from addon.providers.catalog import CATALOG
from tests import rawhttp
from tests.fakeprovider import Reply, openai_stream
from tests.e2e.test_policy_e2e import ledger_rows

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]
# every OpenAI-compatible catalog line (anthropic translates, azure builds its own URLs: below)
NAMED = sorted(name for name, info in CATALOG.items() if info.api == "openai_chat" and name != "azure")
KEY_OPTIONAL = sorted(name for name in NAMED if CATALOG[name].key_optional)


def real_key(name: str) -> str:
    return f"sk-{name}-real-key-{len(name):04d}abcd"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    return tmp_path_factory.mktemp("providers") / "usage.sqlite3"


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory, ledger):
    url = provider_server.url
    keys = {f"vk_{name}": {"provider": name, "api_key": real_key(name), "base_url": f"{url}/{name}", "name": name}
            for name in NAMED}
    for name in KEY_OPTIONAL:  # a local server without a key: no auth header at all
        keys[f"vk_{name}_nokey"] = {"provider": name, "base_url": f"{url}/{name}", "name": f"{name}-nokey"}
    keys.update({
        # Azure's v1 form: the body's model names the deployment
        "vk_azure_v1": {"provider": "azure", "api_key": real_key("azure"), "endpoint": f"{url}/az1", "name": "az-v1"},
        # the deployment form, a model -> deployment map and a fallback deployment
        "vk_azure_dep": {"provider": "azure", "api_key": real_key("azure"), "endpoint": f"{url}/az2/",
                         "api_version": "2024-10-21", "deployments": {"gpt-4o": "prod-4o"}, "name": "az-dep"},
        # the providers.azure entry gives endpoint and api_version; the key only its deployment
        "vk_azure_entry": {"provider": "azure", "api_key": real_key("azure"), "deployment": "mini", "name": "az-entry"},
        "vk_azure_map_only": {"provider": "azure", "api_key": real_key("azure"), "deployments": {"gpt-4o": "prod-4o"},
                              "name": "az-map-only"},
    })
    return gateway_factory(
        {"providers": {"azure": {"endpoint": f"{url}/az3", "api_version": "2025-01-01"}}, "virtual_keys": keys},
        ["--set", f"usage_db={ledger}"],
    )


def client(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("name", NAMED)
def test_each_provider_gets_its_own_key_and_path(gateway, provider, name):
    resp = client(gateway, f"vk_{name}").chat.completions.create(model="some-model", messages=MESSAGES)
    assert resp.choices[0].message.content == "hello" and resp.usage.total_tokens == 7
    [got] = provider.received
    assert (got.method, got.path) == ("POST", f"/{name}/chat/completions")
    assert got.headers["authorization"] == f"Bearer {real_key(name)}"
    assert f"vk_{name}" not in json.dumps(got.headers)
    assert got.json() == {"model": "some-model", "messages": MESSAGES}


@pytest.mark.parametrize("name", KEY_OPTIONAL)
def test_a_local_server_without_a_key_gets_no_auth_header(gateway, provider, name):
    client(gateway, f"vk_{name}_nokey").chat.completions.create(model="llama3", messages=MESSAGES)
    [got] = provider.received
    assert got.path == f"/{name}/chat/completions"
    assert "authorization" not in got.headers and "api-key" not in got.headers


@pytest.mark.parametrize("name", NAMED)
def test_streams_ask_for_usage_only_where_the_provider_accepts_it(gateway, provider, name):
    stream = client(gateway, f"vk_{name}").chat.completions.create(model="m", messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    [got] = provider.received
    body = got.json()
    if CATALOG[name].stream_usage:
        assert body["stream_options"] == {"include_usage": True}
        assert all(c.usage is None for c in chunks), "usage the client did not ask for is hidden again"
    else:
        assert "stream_options" not in body, f"{name} rejects stream_options: never sent"


def no_usage_stream(req):
    return Reply.sse(openai_stream(req.json(), usage=False))


def test_a_clients_own_stream_options_are_not_sent_where_rejected(gateway, provider):
    stream = client(gateway, "vk_mistral").chat.completions.create(
        model="mistral-small", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    [got] = provider.received
    assert "stream_options" not in got.json()
    assert chunks[-1].usage.completion_tokens == 2, "the usage Mistral sends anyway reaches the client"


def test_stream_usage_is_counted_when_sent_and_estimated_when_not(gateway, provider, ledger):
    list(client(gateway, "vk_together").chat.completions.create(model="usage-sent", messages=MESSAGES, stream=True))
    provider.handler = no_usage_stream
    list(client(gateway, "vk_together").chat.completions.create(model="usage-unknown", messages=MESSAGES, stream=True))
    rows = {r["model"]: r for r in rows_where(ledger, "model", {"usage-sent", "usage-unknown"})}
    sent, unknown = rows["usage-sent"], rows["usage-unknown"]
    assert (sent["prompt_tokens"], sent["completion_tokens"], sent["estimated"]) == (5, 2, 0)
    assert unknown["estimated"] == 1 and unknown["completion_tokens"] > 0, "no provider count: marked as an estimate"
    assert unknown["provider"] == "together"


def rows_where(ledger, column: str, values: set[str], timeout: float = 15.0) -> list[dict]:
    """The ledger rows whose `column` is one of `values`, once each value has one (the writer is
    asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in ledger_rows(ledger, 0, timeout=0) if r[column] in values]
        if {r[column] for r in rows} == values or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


# --- Azure ------------------------------------------------------------------------------------

def test_azure_v1_form(gateway, provider):
    client(gateway, "vk_azure_v1").chat.completions.create(model="my-deployment", messages=MESSAGES)
    [got] = provider.received
    assert got.path == "/az1/openai/v1/chat/completions"
    assert got.headers["api-key"] == real_key("azure")
    assert "authorization" not in got.headers


def test_azure_deployment_form_maps_the_model(gateway, provider):
    client(gateway, "vk_azure_dep").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    client(gateway, "vk_azure_entry").chat.completions.create(model="anything", messages=MESSAGES, stream=True)
    first, second = provider.received
    assert first.path == "/az2/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    assert second.path == "/az3/openai/deployments/mini/chat/completions?api-version=2025-01-01"
    assert second.json()["stream_options"] == {"include_usage": True}
    assert first.headers["api-key"] == second.headers["api-key"] == real_key("azure")


def test_azure_model_without_a_deployment_is_a_400_never_forwarded(gateway, provider):
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway, "vk_azure_map_only").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found" and "gpt-4o-mini" in e.value.body["message"]
    assert provider.received == []


def test_no_real_key_in_the_gateway_log(gateway):
    log = gateway.log()
    for name in [*NAMED, "azure"]:
        assert real_key(name) not in log


def test_a_translated_messages_stream_carries_no_stream_options_where_rejected(gateway, provider):
    """The Messages API in front, translated to chat for Mistral: the pair's body asks for stream
    usage; a provider that rejects the field never gets it."""
    r = rawhttp.request(gateway.url, "POST", "/v1/messages", json={
        "model": "mistral-small", "max_tokens": 32, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": "vk_mistral", "anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and b"message_stop" in r.content
    [got] = provider.received
    assert got.path == "/mistral/chat/completions" and "stream_options" not in got.json()
    assert got.json()["stream"] is True
