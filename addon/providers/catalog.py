"""What the rest of the gateway knows about each provider without loading any code: its name,
default base URL, the path appended to it, the header that carries the real key, and the API it
speaks (which translation pair serves a client, translate/registry.py).

The keys file (policy/keys.py) validates provider names and builds upstream URLs from this table;
the registry (providers/registry.py) pairs each entry with its implementation.
"""

from __future__ import annotations

from typing import NamedTuple


class ProviderInfo(NamedTuple):
    default_base_url: str
    endpoint_path: str  # appended to base_url
    secret_header: str  # the header carrying the real key, redacted once the request is sent
    api: str  # the API it speaks, named as in apis/ ("openai_chat", "anthropic_messages")


CATALOG: dict[str, ProviderInfo] = {
    "openai": ProviderInfo("https://api.openai.com/v1", "/chat/completions", "authorization", "openai_chat"),
    "deepseek": ProviderInfo("https://api.deepseek.com", "/chat/completions", "authorization", "openai_chat"),
    "anthropic": ProviderInfo("https://api.anthropic.com/v1", "/messages", "x-api-key", "anthropic_messages"),
    # DeepSeek's Anthropic-compatible API: a key of this provider passes /v1/messages through
    # instead of translating it (the default, "deepseek", translates: docs/anthropic.md says why)
    "deepseek-anthropic": ProviderInfo("https://api.deepseek.com/anthropic", "/v1/messages", "x-api-key", "anthropic_messages"),
}

# The most output tokens a request without max_tokens can get from each provider: a key with a
# budget or tpm reserves this much for such a request (policy/store.py). At least what the
# provider allows (or, for anthropic, what translate/openai_chat_anthropic.py sets).
MAX_OUTPUT: dict[str, int] = {"openai": 32768, "deepseek": 8192, "anthropic": 32768}  # 16384 + the "high" thinking budget
DEFAULT_MAX_OUTPUT = 32768  # a provider missing above
