"""What the rest of the gateway knows about each provider without loading any code: one line per
provider. A line says where the provider is (default base URL; "" = every key must give one),
the path its chat API has under that URL, the header that carries the real key, the API it
speaks for chat (which translation pair serves a chat client, translate/registry.py), the other
OpenAI APIs it serves natively (embeddings, responses), whether it accepts
`stream_options.include_usage` on a streamed chat request, and whether a key is optional.

Adding one more OpenAI-compatible provider is one line here and one in providers/registry.py.

The keys file (policy/keys_parse.py) validates provider names and builds upstream URLs from
this table; the registry (providers/registry.py) pairs each entry with its implementation.
"""

from __future__ import annotations

import functools
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
    "deepseek-anthropic": ProviderInfo(
        "https://api.deepseek.com/anthropic", "/v1/messages", "x-api-key", "anthropic_messages"
    ),
    "gemini": ProviderInfo(
        "https://generativelanguage.googleapis.com/v1beta/openai", _CHAT, _BEARER, "openai_chat", _E
    ),
    "groq": ProviderInfo("https://api.groq.com/openai/v1", _CHAT, _BEARER, "openai_chat"),
    "mistral": ProviderInfo("https://api.mistral.ai/v1", _CHAT, _BEARER, "openai_chat", _E, stream_usage=False),
    "xai": ProviderInfo("https://api.x.ai/v1", _CHAT, _BEARER, "openai_chat"),
    "openrouter": ProviderInfo("https://openrouter.ai/api/v1", _CHAT, _BEARER, "openai_chat"),
    "together": ProviderInfo("https://api.together.xyz/v1", _CHAT, _BEARER, "openai_chat", _E, stream_usage=False),
    "fireworks": ProviderInfo(
        "https://api.fireworks.ai/inference/v1", _CHAT, _BEARER, "openai_chat", _E, stream_usage=False
    ),
    "ollama": ProviderInfo("http://127.0.0.1:11434/v1", _CHAT, _BEARER, "openai_chat", _E, key_optional=True),
    "openai-compatible": ProviderInfo("", _CHAT, _BEARER, "openai_chat", _E, stream_usage=False, key_optional=True),
}

class ModelLimits(NamedTuple):
    """What one model can cost a request at most, as its provider documents it: what a key with
    a budget or tpm holds for a request (policy/rules.py `worst_case`)."""

    max_output: int  # output tokens one answer (one choice) may have when the request names no maximum
    context: int  # the context window: no request's input is billed more tokens than this
    image: int  # input tokens one image costs at most (the provider resizes larger ones); 0: no rule


