"""What the rest of the gateway knows about each provider without loading its translation code:
its name, default base URL, the path appended to it, and the header that carries the real key.

The keys file (policy/keys.py) validates provider names and builds upstream URLs from this table;
the registry (providers/registry.py) pairs each entry with its implementation.
"""

from __future__ import annotations

from typing import NamedTuple


class ProviderInfo(NamedTuple):
    default_base_url: str
    endpoint_path: str  # appended to base_url
    secret_header: str  # the header carrying the real key, redacted once the request is sent


CATALOG: dict[str, ProviderInfo] = {
    "openai": ProviderInfo("https://api.openai.com/v1", "/chat/completions", "authorization"),
    "deepseek": ProviderInfo("https://api.deepseek.com", "/chat/completions", "authorization"),
    "anthropic": ProviderInfo("https://api.anthropic.com/v1", "/messages", "x-api-key"),
}
