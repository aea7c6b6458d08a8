"""OpenAI-compatible providers (OpenAI, DeepSeek): the real key as `Authorization: Bearer`."""

from __future__ import annotations

from addon.providers.catalog import CATALOG


class OpenAICompatible:
    def __init__(self, name: str) -> None:
        self.name = name
        self.default_base_url, self.endpoint_path, self.secret_header, self.api = CATALOG[name]

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}
