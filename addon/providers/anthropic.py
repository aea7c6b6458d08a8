"""Providers that speak the Anthropic Messages API (Anthropic; DeepSeek's Anthropic-compatible
API): the real key as `x-api-key`. (The API version header belongs to the request the
translation pair builds, translate/, or is the client's own on passthrough.)"""

from __future__ import annotations

from addon.providers.catalog import CATALOG


class AnthropicCompatible:
    def __init__(self, name: str = "anthropic") -> None:
        self.name = name
        self.default_base_url, self.endpoint_path, self.secret_header, self.api = CATALOG[name]

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

