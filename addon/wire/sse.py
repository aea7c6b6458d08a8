"""Incremental Server-Sent Events framing.

`SSEDecoder.feed(piece)` takes body pieces split anywhere (mid-line, mid-CRLF, mid-UTF-8
character) and returns the complete events they finish, as (event name, data) pairs. Nothing is
held back except an incomplete event.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring, encode_basestring_ascii


class SSEDecoder:
    __slots__ = ("_buf", "_event", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, piece: bytes) -> list[tuple[str | None, str]]:
        buf = self._buf + piece if self._buf else piece
        events: list[tuple[str | None, str]] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line, events)
        self._buf = buf[start:]
        return events

    def flush(self) -> list[tuple[str | None, str]]:
        """At end of stream: a final event without its blank line still counts."""
        events: list[tuple[str | None, str]] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r"), events)
            self._buf = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list) -> None:
        if not line:
            if self._data or self._event is not None:
                events.append((self._event, "\n".join(self._data)))
            self._event = None
            self._data = []
            return
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")


def json_encoder(item_separator: str, key_separator: str) -> Callable[[object], str]:
    """`json.JSONEncoder(separators=..., ensure_ascii=False).encode`, with its C encoder built
    once. JSONEncoder.encode builds a new one (nine arguments, a markers dict) on every call:
    on the Anthropic path that setup cost 28k instructions per request (bench/instructions.py)
    and ~15-50 us in the running proxy (bench/ab.py, c=1). No circular-reference check: what
    the gateway encodes was parsed from JSON or built from it, so it has no cycles."""
    stdlib = json.JSONEncoder(separators=(item_separator, key_separator), ensure_ascii=False)
    if c_make_encoder is None:  # a Python without the json C accelerator
        return stdlib.encode
    encoder = c_make_encoder(None, stdlib.default, encode_basestring, None, key_separator, item_separator,
                             False, False, True)  # sort_keys, skipkeys, allow_nan as JSONEncoder's defaults

    def encode(obj: object) -> str:
        return "".join(encoder(obj, 0))

    return encode


# compact, UTF-8 as it is
compact_json = json_encoder(",", ":")
_ascii_json = json.JSONEncoder(separators=(",", ":")).encode


class _Large(threading.local):
    on = False  # this thread encodes a large body: in pieces (json_bytes)


large_bodies = _Large()
PIECE = 256 * 1024  # characters of a string, or of a container's direct strings, encoded in one C call


def json_bytes(obj: object) -> bytes:
    """compact_json as UTF-8 bytes. A string holding an unpaired surrogate (JSON's "\\ud800"
    escape parses to one) has no UTF-8 form: then every non-ASCII character is escaped, as the
    sender's JSON had it, instead of failing. In a thread that prepares a large body
    (`large_bodies.on`), in pieces: the same bytes (json_pieces)."""
    if large_bodies.on:
        return json_pieces(obj)
    try:
        return compact_json(obj).encode()
    except UnicodeEncodeError:
        return _ascii_json(obj).encode()


def json_pieces(obj: object) -> bytes:
    """json_bytes(obj), made without one C call over the whole of it: the C encoder holds the GIL
    for as long as it runs (about 300 ms for 31 MB), which stalls the event loop as surely as
    running there. Here no call encodes more than about PIECE characters of strings (a longer
    string is cut), and between calls the loop may run."""
    out: list[bytes] = []
    try:
        _pieces(obj, out, compact_json, encode_basestring)
    except UnicodeEncodeError:  # as json_bytes: every non-ASCII character escaped, everywhere
        out = []
        _pieces(obj, out, _ascii_json, encode_basestring_ascii)
    return b"".join(out)


def _pieces(obj: object, out: list[bytes], encode: Callable[[object], str], quote: Callable[[str], str]) -> None:
    kind = type(obj)
    if kind is str:
        if len(obj) <= PIECE:
            out.append(encode(obj).encode())
            return
        out.append(b'"')
        for start in range(0, len(obj), PIECE):
            out.append(quote(obj[start:start + PIECE])[1:-1].encode())
        out.append(b'"')
    elif (kind is dict or kind is list) and not _small(obj):
        if kind is dict:
            out.append(b"{")
            for i, (name, value) in enumerate(obj.items()):
                out.append((b"," if i else b"") + encode(name).encode() + b":")
                _pieces(value, out, encode, quote)
            out.append(b"}")
        else:
            out.append(b"[")
            for i, value in enumerate(obj):
                if i:
                    out.append(b",")
                _pieces(value, out, encode, quote)
            out.append(b"]")
    else:
        out.append(encode(obj).encode())


def _small(container: dict | list) -> bool:
    """Encoded in one call: a container of scalars whose strings (keys too) total at most PIECE."""
    total = 0
    for item in (container.items() if type(container) is dict else container):
        for value in (item if type(container) is dict else (item,)):
            kind = type(value)
            if kind is str:
                total += len(value)
                if total > PIECE:
                    return False
            elif kind is dict or kind is list:
                return False
    return True


def encode_data(obj: dict) -> bytes:
    """One `data:` event carrying compact JSON."""
    return b"data: " + json_bytes(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"
