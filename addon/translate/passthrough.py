"""The pair for a provider that speaks the client's API: the body goes through unchanged.

Only the key is swapped (providers/ sets it). Error bodies not already in the API's error shape
(a proxy's HTML 502, an empty 503) are wrapped so every client sees one error shape.
"""

from __future__ import annotations

from addon.apis.base import InboundAPI
from addon.translate.base import UpstreamRequest

NO_HEADERS: dict[str, str] = {}


class PassthroughExchange:
    __slots__ = ("api",)
    translates_success = False

    def __init__(self, api: InboundAPI) -> None:
        self.api = api

    def translate_body(self, status: int, body: bytes) -> bytes | None:
        if status < 400 or self.api.is_error(body):
            return None
        return self.api.foreign_error(status, body)

    def stream_translator(self):
        return None


class Passthrough:
    """Stateless: one exchange object serves every request."""

    def __init__(self, api: InboundAPI, path_suffix: str = "") -> None:
        self.exchange = PassthroughExchange(api)
        self.upstream = UpstreamRequest(NO_HEADERS, None, path_suffix)

    def prepare(self, request: dict) -> tuple[UpstreamRequest, PassthroughExchange]:
        return self.upstream, self.exchange
