"""Token usage from OpenAI-format responses: whole JSON bodies and SSE streams.

Everything here reads what the *client* receives (after any provider translation), so it works
for every provider whose exchange speaks OpenAI format back. Pure: no mitmproxy.

Streams: the gateway always asks upstream for usage (`stream_options.include_usage`, see
`request_stream_usage`). `StreamUsage` watches the client-bound bytes for the usage and, when the
client did not ask for it, removes it: the usage-only chunk (`"choices": []`, OpenAI) is dropped;
a usage field riding on a content chunk (DeepSeek) is deleted from that chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NamedTuple

from addon.wire.sse import encode_data, json_bytes


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None  # cached prompt tokens; None = billed as input

_USAGE = b'"usage"'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')  # not `"usage": null`, which OpenAI puts on every chunk
_EVENT = re.compile(rb".*?(?:\r\n\r\n|\n\n|\r\r)", re.S)


# The most tokens one request is counted with, per field: far above any model's context
# window, far below SQLite's 64-bit integers. A provider number above it (10**30 was seen) is
# clamped to it, so one bad answer can neither overflow the ledger nor escape its budget.
MAX_TOKENS = 10**9


class Usage(NamedTuple):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    estimated: bool = False  # not the provider's count: estimate.py's, for lack of one

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_from_dict(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = usage.get("prompt_cache_hit_tokens")  # DeepSeek
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    # counts are positive ints up to MAX_TOKENS; anything else (null, a string, a bool, a
    # negative) counts 0, and more counts MAX_TOKENS
    return Usage(token_count(prompt), token_count(completion), token_count(cached))


def token_count(value: object) -> int:
    return min(value, MAX_TOKENS) if type(value) is int and value > 0 else 0


_DECODER = json.JSONDecoder()


def usage_from_body(body: bytes) -> Usage | None:
    """Usage of a whole chat.completion body; None when it has none (errors, non-JSON)."""
    at = body.rfind(_USAGE)  # OpenAI-format bodies end with it
    if at < 0:
        return None
    if body.find(_USAGE) == at:
        # the usual body: parse only the usage object, not the whole answer. `"usage"` with
        # its quotes unescaped cannot be inside a JSON string, so this is the usage key.
        m = _USAGE_OBJECT.match(body, at)
        if m is None:
            return None  # "usage": null
        try:
            return usage_from_dict(_DECODER.raw_decode(body[m.end() - 1:].decode())[0])
        except (ValueError, UnicodeDecodeError):
            return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return usage_from_dict(data.get("usage")) if isinstance(data, dict) else None


def cost(usage: Usage, price: Price | None) -> float:
    """USD for one request; 0.0 without a price."""
    if price is None:
        return 0.0
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    return (
        (usage.prompt_tokens - cached) * price.input + cached * cached_rate + usage.completion_tokens * price.output
    ) / 1e6


def client_wants_stream_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def request_stream_usage(body: dict, raw: bytes) -> bytes:
    """Set `stream_options.include_usage` on the parsed request body (for providers that build
    their own), keeping other stream options, and return the client's body bytes with it (for
    providers that forward them): spliced in when the client sent no stream_options, so the
    rest goes on byte for byte; re-encoded otherwise."""
    options = body.get("stream_options")
    if "stream_options" not in body and json.detect_encoding(raw) == "utf-8":  # (not UTF-16/32 JSON)
        body["stream_options"] = {"include_usage": True}
        start = raw.index(b"{") + 1  # the body parsed as a non-empty object
        return raw[:start] + b'"stream_options":{"include_usage":true},' + raw[start:]
    body["stream_options"] = (
        {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    )
    return json_bytes(body)


def without_stream_options(raw: bytes) -> bytes:
    """A JSON request body without `stream_options` (for a provider that rejects it)."""
    if b'"stream_options"' not in raw:
        return raw
    body = json.loads(raw)
    body.pop("stream_options", None)
    return json_bytes(body)


class StreamUsage:
    """Watches client-bound OpenAI SSE bytes for usage; with `strip`, removes it from them.

    `feed(piece)` returns the bytes to send on (a list, possibly empty); `feed(b"")` at the end
    flushes. Cheap when nothing is to be found: only complete events are looked at, and a run
    of events without `"usage"` in its bytes is passed on as one piece without being parsed.
    Without `strip`, pieces pass through at once; with it, an incomplete trailing event is held
    until it completes (the client could not use half an event anyway).
    """

    __slots__ = ("strip", "usage", "_buf")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.usage: Usage | None = None
        self._buf = b""

    @property
    def held(self) -> bytes:
        """Bytes received but not yet passed on (the start of an incomplete event)."""
        return self._buf if self.strip else b""

    def feed(self, piece: bytes) -> list[bytes]:
        if not piece:
            rest, self._buf = self._buf, b""
            if not rest:
                return []
            out = self._events(rest)  # non-strip: these bytes were sent already
            return [out] if self.strip and out else []
        buf = self._buf + piece if self._buf else piece
        end = last_event_end(buf)
        complete, self._buf = buf[:end], buf[end:]
        # byte checks first: OpenAI puts `"usage":null` on every chunk, so `"usage"` alone is common
        if complete and _USAGE in complete and _USAGE_OBJECT.search(complete):
            complete = self._events(complete)
        if not self.strip:
            return [piece]
        return [complete] if complete else []

    def _events(self, data: bytes) -> bytes:
        """Look at each event in `data` that carries a usage object; return `data` as the client gets it."""
        out: list[bytes] = []
        pos = 0
        for m in _EVENT.finditer(data):
            out.append(self._event(m.group()))
            pos = m.end()
        if pos < len(data):  # a final event without its blank line (end of stream only)
            out.append(self._event(data[pos:]))
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        if not _USAGE_OBJECT.search(event):
            return event
        payload = b"\n".join(
            line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
        )
        try:
            chunk = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return event
        if not isinstance(chunk, dict):
            return event
        usage = usage_from_dict(chunk.get("usage"))
        if usage is None:
            return event
        self.usage = usage
        if not self.strip:
            return event
        if chunk.get("choices") == []:
            return b""  # the usage-only chunk the client did not ask for
        del chunk["usage"]  # DeepSeek: usage on the last content chunk; keep the content
        return encode_data(chunk)


def last_event_end(buf: bytes) -> int:
    """Offset just past the last complete SSE event in `buf` (0 if none)."""
    lf = buf.rfind(b"\n\n")
    cr = buf.rfind(b"\r\r")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, cr + 2 if cr >= 0 else 0, crlf + 4 if crlf >= 0 else 0)

