"""What every provider module provides: the seams the gateway adapter calls.

A provider turns a validated OpenAI Chat Completions request into the upstream request
(`prepare`) and hands back an `Exchange`: the per-request object that turns the upstream
response (whole body, or stream pieces) back into OpenAI format. Nothing here knows mitmproxy.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from addon.wire.streams import StreamTranslator


class UpstreamRequest(NamedTuple):
    headers: dict[str, str]  # set on the outgoing request (after client auth headers are removed)
    body: bytes | None  # None: forward the client's body bytes unchanged


class Exchange(Protocol):
    # False: a 2xx body goes to the client as it is, and the adapter does not read it
    translates_success: bool

    def translate_body(self, status: int, body: bytes) -> bytes | None:
        """The client's body for a whole (non-streamed) upstream body; None keeps it."""

    def stream_translator(self) -> StreamTranslator | None:
        """A translator for a streamed 200 response; None forwards the stream unchanged."""


class Provider(Protocol):
    name: str
    default_base_url: str
    endpoint_path: str  # appended to base_url
    secret_header: str  # the header carrying the real key, redacted once the request is sent

    def prepare(self, request: dict, api_key: str) -> tuple[UpstreamRequest, Exchange]:
        """Raise GatewayError for a request this provider cannot serve."""
