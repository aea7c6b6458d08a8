"""Anthropic: the real key as `x-api-key`. (The API version header belongs to the request the
translation pair builds, translate/.)"""

from __future__ import annotations

from addon.providers.catalog import CATALOG


class AnthropicProvider:
    name = "anthropic"
    default_base_url, endpoint_path, secret_header, api = CATALOG["anthropic"]

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}
