"""The provider table (providers/catalog.py) and the keys-file fields it brings: default URLs,
optional keys, Azure's endpoint/deployments/api_version and its two URL forms. Pure."""

from __future__ import annotations

import pytest

from addon.routing.routes import ROUTES
from addon.policy.keys_parse import KeysError, parse_keys
from addon.providers.azure import AzureTarget
from addon.providers.catalog import CATALOG, EMBEDDINGS, RESPONSES
from addon.providers.registry import PROVIDERS
from addon.wire.errors import GatewayError

# the providers' public OpenAI-compatible base URLs (their docs), as the catalog must say them
DEFAULTS = {
    "openai": "https://api.openai.com/v1",
    "deepseek": "https://api.deepseek.com",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
    "groq": "https://api.groq.com/openai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "xai": "https://api.x.ai/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "together": "https://api.together.xyz/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "ollama": "http://127.0.0.1:11434/v1",
}


def keys(entry: dict, providers: dict | None = None):
    return parse_keys({"providers": providers or {}, "virtual_keys": {"vk_test_key_1": entry}})


@pytest.mark.parametrize("name, url", sorted(DEFAULTS.items()))
def test_each_named_provider_defaults_to_its_public_url(name, url):
    key = keys({"provider": name, "api_key": "sk-real-key-123456"}).lookup("vk_test_key_1")
    assert key.upstream_url == url + "/chat/completions"
    assert ROUTES["openai_chat"][name].provider is PROVIDERS[name]


def test_openai_compatible_has_no_default_and_needs_base_url():
    with pytest.raises(KeysError, match="openai-compatible has no default URL: set \"base_url\""):
        keys({"provider": "openai-compatible", "api_key": "x"})
    key = keys({"provider": "openai-compatible"}, {"openai-compatible": {"base_url": "http://10.0.0.5:8000/v1/"}}).lookup("vk_test_key_1")
    assert key.upstream_url == "http://10.0.0.5:8000/v1/chat/completions" and key.api_key == ""


def test_only_local_servers_may_leave_the_key_out():
    assert {n for n, i in CATALOG.items() if i.key_optional} == {"ollama", "openai-compatible"}
    with pytest.raises(KeysError, match="has no \"api_key\""):
        keys({"provider": "groq"})


def test_which_apis_each_provider_serves():
    serves = {api: set(routes) for api, routes in ROUTES.items()}
    chat_only = {"deepseek", "groq", "xai", "openrouter"}
    assert serves["openai_chat"] == set(CATALOG)
    assert {n for n, i in CATALOG.items() if EMBEDDINGS in i.apis} == set(CATALOG) - chat_only - {
        "anthropic",
        "deepseek-anthropic",
    }
    assert {n for n, i in CATALOG.items() if RESPONSES in i.apis} == {"openai", "azure"}


def test_providers_section_fields_are_checked():
    with pytest.raises(KeysError, match="providers.groq: unknown field 'endpoint'"):
        keys({"provider": "groq", "api_key": "x"}, {"groq": {"endpoint": "https://x"}})
    with pytest.raises(KeysError, match="providers.azure: unknown field 'base_url'"):
        keys({"provider": "groq", "api_key": "x"}, {"azure": {"base_url": "https://x"}})


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"provider": "azure", "api_key": "k"}, 'provider azure needs "endpoint"'),
        ({"provider": "azure", "api_key": "k", "endpoint": "https://r.openai.azure.com?x=1"}, 'needs "endpoint"'),
        (
            {"provider": "azure", "api_key": "k", "endpoint": "https://r.openai.azure.com", "deployment": "d"},
            "a deployment needs api_version",
        ),
        (
            {
                "provider": "azure",
                "api_key": "k",
                "endpoint": "https://r.openai.azure.com",
                "deployment": "a/b",
                "api_version": "2024-10-21",
            },
            "deployment must be",
        ),
        (
            {
                "provider": "azure",
                "api_key": "k",
                "endpoint": "https://r.openai.azure.com",
                "deployments": {"gpt-4o": ""},
                "api_version": "2024-10-21",
            },
            "deployments must map",
        ),
        (
            {"provider": "azure", "api_key": "k", "endpoint": "https://r.openai.azure.com", "api_version": "2024/10"},
            "api_version must look like",
        ),
        ({"provider": "azure", "api_key": "k", "base_url": "https://r.openai.azure.com"}, 'takes "endpoint"'),
        ({"provider": "openai", "api_key": "k", "deployment": "d"}, "deployment is for provider azure only"),
    ],
)
def test_azure_fields_are_validated(entry, message):
    with pytest.raises(KeysError, match=message):
        keys(entry)


def test_azure_url_forms():
    v1 = AzureTarget("https://r.openai.azure.com")
    assert v1.url("/chat/completions", "dep") == "https://r.openai.azure.com/openai/v1/chat/completions"
    assert AzureTarget("https://r", api_version="preview").url("/embeddings", "m") == "https://r/openai/v1/embeddings?api-version=preview"
    assert AzureTarget("https://r", api_version="2024-10-21").url("/embeddings", "m") == "https://r/openai/v1/embeddings"
    dep = AzureTarget("https://r", "fallback", {"gpt-4o": "prod"}, "2024-10-21")
    assert dep.url("/chat/completions", "gpt-4o") == "https://r/openai/deployments/prod/chat/completions?api-version=2024-10-21"
    assert dep.url("/embeddings", "other") == "https://r/openai/deployments/fallback/embeddings?api-version=2024-10-21"
    assert dep.url("/responses", "gpt-4o") == "https://r/openai/v1/responses", "the Responses API has the v1 form only"
    with pytest.raises(GatewayError, match="'o3' has no Azure deployment"):
        AzureTarget("https://r", None, {"gpt-4o": "prod"}, "2024-10-21").url("/chat/completions", "o3")


def test_azure_key_listing_never_shows_the_key():
    key = keys({"provider": "azure", "api_key": "azure-real-key-987654", "endpoint": "https://r.openai.azure.com",
                "deployments": {"gpt-4o": "prod"}, "api_version": "2024-10-21"}).lookup("vk_test_key_1")
    assert "azure-real-key-987654" not in repr(key)
    assert key.upstream_url == "https://r.openai.azure.com/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
