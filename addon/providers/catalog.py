"""What the rest of the gateway knows about each provider without loading any code: one line per
provider. A line says where the provider is (default base URL; "" = every key must give one),
the path its chat API has under that URL, the header that carries the real key, the API it
speaks for chat (which translation pair serves a chat client, translate/registry.py), the other
OpenAI APIs it serves natively (embeddings, responses), whether it accepts
`stream_options.include_usage` on a streamed chat request, and whether a key is optional.

Adding one more OpenAI-compatible provider is one line here and one in providers/registry.py.

The keys file (policy/keys.py) validates provider names and builds upstream URLs from this table;
the registry (providers/registry.py) pairs each entry with its implementation.
"""

from __future__ import annotations

from typing import NamedTuple

# the OpenAI APIs a provider may serve besides chat, named as in apis/
EMBEDDINGS = "openai_embeddings"
RESPONSES = "openai_responses"


class ProviderInfo(NamedTuple):
    default_base_url: str  # "" = none: every key (or the providers section) gives base_url
    endpoint_path: str  # the chat API's path, appended to base_url
    secret_header: str  # the header carrying the real key, redacted once the request is sent
    api: str  # the chat API it speaks, named as in apis/ ("openai_chat", "anthropic_messages")
    also: frozenset[str] = frozenset()  # further APIs served natively: EMBEDDINGS, RESPONSES
    # accepts stream_options.include_usage. False: the gateway never adds it (nor forwards a
    # client's), and counts a stream's usage only when the provider sends it anyway
    stream_usage: bool = True
    key_optional: bool = False  # a local server: api_key may be left out

    @property
    def apis(self) -> frozenset[str]:
        return self.also | {self.api}


_E = frozenset({EMBEDDINGS})
_ER = frozenset({EMBEDDINGS, RESPONSES})
_CHAT = "/chat/completions"
_BEARER = "authorization"

CATALOG: dict[str, ProviderInfo] = {
    "openai": ProviderInfo("https://api.openai.com/v1", _CHAT, _BEARER, "openai_chat", _ER),
    "azure": ProviderInfo("", _CHAT, "api-key", "openai_chat", _ER),  # URL per key: providers/azure.py
    "deepseek": ProviderInfo("https://api.deepseek.com", _CHAT, _BEARER, "openai_chat"),
    "anthropic": ProviderInfo("https://api.anthropic.com/v1", "/messages", "x-api-key", "anthropic_messages"),
    # DeepSeek's Anthropic-compatible API: a key of this provider passes /v1/messages through
    # instead of translating it (the default, "deepseek", translates: docs/anthropic.md says why)
    "deepseek-anthropic": ProviderInfo("https://api.deepseek.com/anthropic", "/v1/messages", "x-api-key", "anthropic_messages"),
    "gemini": ProviderInfo("https://generativelanguage.googleapis.com/v1beta/openai", _CHAT, _BEARER, "openai_chat", _E),
    "groq": ProviderInfo("https://api.groq.com/openai/v1", _CHAT, _BEARER, "openai_chat"),
    "mistral": ProviderInfo("https://api.mistral.ai/v1", _CHAT, _BEARER, "openai_chat", _E, stream_usage=False),
    "xai": ProviderInfo("https://api.x.ai/v1", _CHAT, _BEARER, "openai_chat"),
    "openrouter": ProviderInfo("https://openrouter.ai/api/v1", _CHAT, _BEARER, "openai_chat"),
    "together": ProviderInfo("https://api.together.xyz/v1", _CHAT, _BEARER, "openai_chat", _E, stream_usage=False),
    "fireworks": ProviderInfo("https://api.fireworks.ai/inference/v1", _CHAT, _BEARER, "openai_chat", _E, stream_usage=False),
    "ollama": ProviderInfo("http://127.0.0.1:11434/v1", _CHAT, _BEARER, "openai_chat", _E, key_optional=True),
    "openai-compatible": ProviderInfo("", _CHAT, _BEARER, "openai_chat", _E, stream_usage=False, key_optional=True),
}

# The most output tokens a request without max_tokens can get from each provider: a key with a
# budget or tpm reserves this much for such a request (policy/store.py). At least what the
# provider allows (or, for anthropic, what translate/openai_chat_anthropic.py sets).
MAX_OUTPUT: dict[str, int] = {"openai": 32768, "deepseek": 8192, "anthropic": 32768}  # 16384 + the "high" thinking budget
DEFAULT_MAX_OUTPUT = 32768  # a provider missing above
