"""Decompression bombs (a 1.6 KB brotli body that decodes to 1 GiB, and gzip, double gzip and zstd
ones) sent to a real gateway: 413, nothing forwarded, the gateway's peak RSS barely moves. The
bounded decoder's round trips: tests/unit/wire/test_decompression.py."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import zlib

import brotli
import pytest

from addon.wire import bounded
from addon.wire.bounded import zstd
from tests.fakeprovider import Reply, openai_completion
from tests.e2e.test_limits import memory_kb
from tests.conftest import keys_for, openai_key

MB = 1024 * 1024
GiB = 1024 * MB
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": os.urandom(4000).hex()}] * 20}
).encode()


def zeros(total: int, piece: int = 64 * MB):
    for _ in range(total // piece):
        yield b"\0" * piece


def gzip_bomb(size: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(c.compress(z) for z in zeros(size)) + c.flush()


def brotli_bomb(size: int) -> bytes:
    c = brotli.Compressor(quality=5)
    return b"".join(c.process(z) for z in zeros(size)) + c.finish()


def zstd_bomb(size: int) -> bytes:
    c = zstd.ZstdCompressor(level=3)
    return b"".join(c.compress(z) for z in zeros(size)) + c.flush()


@pytest.fixture(scope="module")
def bombs():
    gz = gzip_bomb(GiB)
    return {
        "br": ("br", brotli_bomb(GiB)),
        "gzip": ("gzip", gz),
        "gzip, gzip": ("gzip, gzip", gzip.compress(gz, 9)),
        "zstd": ("zstd", zstd_bomb(GiB)),
    }


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory):
    return gateway_factory(keys_for(provider_server, {"vk_bombs": openai_key("sk-bombs-real-000001")}))


def post(gateway, body: bytes, coding: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body,
            {"content-type": "application/json", "content-encoding": coding, "authorization": "Bearer vk_bombs"},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.e2e
def test_decompression_bombs_get_413_before_they_are_decoded_whole(gateway, provider, bombs):
    assert len(bombs["br"][1]) < 2048  # 1 GiB in under 2 KB
    assert len(bombs["gzip, gzip"][1]) < 8192
    pid = gateway.proc.pid
    # the fake provider does not decode bodies: it answers every request
    provider.reset(handler=lambda req: Reply.json(openai_completion({"model": "gpt-4o-mini"})))
    status, body = post(gateway, gzip.compress(BODY), "gzip")  # warm up: a compressed body that fits goes through
    assert status == 200, body
    [got] = provider.received
    assert json.loads(bounded.decode(got.body, got.headers.get("content-encoding", ""), MB)) == json.loads(BODY)
    provider.received.clear()
    baseline = memory_kb(pid, "VmHWM")
    for name, (coding, bomb) in bombs.items():
        status, body = post(gateway, bomb, coding)
        assert status == 413, (name, body)
        assert body["error"]["code"] == "request_too_large"
    grown_mb = (memory_kb(pid, "VmHWM") - baseline) / 1024
    assert grown_mb < 200, f"peak RSS grew {grown_mb:.0f} MB decoding 4 bombs of 1 GiB each"
    assert provider.received == []
    status, _ = post(gateway, brotli.compress(BODY), "br")
    assert status == 200
    assert len(provider.received) == 1
