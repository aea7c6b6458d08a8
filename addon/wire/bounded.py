"""Content-encoding decoders that stop at a size limit: a decompression bomb stops there instead of filling memory.

mitmproxy's `message.content` decodes a whole body at once: a 1 KB brotli or gzip request body
can expand to gigabytes before anything looks at its size. `decode(data, encoding, limit)` decodes
incrementally with each codec's own output bound (zlib `max_length`, brotli
`output_buffer_limit`, zstd `max_length`) and raises TooLarge as soon as the output passes
`limit`, so no more than about `limit` bytes are ever held. Same codings and leniency as
mitmproxy.net.encoding (gzip with zlib's header auto-detection, deflate with or without the zlib
wrapper, br, zstd with concatenated frames); a list (`gzip, br`) is undone last coding first.
Pure functions over bytes: tested without mitmproxy.
"""

from __future__ import annotations

import sys
import zlib

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # mitmproxy's own dependency on 3.12/3.13
    from backports import zstd

_IDENTITY = {"", "identity", "none"}
STEP = 1024 * 1024  # decoded bytes per decoder call


class TooLarge(ValueError):
    """The decoded body would be larger than the limit."""


def decode(data: bytes, encoding: str, limit: int) -> bytes:
    """`data` with the content-encoding `encoding` removed; TooLarge past `limit` bytes of
    output, ValueError when it cannot be decoded."""
    codings = [c.strip().lower() for c in encoding.split(",")]
    for coding in reversed(codings):
        if coding in _IDENTITY:
            continue
        decoder = _DECODERS.get(coding)
        if decoder is None:
            raise ValueError(f"unknown content-encoding {coding[:32]!r}")
        if data:
            data = decoder(data, limit)
    return data


def _check(out: bytearray, limit: int) -> int:
    """The room left for output; TooLarge once past the limit."""
    if len(out) > limit:
        raise TooLarge(limit)
    # one byte more than fits (reaching it means too large), at most STEP per call: the pieces
    # are copied into `out`, so a bigger step would hold the output twice
    return min(limit + 1 - len(out), STEP)


def _zlib(data: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = bytearray()
    pending = data
    while not d.eof:
        try:
            piece = d.decompress(pending, _check(out, limit))
        except zlib.error as e:
            raise ValueError(f"decompression failed: {e}") from None
        if not piece and not pending:
            break  # all input used and nothing more comes out: a truncated stream (mitmproxy takes it too)
        out += piece
        pending = d.unconsumed_tail
    _check(out, limit)
    return bytes(out)


def _gzip(data: bytes, limit: int) -> bytes:
    return _zlib(data, 47, limit)  # 32 + 15: gzip or zlib header, as mitmproxy's decode_gzip


def _deflate(data: bytes, limit: int) -> bytes:
    try:
        return _zlib(data, 15, limit)
    except TooLarge:
        raise
    except ValueError:
        return _zlib(data, -15, limit)  # raw deflate without the zlib wrapper


def _brotli(data: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = bytearray()
    try:
        out += d.process(data, output_buffer_limit=_check(out, limit))
        while not d.can_accept_more_data():
            out += d.process(b"", output_buffer_limit=_check(out, limit))
    except brotli.error as e:
        raise ValueError(f"brotli decompression failed: {e}") from None
    _check(out, limit)
    if not d.is_finished():
        raise ValueError("brotli stream is truncated")
    return bytes(out)


def _zstd(data: bytes, limit: int) -> bytes:
    out = bytearray()
    try:
        while data:
            d = zstd.ZstdDecompressor()
            out += d.decompress(data, _check(out, limit))
            while not d.eof:
                if d.needs_input:
                    raise ValueError("zstd stream is truncated")
                out += d.decompress(b"", _check(out, limit))
            data = d.unused_data
    except zstd.ZstdError as e:
        raise ValueError(f"zstd decompression failed: {e}") from None
    _check(out, limit)
    return bytes(out)


_DECODERS = {"gzip": _gzip, "x-gzip": _gzip, "deflate": _deflate, "deflateraw": _deflate, "br": _brotli, "zstd": _zstd}
