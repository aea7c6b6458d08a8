"""Request bodies with a content-encoding are decoded only up to max_request_mb: round trips of
addon/wire/bounded.py against mitmproxy's own codecs. Bombs sent to a real gateway:
tests/e2e/test_decompression.py."""

from __future__ import annotations

import gzip
import json
import os
import zlib

import brotli
import pytest
from mitmproxy.net import encoding

from addon.wire import bounded
from addon.wire.bounded import TooLarge, zstd

MB = 1024 * 1024
GiB = 1024 * MB
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": os.urandom(4000).hex()}] * 20}
).encode()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_decodes_what_mitmproxy_encodes_and_stops_one_byte_past_the_limit(coding):
    encoded = encoding.encode(BODY, coding)
    assert bounded.decode(encoded, coding, len(BODY)) == BODY
    with pytest.raises(TooLarge):
        bounded.decode(encoded, coding, len(BODY) - 1)
    with pytest.raises(ValueError):
        bounded.decode(b"not compressed at all" * 5, coding, GiB)


def test_codings_lists_raw_deflate_and_zstd_frames():
    assert bounded.decode(brotli.compress(gzip.compress(BODY)), "gzip, br", len(BODY) * 2) == BODY
    assert bounded.decode(zlib.compress(BODY)[2:-4], "deflate", len(BODY)) == BODY  # no zlib wrapper
    assert bounded.decode(zstd.compress(BODY[:10]) + zstd.compress(BODY[10:]), "zstd", len(BODY)) == BODY
    assert bounded.decode(BODY, "identity", 1) == BODY
    with pytest.raises(ValueError):
        bounded.decode(BODY, "compress", GiB)
    for coding in ("br", "zstd"):
        with pytest.raises(ValueError) as e:
            bounded.decode(encoding.encode(BODY, coding)[:-20], coding, GiB)
        assert not isinstance(e.value, TooLarge)
















