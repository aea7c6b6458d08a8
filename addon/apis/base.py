"""What every inbound API module declares: the seam between a client's API and the gateway.

An inbound API is what a client speaks to the gateway (OpenAI Chat Completions today). Its module
says where it is served (paths, methods), how a request is checked before anything is forwarded,
how the gateway's own errors look on it, and how usage is read from the bytes its clients
receive (whole bodies and streams). The adapter (gateway.py) finds the API by path in
apis/registry.py and the translation pair for (this API, the key's provider API) in
translate/registry.py; nothing in between branches on an API's name.
"""

from __future__ import annotations

from typing import Protocol

import json

from addon.wire.tokens import Usage
from addon.wire.errors import GatewayError


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    """object_pairs_hook: a JSON object that repeats a key is refused. json.loads keeps the last
    value while the bytes (forwarded as they are) carry both, and a provider may read the first:
    what the gateway checked must be what the provider gets."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


def _no_constant(name: str):
    """parse_constant: Python's json reads NaN and Infinity, JSON has neither; a translated body
    would carry them on to the provider as text that is not JSON."""
    raise GatewayError(400, f"request body is not valid JSON: {name} is not a JSON value", code="invalid_json")


# built once: json.loads with hooks builds a JSONDecoder and its C scanner on every call (about
# 12k instructions a request). Shared by threads as json.loads shares its default decoder.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_constant=_no_constant)


def _loads(raw: bytes | str) -> object:
    """json.loads(raw, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)."""
    if isinstance(raw, str):
        if raw.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", raw, 0)
        return _DECODER.decode(raw)
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def json_object(raw: bytes) -> dict:
    """A request body that must be a JSON object (GatewayError 400 otherwise), for every API.
    A key repeated in any object of the body is a 400 `duplicate_key` naming it; NaN and
    Infinity are refused as JSON does."""
    try:
        body = _loads(raw)
    except DuplicateKey as e:
        name = e.key if len(e.key) <= 64 else e.key[:64] + "..."
        raise GatewayError(400, f"request body repeats the key {json.dumps(name)}; each key may appear once per object",
                           code="duplicate_key", param=name) from None
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(400, "request body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_request")
    return body


# Caps on a conversation's shape: far above what providers accept in practice
# (a context window holds a few thousand turns), so a legitimate request never meets them; they bound
# the work every per-message pass (translation, token estimates, the ledger) does for one body.
MAX_MESSAGES = 10_000  # entries of `messages`
MAX_PARTS = 1_000  # entries of one message's `content` array (text, image, tool_result... parts)


def check_counts(messages: list) -> None:
    """400 naming the param when `messages`, or one message's `content` array, is longer than its cap."""
    if len(messages) > MAX_MESSAGES:
        raise GatewayError(400, f"messages: {len(messages)} messages is more than the gateway's limit of {MAX_MESSAGES}",
                           param="messages", code="too_many_messages")
    for i, message in enumerate(messages):
        if type(message) is dict:
            content = message.get("content")
            if type(content) is list and len(content) > MAX_PARTS:
                raise GatewayError(400, f"messages[{i}].content: {len(content)} content parts is more than the gateway's "
                                        f"limit of {MAX_PARTS} per message", param=f"messages[{i}].content", code="too_many_parts")


class StreamUsageReader(Protocol):
    strip: bool  # removes usage the client did not ask for (the stream's length changes)
    usage: Usage | None

    @property
    def held(self) -> bytes:
        """Bytes received but not yet passed on."""

    def feed(self, piece: bytes) -> list[bytes]:
        """Client-bound bytes in, the bytes to send on out; b"" at the end flushes."""


class InboundAPI(Protocol):
    name: str  # as recorded in flow metadata ("api") and named in pairs
    paths: frozenset[str]  # request paths without the query
    methods: frozenset[str]
    usage_in_stream: bool  # False: the gateway asks upstream for stream usage (see prepare_usage)

    def parse_request(self, raw: bytes) -> dict:
        """The request body, checked for what the gateway itself relies on (model, stream).
        Raises GatewayError(400) in this API's terms."""

    def prepare_usage(self, body: dict, raw: bytes, meta: dict) -> bytes | None:
        """For a streamed request: make the answer carry usage; the new body bytes, or None."""

    def error_body(self, error: GatewayError) -> bytes:
        """A gateway answer in this API's error shape."""

    def is_error(self, body: bytes) -> bool:
        """True when a provider's error body is already in this API's error shape."""

    def foreign_error(self, status: int, body: bytes) -> bytes:
        """A provider error body in another shape (an HTML 502, an empty 503) in this one."""

    def stream_error(self, message: str, code: str = "gateway_error") -> list[bytes]:
        """What ends a stream the gateway cannot finish (the stream's error event); `code`
        says why (gateway_error, upstream_stream_broken, stream_idle_timeout)."""

    def usage_from_body(self, body: bytes) -> Usage | None:
        """Usage of a whole successful response body as the client receives it."""

    def models_page(self, page: dict) -> dict:
        """GET /v1/models (the gateway's OpenAI-shaped list) in this API's shape."""

    def model_object(self, model: dict) -> dict:
        """GET /v1/models/{id} (OpenAI-shaped) in this API's shape."""

    def stream_usage(self, strip: bool) -> StreamUsageReader:
        """A watcher of client-bound stream bytes for usage; `strip` removes usage the client
        did not ask for."""
