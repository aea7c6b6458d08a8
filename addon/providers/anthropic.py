"""Providers that speak the Anthropic Messages API (Anthropic; DeepSeek's Anthropic-compatible
API): the real key as `x-api-key`. (The API version header belongs to the request the
translation pair builds, translate/, or is the client's own on passthrough.)"""

from __future__ import annotations

from addon.providers.base import CatalogProvider


class AnthropicCompatible(CatalogProvider):
    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}
