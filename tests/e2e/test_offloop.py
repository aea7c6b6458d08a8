"""A large body's decoding and JSON parse run in a worker thread, so
the gateway keeps answering other clients meanwhile. No timing assertion: the test counts /health
answers that complete after a compressed body was sent and before the provider received it."""

from __future__ import annotations

import gzip
import json
import socket
import threading

import pytest

from tests import rawhttp
from tests.conftest import keys_for, openai_key

pytestmark = pytest.mark.e2e

# ~10 MB of JSON (a fraction of a second of json.loads), ~30 KB gzip-encoded: read at once, parsed slowly
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                   "metadata": {"x": [[0]] * 2_500_000}}).encode()


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory):
    return gateway_factory(keys_for(provider_server, {"vk_offloop": openai_key("sk-offloop-real-000001")}))


def test_health_is_answered_while_a_large_body_is_parsed(gateway, provider):
    encoded = gzip.compress(BODY, 9)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\nAuthorization: Bearer vk_offloop\r\nContent-Length: %d\r\n\r\n" % len(encoded))
    sent = threading.Event()
    answer = []

    def large():
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock:
            sock.sendall(head + encoded)
            sent.set()
            answer.append(sock.recv(65536))

    thread = threading.Thread(target=large)
    thread.start()
    assert sent.wait(60)
    during = 0
    while not provider.received and thread.is_alive():
        assert rawhttp.request(gateway.url, "GET", "/health").status_code == 200
        if not provider.received:
            during += 1
    thread.join(60)
    assert answer and answer[0].startswith(b"HTTP/1.1 "), answer
    [got] = provider.received
    assert got.body == encoded  # forwarded as the client encoded it
    assert during >= 3, f"only {during} /health answers while the large body was parsed"
