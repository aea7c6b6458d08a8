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

import codecs
import json
import re

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


DECODE_PIECE = 1024 * 1024  # bytes of a large body decoded to text per call (_text)


def _loads(raw: bytes | str) -> object:
    """json.loads(raw, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)."""
    if isinstance(raw, str):
        if raw.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", raw, 0)
        return _DECODER.decode(raw)
    return _DECODER.decode(_text(raw, json.detect_encoding(raw)))


def _text(raw: bytes, encoding: str) -> str:
    """raw.decode(encoding, "surrogatepass"); a large body a piece at a time: one call over 30 MB
    holds the GIL for tens of milliseconds, and a body that large is parsed in a worker thread
    precisely so the event loop can run meanwhile."""
    if len(raw) <= 4 * DECODE_PIECE:
        return raw.decode(encoding, "surrogatepass")
    decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")
    view = memoryview(raw)
    parts = [decoder.decode(view[start:start + DECODE_PIECE]) for start in range(0, len(raw), DECODE_PIECE)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def json_object(raw: bytes) -> dict:
    """A request body that must be a JSON object (GatewayError 400 otherwise), for every API.
    A key repeated in any object of the body is a 400 `duplicate_key` naming it; NaN and
    Infinity are refused as JSON does; so is a string (or key) with an unpaired surrogate."""
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
    if _may_hold_surrogates(raw):
        where = unpaired_surrogate(body)
        if where is not None:
            raise GatewayError(
                400,
                f"{where}: a string with an unpaired surrogate (such as \\ud800) is not text: it has no UTF-8 form",
                param=where,
                code="invalid_string",
            )
    return body


# An unpaired surrogate (JSON's "\ud800" escape, or the bytes ED A0 80 that surrogatepass
# decodes) makes a string no text can carry: it has no UTF-8 form, so a provider, Redis (a stored
# response's id) or the ledger could not take it (a 500 before). Such a string, in any field of
# any API, is refused. Found in the bytes first, without a walk of the parsed body: an escape of
# a high surrogate not followed by one of a low, or of a low not preceded by one of a high, is
# lone, unless the body also has a literal backslash before a "u" ("\\u": a text that reads like
# an escape; the parsed body is walked then), and a UTF-8 body holds one only as ED A0..BF.
# UTF-16 and UTF-32 bodies are always walked.
_LONE_ESCAPE = re.compile(rb"\\u[dD](?:[89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                          rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD])[c-fC-F][0-9a-fA-F]{2})")
_UTF8_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")
PATH_SHOWN = 120  # characters of a field's path named in the refusal at most


def _may_hold_surrogates(raw: bytes | str) -> bool:
    if isinstance(raw, str):
        return True
    if raw[:1] == b"\x00" or raw[1:2] == b"\x00" or raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True  # UTF-16 or UTF-32 (json.detect_encoding's cases)
    if (_has(raw, b"\\ud") or _has(raw, b"\\uD")) and (_has(raw, b"\\\\u") or _found(_LONE_ESCAPE, raw)):
        return True  # (two byte searches for most bodies: the pattern runs only where a surrogate is escaped)
    return _has(raw, b"\xed") and _found(_UTF8_SURROGATE, raw)


def _found(pattern: re.Pattern, raw: bytes) -> bool:
    """pattern.search(raw) is not None, DECODE_PIECE bytes per call. Pieces overlap by more than a
    match's length; one that ends inside a match's lookahead may report a pair cut there as lone
    (the body is then walked: exact), never the other way round."""
    if len(raw) <= 4 * DECODE_PIECE:
        return pattern.search(raw) is not None
    for start in range(0, len(raw), DECODE_PIECE):
        if pattern.search(raw, max(0, start - 16), start + DECODE_PIECE) is not None:
            return True
    return False


def _has(raw: bytes, needle: bytes) -> bool:
    """needle in raw, searched DECODE_PIECE bytes per call (a worker thread's large body: no call
    holds the GIL long)."""
    if len(raw) <= 4 * DECODE_PIECE:
        return needle in raw
    overlap = len(needle) - 1
    for start in range(0, len(raw), DECODE_PIECE):
        if raw.find(needle, start, start + DECODE_PIECE + overlap) >= 0:
            return True
    return False


def _bad(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def unpaired_surrogate(body: object) -> str | None:
    """Where in `body` (a parsed JSON value) the first string or key with an unpaired surrogate
    is, as a path ("messages[0].content"), or None. Walked without recursion; paths are made
    only for a body that has one."""
    stack = [body]
    while stack:
        value = stack.pop()
        if type(value) is dict:
            for name, item in value.items():
                if _bad(name) or (type(item) is str and _bad(item)):
                    return _path_to_surrogate(body)
                if type(item) in (dict, list):
                    stack.append(item)
        elif type(value) is list:
            for item in value:
                if type(item) is str:
                    if _bad(item):
                        return _path_to_surrogate(body)
                elif type(item) in (dict, list):
                    stack.append(item)
        elif type(value) is str and _bad(value):
            return "body"
    return None


def _path_to_surrogate(body: object) -> str:
    stack: list[tuple[object, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        items = value.items() if type(value) is dict else enumerate(value)
        for name, item in items:
            here = (f"{path}.{_shown(name)}" if path else _shown(name)) if type(name) is str else f"{path}[{name}]"
            if (type(name) is str and _bad(name)) or (type(item) is str and _bad(item)):
                return here[:PATH_SHOWN]
            if type(item) in (dict, list):
                stack.append((item, here))
    return "body"


def _shown(name: str) -> str:
    """A key as a path shows it: ASCII, escaped like JSON (the key may be what is refused)."""
    return name if name.isascii() and name.isprintable() else json.dumps(name)[1:-1]


# Caps on a conversation's shape: far above what providers accept in practice
# (a context window holds a few thousand turns), so a legitimate request never meets them; they bound
# the work every per-message pass (translation, token estimates, the ledger) does for one body.
MAX_MESSAGES = 10_000  # entries of `messages`
MAX_PARTS = 1_000  # entries of one message's `content` array (text, image, tool_result... parts)


def check_counts(messages: list) -> None:
    """400 naming the param when `messages`, or one message's `content` array, is longer than its cap."""
    if len(messages) > MAX_MESSAGES:
        raise GatewayError(
            400,
            f"messages: {len(messages)} messages is more than the gateway's limit of {MAX_MESSAGES}",
            param="messages",
            code="too_many_messages",
        )
    for i, message in enumerate(messages):
        if type(message) is dict:
            content = message.get("content")
            if type(content) is list and len(content) > MAX_PARTS:
                raise GatewayError(
                    400,
                    f"messages[{i}].content: {len(content)} content parts is more than the gateway's "
                    f"limit of {MAX_PARTS} per message",
                    param=f"messages[{i}].content",
                    code="too_many_parts",
                )


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
    max_output_fields: tuple[str, ...]  # fields bounding one answer's output, first set wins; () no output
    choices_field: str | None  # the field asking for several answers (chat's "n"), if any
    stored_input_fields: tuple[str, ...]  # fields naming input the provider adds from what it stores

    def output_field(self, provider: str) -> str | None:
        """The field a key's max_output_tokens is sent in to `provider` when the client names none."""

    def parse_request(self, raw: bytes) -> dict:
        """The request body, checked for what the gateway itself relies on (model, stream).
        Raises GatewayError(400) in this API's terms."""

    def prepare_usage(self, body: dict, raw: bytes) -> tuple[bytes | None, bool]:
        """For a streamed request: make the answer carry usage. (the new body bytes or None,
        whether the client asked for the usage itself: if not, it is hidden from it again)."""

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
