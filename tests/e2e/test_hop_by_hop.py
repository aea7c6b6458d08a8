"""Hop-by-hop headers as RFC 9110 (7.6.1) says, and `x-gateway-attempts` on every answer of a key
with several targets.

A client's `Connection: authorization` must not be forwarded next to the real key: a compliant proxy
between the gateway and the provider would drop the real key (401, and a 600 s cooldown). The
gateway's own 502/504 pages for such a key carry `x-gateway-attempts` too.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import keys_for, openai_key
from tests.fakeprovider import Reply, openai_completion

pytestmark = pytest.mark.e2e

VK = "vk_hop_client_7777"
REAL = "sk-hop-real-key-8888"
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
HOP = ("keep-alive", "proxy-connection", "te", "upgrade")


def raw_request(port: int, headers: list[tuple[str, str]], body: bytes = BODY) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with exactly these headers (no client library adds or drops any)."""
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        top, _, rest = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers_out: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers_out[k.strip().lower()] = v.strip()
        length = int(headers_out.get("content-length", "0"))
        while len(rest) < length:
            piece = s.recv(65536)
            if not piece:
                break
            rest += piece
        return int(lines[0].split()[1]), headers_out, rest


@pytest.fixture
def gateway(provider, gateway_factory):
    return gateway_factory(keys_for(provider, {VK: openai_key(REAL, name="hop")}))


def test_a_clients_connection_header_names_nothing_the_gateway_sends(gateway, provider):
    status, _, _ = raw_request(gateway.port, [
        ("Authorization", f"Bearer {VK}"), ("Content-Type", "application/json"),
        ("Connection", "authorization, x-api-key, X-Custom, keep-alive"), ("x-api-key", VK), ("X-Custom", "1"),
        ("x-kept", "end-to-end"), ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"), ("TE", "trailers"),
        ("Upgrade", "h2c")])
    assert status == 200
    [got] = provider.received
    assert got.headers["authorization"] == f"Bearer {REAL}"  # the real key, and nothing says to drop it
    assert got.headers.get("connection", "keep-alive").lower() == "keep-alive", got.headers
    assert not {"x-custom", "x-api-key", *HOP} & set(got.headers), got.headers
    assert got.headers["x-kept"] == "end-to-end"  # what Connection does not name goes on


def test_connection_cannot_strip_the_framing_or_the_host(gateway, provider):
    """Content-Length and Host are for every recipient (RFC 9110 7.6.1): naming them does not
    remove them, the body arrives whole."""
    status, _, _ = raw_request(gateway.port, [
        ("Authorization", f"Bearer {VK}"), ("Content-Type", "application/json"),
        ("Connection", "content-length, host, content-type, close")])
    assert status == 200
    [got] = provider.received
    assert (
        got.body == BODY
        and got.headers["host"].startswith("127.0.0.1")
        and got.headers["content-type"] == "application/json"
    )
    assert got.headers.get("connection") == "close"  # the client's close stays: the connection's fate


def test_a_providers_hop_by_hop_headers_stay_on_its_hop(gateway, provider):
    provider.reset(lambda r: Reply(200, json.dumps(openai_completion(r.json())).encode(), {
        "content-type": "application/json", "connection": "x-provider-hop, keep-alive", "x-provider-hop": "1",
        "keep-alive": "timeout=5", "x-request-id": "req_42"}))
    status, headers, _ = raw_request(
        gateway.port, [("Authorization", f"Bearer {VK}"), ("Content-Type", "application/json")]
    )
    assert status == 200
    assert "x-provider-hop" not in headers and "keep-alive" not in headers, headers
    assert headers.get("connection", "keep-alive") == "keep-alive"
    assert headers["x-request-id"] == "req_42"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_answer_of_a_key_with_several_targets_says_how_many_attempts(provider, gateway_factory):
    dead = [f"http://127.0.0.1:{closed_port()}/v1", f"http://127.0.0.1:{closed_port()}/v1"]
    gw = gateway_factory(
        {
            "virtual_keys": {
                "vk_two_dead": {
                    "name": "two-dead",
                    "targets": [{"provider": "openai", "api_key": REAL, "base_url": url} for url in dead],
                },
                "vk_two_slow": {
                    "name": "two-slow",
                    "targets": [
                        {"provider": "openai", "api_key": REAL, "base_url": f"{provider.url}/{name}/v1"}
                        for name in ("a", "b")
                    ],
                },
            }
        },
        ["--set", "upstream_timeout=0.5"],
    )
    # the gateway's own 502: neither target could be reached
    status, headers, body = raw_request(
        gw.port, [("Authorization", "Bearer vk_two_dead"), ("Content-Type", "application/json")]
    )
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_unreachable", body
    assert headers.get("x-gateway-attempts") == "2", headers
    # then both cool down: the gateway answers 503 itself, no attempt made
    status, headers, body = raw_request(
        gw.port, [("Authorization", "Bearer vk_two_dead"), ("Content-Type", "application/json")]
    )
    assert status == 503 and json.loads(body)["error"]["code"] == "no_healthy_target", body
    assert headers.get("x-gateway-attempts") == "0", headers
    # the gateway's own 504: neither answered within upstream_timeout
    provider.reset(lambda r: Reply.json(openai_completion(r.json()), delay=3))
    status, headers, body = raw_request(
        gw.port, [("Authorization", "Bearer vk_two_slow"), ("Content-Type", "application/json")]
    )
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout", body
    assert headers.get("x-gateway-attempts") == "2", headers
    assert len(provider.received) == 2
