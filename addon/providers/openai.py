"""OpenAI-compatible providers (OpenAI, DeepSeek, Groq, Mistral, ..., Ollama): the real key as
`Authorization: Bearer`; none at all for a local server whose key is optional and not given."""

from __future__ import annotations

from addon.providers.base import CatalogProvider



class OpenAICompatible(CatalogProvider):
    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"} if api_key else {}