# Per provider, model name prefix -> limits; the longest matching prefix wins, so "gpt-4o-mini"
# beats "gpt-4o". Images: OpenAI's tile models are (base + per tile) at detail high with at most 8
# tiles of 512 px (an image is fitted into 2048 px, then its short side into 768 px); its patch
# models are 1,536 patches of 32 px times the model's multiplier; Anthropic bills width x
# height / 750 after resizing to its native resolution (1.15 megapixels, Opus 4.7: 3.75).
# Context windows are the largest a request can get (Anthropic's 1M-token beta included). What
# these numbers are for, and why a model the table does not know gets its provider's largest:
# docs/key-policy.md, "How the worst case is computed".
_OPENAI: dict[str, ModelLimits] = {
    "gpt-5": ModelLimits(128_000, 400_000, 70 + 140 * 8),
    "gpt-5-pro": ModelLimits(272_000, 400_000, 70 + 140 * 8),
    "gpt-5-chat": ModelLimits(16_384, 128_000, 70 + 140 * 8),
    "gpt-5-mini": ModelLimits(128_000, 400_000, 2_489),  # 1,536 patches x 1.62
    "gpt-5-nano": ModelLimits(128_000, 400_000, 3_779),  # x 2.46
    "gpt-4.1": ModelLimits(32_768, 1_047_576, 85 + 170 * 8),
    "gpt-4.1-mini": ModelLimits(32_768, 1_047_576, 2_489),
    "gpt-4.1-nano": ModelLimits(32_768, 1_047_576, 3_779),
    "gpt-4.5": ModelLimits(16_384, 128_000, 85 + 170 * 8),
    "gpt-4o": ModelLimits(16_384, 128_000, 85 + 170 * 8),
    "chatgpt-4o": ModelLimits(16_384, 128_000, 85 + 170 * 8),
    "gpt-4o-mini": ModelLimits(16_384, 128_000, 2_833 + 5_667 * 8),
    "gpt-4-turbo": ModelLimits(4_096, 128_000, 85 + 170 * 8),
    "gpt-4": ModelLimits(8_192, 8_192, 85 + 170 * 8),
    "gpt-3.5": ModelLimits(4_096, 16_385, 0),
    "o1": ModelLimits(100_000, 200_000, 75 + 150 * 8),
    "o1-mini": ModelLimits(65_536, 128_000, 75 + 150 * 8),
    "o3": ModelLimits(100_000, 200_000, 75 + 150 * 8),
    "o3-mini": ModelLimits(100_000, 200_000, 75 + 150 * 8),
    "o4-mini": ModelLimits(100_000, 200_000, 2_642),  # 1,536 patches x 1.72
    "codex-mini": ModelLimits(100_000, 200_000, 2_642),
    "computer-use-preview": ModelLimits(1_024, 8_192, 65 + 129 * 8),
    "gpt-oss": ModelLimits(131_072, 131_072, 0),
}
_ANTHROPIC: dict[str, ModelLimits] = {
    "claude-3-haiku": ModelLimits(4_096, 200_000, 1_600),
    "claude-3-opus": ModelLimits(4_096, 200_000, 1_600),
    "claude-3-sonnet": ModelLimits(4_096, 200_000, 1_600),
    "claude-3-5": ModelLimits(8_192, 200_000, 1_600),
    "claude-3-7": ModelLimits(128_000, 200_000, 1_600),  # 64,000, 128,000 with the output-128k beta
    "claude-haiku-4": ModelLimits(64_000, 200_000, 1_600),
    "claude-sonnet-4": ModelLimits(64_000, 1_000_000, 1_600),
    "claude-opus-4": ModelLimits(64_000, 200_000, 1_600),  # 4 and 4.1: 32,000, 4.5: 64,000
    "claude-opus-4-6": ModelLimits(128_000, 1_000_000, 1_600),
    "claude-opus-4-7": ModelLimits(128_000, 1_000_000, 5_000),
}
_DEEPSEEK: dict[str, ModelLimits] = {
    "deepseek-chat": ModelLimits(8_192, 128_000, 0),
    "deepseek-reasoner": ModelLimits(64_000, 128_000, 0),
}


def _largest(table: dict[str, ModelLimits]) -> ModelLimits:
    return ModelLimits(*(max(column) for column in zip(*table.values())))


MODEL_LIMITS: dict[str, dict[str, ModelLimits]] = {
    "openai": _OPENAI,
    "azure": _OPENAI,
    "anthropic": _ANTHROPIC,
    "deepseek": _DEEPSEEK,
    "deepseek-anthropic": _DEEPSEEK,
}
# A model its provider's table does not name: the largest of that table (a new model is held at
# least as much as the largest known one). A provider without a table: these, which are the
# gateway's assumption, not a provider's word: a key's or target's max_output_tokens is sent to the
# provider and so is a true bound for any model (docs/key-policy.md).
DEFAULT_LIMITS = ModelLimits(131_072, 2_000_000, 8_192)
PROVIDER_LIMITS: dict[str, ModelLimits] = {name: _largest(table) for name, table in MODEL_LIMITS.items()}


@functools.lru_cache(maxsize=4096)
def model_limits(provider: str, model: str) -> ModelLimits:
    """The limits of `model` at `provider` (a fine-tune "ft:gpt-4o-mini:org::id" as its base)."""
    table = MODEL_LIMITS.get(provider)
    if table is None:
        return DEFAULT_LIMITS
    if model.startswith("ft:"):
        model = model[3:]
    best = ""
    for prefix in table:
        if model.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return table[best] if best else PROVIDER_LIMITS[provider]
