"""Wrapping a provider's stream translator for mitmproxy's response stream callable.

mitmproxy calls the callable with each received body piece, before content decoding, and once
with b"" at the end. This wrapper decodes gzip/deflate, fixes the framing headers for a body of
new length, and fails closed: if the translator raises, the client gets the inbound API's error
event (OpenAI: an error chunk and [DONE]) instead of untranslated provider bytes or a hung stream.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable

from addon.wire.errors import error_dict
from addon.wire.sse import DONE, encode_data

log = logging.getLogger("gateway")

# A stream translator takes one received body piece (b"" at the end) and returns what the
# client gets for it. It must never return b"" for a non-empty piece (that ends an HTTP/1.1
# chunked body); return [] instead.
StreamTranslator = Callable[[bytes], bytes | Iterable[bytes]]

_DECODERS = {"gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), "deflate": lambda: zlib.decompressobj()}


def frame_for_new_length(headers, http_version: str) -> None:
    """A streamed body whose length changes on the way (translated, or usage stripped) cannot
    keep the provider's content-length: the client would wait for bytes that never come."""
    headers.pop("content-length", None)
    if http_version == "HTTP/1.1":
        headers["transfer-encoding"] = "chunked"


def openai_stream_error(message: str, code: str = "gateway_error") -> list[bytes]:
    return [encode_data(error_dict(message, "server_error", code)), DONE]


def fail_closed_stream(translator: StreamTranslator, headers, http_version: str,
                       stream_error: Callable[[str], list[bytes]] = openai_stream_error):
    """Return the callable to assign to `flow.response.stream`; adjusts `headers` in place.
    `stream_error(message)` makes the events that end a stream whose translation failed."""
    encoding = headers.get("content-encoding", "").strip().lower()
    decoder = _DECODERS[encoding]() if encoding in _DECODERS else None
    if decoder is not None:
        del headers["content-encoding"]
    frame_for_new_length(headers, http_version)
    failed = False

    def stream(piece: bytes) -> bytes | Iterable[bytes]:
        nonlocal failed
        if failed:
            return [] if piece else b""
        try:
            if decoder is not None:
                data = decoder.decompress(piece) if piece else decoder.flush()
                if piece and not data:
                    return []
                out = translator(data) if data else []
                if not piece:
                    out = _concat(out, translator(b""))
            else:
                out = translator(piece)
        except Exception:
            log.exception("gateway: stream translation failed; ending the stream with an error")
            failed = True
            return stream_error("the gateway could not translate the provider stream")
        if piece and out == b"":
            return []  # b"" would end an HTTP/1.1 chunked body early
        return out

    return stream


def _concat(a: bytes | Iterable[bytes], b: bytes | Iterable[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for part in (a, b):
        if isinstance(part, (bytes, bytearray)):
            if part:
                out.append(bytes(part))
        else:
            out.extend(p for p in part if p)
    return out
