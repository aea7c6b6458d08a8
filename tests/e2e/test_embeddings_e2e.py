"""End to end: client.embeddings.create (official openai SDK) -> real gateway -> fake provider.
Passthrough for providers that serve embeddings, a 400 naming the provider for those that do
not, key policy and budgets priced with `input` only, the ledger's prompt tokens; and the other
OpenAI paths (files, images, audio, batches) stay a JSON 404, never forwarded."""

from __future__ import annotations

import base64
import json
import struct

import openai
import pytest

from tests import rawhttp
from tests.e2e.test_providers_e2e import rows_where
from tests.fakeprovider import Reply, default_reply

pytestmark = pytest.mark.e2e

REAL = "sk-embed-real-key-5555eeee"
VECTOR = [0.25, -0.5, 1.0]
PRICE_INPUT = 0.02  # USD per 1M tokens


def embeddings_reply(req):
    if not req.path.split("?")[0].endswith("/embeddings"):
        return default_reply(req)
    body = req.json()
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    if body.get("encoding_format") == "base64":
        vec = base64.b64encode(struct.pack(f"<{len(VECTOR)}f", *VECTOR)).decode()
    else:
        vec = VECTOR
    return Reply.json({"object": "list", "model": body["model"],
                       "data": [{"object": "embedding", "index": i, "embedding": vec} for i in range(len(inputs))],
                       "usage": {"prompt_tokens": 4 * len(inputs), "total_tokens": 4 * len(inputs)}})


@pytest.fixture
def embedder(provider):
    provider.handler = embeddings_reply
    return provider


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings") / "usage.sqlite3"


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory, ledger):
    url = provider_server.url
    return gateway_factory({
        "providers": {"openai": {"base_url": url + "/v1"}, "mistral": {"base_url": url + "/mistral"},
                      "anthropic": {"base_url": url + "/anthropic"}, "deepseek": {"base_url": url + "/ds"}},
        "prices": {"text-embedding-3-small": {"input": PRICE_INPUT, "output": 1000.0}},
        "virtual_keys": {
            "vk_embed": {"provider": "openai", "api_key": REAL, "name": "embedder"},
            "vk_mistral": {"provider": "mistral", "api_key": REAL, "name": "mistral"},
            "vk_azure": {"provider": "azure", "api_key": REAL, "endpoint": url + "/az", "api_version": "2024-10-21",
                         "deployments": {"text-embedding-3-small": "embed-small"}, "name": "azure"},
            "vk_anthropic": {"provider": "anthropic", "api_key": REAL, "name": "claude"},
            "vk_deepseek": {"provider": "deepseek", "api_key": REAL, "name": "deepseek"},
            "vk_limited": {"provider": "openai", "api_key": REAL, "name": "limited",
                           "models": ["text-embedding-3-small"], "budget_tokens": 100},
        },
    }, ["--set", f"usage_db={ledger}"])


def client(gateway, key="vk_embed"):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_pass_through_in_both_encodings(gateway, embedder, encoding):
    resp = client(gateway).embeddings.create(model="text-embedding-3-small", input=["a", "b"], encoding_format=encoding)
    if encoding == "base64":  # asked for explicitly, the SDK hands the string on as it came
        assert [list(struct.unpack("<3f", base64.b64decode(d.embedding))) for d in resp.data] == [VECTOR, VECTOR]
    else:
        assert [list(d.embedding) for d in resp.data] == [VECTOR, VECTOR]
    assert resp.usage.prompt_tokens == 8
    [got] = embedder.received
    assert (got.method, got.path) == ("POST", "/v1/embeddings")
    assert got.headers["authorization"] == f"Bearer {REAL}"
    assert got.json() == {"model": "text-embedding-3-small", "input": ["a", "b"], "encoding_format": encoding}


def test_the_sdks_default_encoding_is_base64_and_decoded(gateway, embedder):
    resp = client(gateway).embeddings.create(model="text-embedding-3-small", input="hello")
    assert list(resp.data[0].embedding) == VECTOR
    assert embedder.received[0].json()["encoding_format"] == "base64"


def test_ledger_counts_prompt_tokens_priced_as_input(gateway, embedder, ledger):
    client(gateway, "vk_mistral").embeddings.create(
        model="text-embedding-3-small", input=["x", "y", "z"], encoding_format="float"
    )
    assert embedder.received[0].path == "/mistral/embeddings"
    [row] = rows_where(ledger, "key_name", {"mistral"})
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"], row["streamed"]) == (12, 0, 200, 0)
    assert row["cost_usd"] == pytest.approx(12 * PRICE_INPUT / 1e6)


def test_azure_embeddings_use_the_deployment_url(gateway, embedder):
    client(gateway, "vk_azure").embeddings.create(model="text-embedding-3-small", input="x", encoding_format="float")
    [got] = embedder.received
    assert got.path == "/az/openai/deployments/embed-small/embeddings?api-version=2024-10-21"
    assert got.headers["api-key"] == REAL


@pytest.mark.parametrize("key, provider_name", [("vk_anthropic", "anthropic"), ("vk_deepseek", "deepseek")])
def test_providers_without_embeddings_get_a_400_naming_them(gateway, embedder, key, provider_name):
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway, key).embeddings.create(model="text-embedding-3-small", input="x")
    assert e.value.body["code"] == "unsupported_endpoint" and provider_name in e.value.body["message"]
    assert embedder.received == []


def test_key_policy_applies_models_and_budget(gateway, embedder):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(gateway, "vk_limited").embeddings.create(model="text-embedding-3-large", input="x")
    assert e.value.body["code"] == "model_not_allowed"
    client(gateway, "vk_limited").embeddings.create(
        model="text-embedding-3-small", input=["a", "b"]
    )  # 8 of 100 tokens; each request reserves its body size
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(50):  # the budget sees the usage once the flow is counted (at once, or a moment later)
            client(gateway, "vk_limited").embeddings.create(model="text-embedding-3-small", input="a")
    assert e.value.body["code"] == "budget_exceeded"
    assert len(embedder.received) < 50


@pytest.mark.parametrize("body, code", [
    ({"model": "text-embedding-3-small"}, "missing_input"),
    ({"input": "x"}, "missing_model"),
    ({"model": "m", "input": "x", "encoding_format": "int8"}, "invalid_value"),
    ({"model": "m", "input": "x", "stream": True}, "invalid_value"),
])
def test_bad_requests_are_openai_shaped_400s_never_forwarded(gateway, embedder, body, code):
    r = rawhttp.request(gateway.url, "POST", "/v1/embeddings", content=json.dumps(body).encode(),
                        headers={"authorization": "Bearer vk_embed", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == code
    assert embedder.received == []


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/files"), ("GET", "/v1/files/file-abc"), ("POST", "/v1/images/generations"),
    ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/speech"), ("POST", "/v1/batches"),
    ("GET", "/v1/batches/batch_1"), ("POST", "/v1/moderations"),
])
def test_other_openai_paths_are_a_json_404_never_forwarded(gateway, embedder, method, path):
    r = rawhttp.request(gateway.url, method, path, content=b"{}", headers={"authorization": "Bearer vk_embed"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_path"
    assert embedder.received == []
