"""What every provider module provides: where it is, the API it speaks, and how its real key is
sent. Translation between APIs is not a provider's business (translate/)."""

from __future__ import annotations

from typing import Protocol


class Provider(Protocol):
    name: str
    default_base_url: str
    endpoint_path: str  # appended to base_url
    secret_header: str  # the header carrying the real key, redacted once the request is sent
    api: str  # the API it speaks (catalog.py)

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """The headers that carry the real key on the outgoing request."""
