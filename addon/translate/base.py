"""What a translation pair provides: the seam between an inbound API and a provider's API.

A pair turns a validated inbound request (a dict, plus the client's raw bytes) into the upstream
request (`prepare`) and hands back an `Exchange`: the per-request object that turns the upstream
response (whole body, or stream pieces) back into the inbound API's format. The provider's real
key is not the pair's business (providers/ sets it). Nothing here knows mitmproxy.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from addon.wire.streams import StreamTranslator


class UpstreamRequest(NamedTuple):
    headers: dict[str, str]  # set on the outgoing request (after client auth headers are removed)
    body: bytes | None  # None: forward the client's body bytes unchanged
    path_suffix: str = ""  # appended to the key's upstream URL (".../messages" + "/count_tokens")
    keep_query: bool = True  # False: the client's query string is not forwarded
    dropped: tuple[str, ...] = ()  # parameters dropped or approximated: x-gateway-dropped-params


class Exchange(Protocol):
    # False: a 2xx body goes to the client as it is, and the adapter does not read it
    translates_success: bool

    def translate_body(self, status: int, body: bytes) -> bytes | None:
        """The client's body for a whole (non-streamed) upstream body; None keeps it."""

    def stream_translator(self) -> StreamTranslator | None:
        """A translator for a streamed 200 response; None forwards the stream unchanged."""


class Pair(Protocol):
    def prepare(self, request: dict) -> tuple[UpstreamRequest, Exchange]:
        """Raise GatewayError for a request the provider's API cannot serve faithfully."""
