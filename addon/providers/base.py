"""What every provider module provides: where it is, the APIs it speaks, and how its real key is
sent. Translation between APIs is not a provider's business (translate/)."""

from __future__ import annotations

from typing import Protocol

from addon.providers.catalog import CATALOG, ProviderInfo


class Endpoint(Protocol):
    """What a provider needs of a key's target to build its URL (policy/virtual_keys.py's Target is one)."""

    base_url: str  # the target's base URL, no trailing slash
    upstream_url: str  # base_url + the chat API's path, computed once at load


class Provider(Protocol):
    name: str
    info: ProviderInfo  # its catalog line
    default_base_url: str
    endpoint_path: str  # the chat API's path, appended to base_url
    secret_header: str  # the header carrying the real key, redacted once the request is sent
    api: str  # the chat API it speaks (catalog.py)

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """The headers that carry the real key on the outgoing request."""

    def upstream_url(self, key: Endpoint, path: str, model: str | None) -> str:
        """Where a request for `path` (an API's path under base_url, e.g. "/embeddings") goes.
        May raise GatewayError (a model the key has no deployment for)."""


class CatalogProvider:
    """A provider as its catalog line says: requests go to the key's base_url + the API's path."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.info = CATALOG[name]
        self.default_base_url, self.endpoint_path, self.secret_header, self.api = self.info[:4]

    def upstream_url(self, key: Endpoint, path: str, model: str | None) -> str:
        # chat: the key's precomputed URL (its hash is cached for upstream_target's lookup)
        return key.upstream_url if path == self.endpoint_path else key.base_url + path
