"""Request size limits (trailers included), through a real gateway process.

Attacks are reproduced on loopback, bounded in size; memory is read from /proc/PID/status of the
gateway under test (VmHWM: the peak, so a body buffered and freed again still shows).
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

from tests import rawhttp
from tests.conftest import keys_for

pytestmark = pytest.mark.e2e

REAL = "sk-limits-real-key-0123456789"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory):
    return gateway_factory(keys_for(provider_server, {"vk_limits": {"provider": "openai", "api_key": REAL}}))


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def send_raw(port: int, head: bytes, body_pieces=(), timeout: float = 30) -> tuple[int | None, bytes]:
    """Send a request head and body pieces until the gateway stops reading; then read what it
    answered. (status or None for no answer, raw answer bytes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            sock.sendall(head)
            for piece in body_pieces:
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + content_length(data):
                got = sock.recv(65536)
                if not got:
                    break
                data += got
        except (ConnectionResetError, socket.timeout):
            pass
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
        return status, data
    finally:
        sock.close()


def content_length(data: bytes) -> int:
    head = data.partition(b"\r\n\r\n")[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def chat_head(length: int | None, key: str | None = None, extra: bytes = b"") -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/1.1", b"Host: gw", b"Content-Type: application/json"]
    if key:
        lines.append(b"Authorization: Bearer " + key.encode())
    lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def pieces(total: int, size: int = MB, chunked: bool = False):
    block = b"x" * size
    sent = 0
    while sent < total:
        piece = block[: min(size, total - sent)]
        sent += len(piece)
        yield b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def in_parallel(*calls):
    results = [None] * len(calls)

    def run(i, call):
        results[i] = call()
    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_keyless_uploads_are_refused_on_headers_and_never_buffered(gateway, provider):
    pid = gateway.proc.pid
    assert rawhttp.request(gateway.url, "GET", "/health").status_code == 200
    baseline = memory_kb(pid, "VmHWM")
    port = gateway.port
    results = in_parallel(
        # 4 x 200 MB declared: refused at once (401), the connection closed after the answer
        *[lambda: send_raw(port, chat_head(200 * MB), pieces(200 * MB)) for _ in range(4)],
        # 3 x 30 MB (under the limit) with a wrong key: 401 at once too (over 1 MB), the rest read and dropped
        *[lambda: send_raw(port, chat_head(30 * MB, "vk_wrong"), pieces(30 * MB)) for _ in range(3)],
        # 2 x 100 MB chunked, no key: dropped until 1 MB was read, then 401 and closed
        *[lambda: send_raw(port, chat_head(None), pieces(100 * MB, chunked=True)) for _ in range(2)],
    )
    for status, data in results:
        assert status == 401, data[:300]
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] in ("missing_api_key", "invalid_api_key")
    grown_mb = (memory_kb(pid, "VmHWM") - baseline) / 1024
    # 950 MB were sent; one buffered body of the 30 MB ones alone would be 60 MB (buffer + copy)
    assert grown_mb < 50, f"peak RSS grew {grown_mb:.0f} MB"
    assert provider.received == []
    assert rawhttp.request(gateway.url, "GET", "/health").status_code == 200


def test_a_refused_small_body_keeps_the_connection_usable(gateway, provider):
    conn = __import__("http.client").client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 100_000}]})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"authorization": "Bearer vk_nope"})
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["error"]["code"] == "invalid_api_key"
    conn.request("POST", "/v1/chat/completions", body=body, headers={"authorization": "Bearer vk_limits"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    conn.close()
    [got] = provider.received
    assert json.loads(got.body) == json.loads(body) and got.headers["authorization"] == f"Bearer {REAL}"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_max_request_mb_gets_413_and_is_not_forwarded(gateway, provider, chunked):
    pid = gateway.proc.pid
    baseline = memory_kb(pid, "VmHWM")
    status, data = send_raw(gateway.port, chat_head(None if chunked else 100 * MB, "vk_limits"),
                            pieces(100 * MB, chunked=chunked))
    assert status == 413, data[:300]
    err = json.loads(data.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "request_too_large" and "32 MB" in err["message"]
    assert provider.received == []
    # chunked: read up to the limit (32 MB) before refusing, and that buffer is the peak
    assert (memory_kb(pid, "VmHWM") - baseline) / 1024 < 120


def test_header_blocks_that_never_end_get_431(gateway):
    pid = gateway.proc.pid
    baseline = memory_kb(pid, "VmHWM")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Filler: "
    results = in_parallel(*[lambda: send_raw(gateway.port, head, pieces(50 * MB, size=64 * 1024)) for _ in range(4)])
    for status, data in results:
        assert status == 431, data[:300]
    assert (memory_kb(pid, "VmHWM") - baseline) / 1024 < 50
    assert rawhttp.request(gateway.url, "GET", "/health").status_code == 200


def test_a_chunked_request_with_trailers_gets_400_not_silence(gateway, provider):
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    chunked = b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(body), body)
    status, data = send_raw(gateway.port, chat_head(None, "vk_limits"), [chunked], timeout=10)
    assert status == 400, data
    assert "trailers" in json.loads(data.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert provider.received == []
