"""An authenticated client cannot make the gateway hold its bodies (docs/hardening.md, "Memory"):
rpm, max_parallel and a budget already used up refuse at the request's headers, before the body
is read (requests of the key whose bodies are being read count as admitted), and past
max_buffered_mb of request bytes held at once, a request gets a 503 in its API's error shape.
Through real gateways; each refusal must come while the client has sent no body at all, or only
part of it: the old gateway read the whole body first (and so answered nothing here)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import keys_for, openai_key
from tests.fakeprovider import Reply, openai_completion

pytestmark = pytest.mark.e2e

MB = 1024 * 1024


def head(length: int | None, key: str, path: bytes = b"/v1/chat/completions") -> bytes:
    lines = [
        b"POST " + path + b" HTTP/1.1",
        b"Host: gw",
        b"Content-Type: application/json",
        b"Authorization: Bearer " + key.encode(),
        b"anthropic-version: 2023-06-01",
    ]
    lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def read_by_gateway(gw_port: int, client: socket.socket, timeout: float = 20) -> None:
    """Waits until the gateway's side of `client`'s connection has nothing left unread in the
    kernel (/proc/net/tcp's rx_queue): what the client sent is then in the gateway (at most the
    asyncio reader's 64-128 KiB not yet handed on), not merely in a socket buffer."""
    local = "%04X" % gw_port
    remote = "%04X" % client.getsockname()[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":" + local) and fields[2].endswith(":" + remote):
                if int(fields[4].split(":")[1], 16) == 0:
                    return
        time.sleep(0.05)
    raise AssertionError("the gateway did not read what the client sent")


def body(size: int) -> bytes:
    """A chat request of about `size` bytes."""
    pad = max(0, size - 120)
    return json.dumps(
        {"model": "gpt-4o-mini", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * pad}]}
    ).encode()


def answer_of(sock: socket.socket, timeout: float = 10) -> tuple[int | None, dict | None]:
    """The status and JSON body the gateway answered on `sock` within `timeout`, (None, None) if none."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + length_of(data):
            got = sock.recv(65536)
            if not got:
                break
            data += got
    except (socket.timeout, ConnectionResetError):
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, None
    payload = data.partition(b"\r\n\r\n")[2]
    return int(data.split(b" ", 2)[1]), json.loads(payload) if payload else None


def length_of(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def headers_only(
    port: int, length: int, key: str, path: bytes = b"/v1/chat/completions"
) -> tuple[int | None, dict | None]:
    """Send a request's head (announcing `length` body bytes) and nothing more: what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head(length, key, path))
        return answer_of(sock)


def send(port: int, key: str, payload: bytes) -> tuple[int | None, dict | None]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head(len(payload), key) + payload)
        return answer_of(sock, 30)


def test_an_rpm_full_key_is_refused_at_its_headers(provider, gateway_factory):
    gw = gateway_factory(keys_for(provider, {"vk_rpm": openai_key("sk-early-rpm-000001", rpm=1)}))
    assert send(gw.port, "vk_rpm", body(200))[0] == 200
    status, error = headers_only(gw.port, 20 * MB, "vk_rpm")  # 20 MB announced, none sent
    assert status == 429 and error["error"]["code"] == "rate_limit_exceeded", (status, error)
    assert len(provider.received) == 1


def test_bodies_being_read_count_toward_rpm(provider, gateway_factory):
    """rpm 2: two requests whose 8 MB bodies are half sent hold both slots; a third is refused at
    its headers, and the two are admitted once their bodies are in."""
    gw = gateway_factory(keys_for(provider, {"vk_rpm2": openai_key("sk-early-rpm-000002", rpm=2)}))
    payload = body(8 * MB)
    socks = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(2)]
    try:
        for sock in socks:
            sock.sendall(head(len(payload), "vk_rpm2") + payload[: 4 * MB])
        status, error = headers_only(gw.port, len(payload), "vk_rpm2")
        assert status == 429 and error["error"]["code"] == "rate_limit_exceeded", (status, error)
        for sock in socks:
            sock.sendall(payload[4 * MB :])
        assert [answer_of(sock, 30)[0] for sock in socks] == [200, 200]
    finally:
        for sock in socks:
            sock.close()
    assert len(provider.received) == 2


def test_a_key_at_its_max_parallel_is_refused_at_its_headers(provider, gateway_factory):
    gw = gateway_factory(keys_for(provider, {"vk_par": openai_key("sk-early-par-000001", max_parallel=1)}))
    release = threading.Event()
    provider.reset(lambda r: Reply.json(openai_completion(r.json())) if release.wait(30) else Reply(500))
    first = threading.Thread(target=send, args=(gw.port, "vk_par", body(200)))
    first.start()
    try:
        assert provider.wait_received(1)
        status, error = headers_only(gw.port, 20 * MB, "vk_par")
        assert status == 429 and error["error"]["code"] == "concurrency_limit_exceeded", (status, error)
    finally:
        release.set()
        first.join(30)


def test_a_budget_already_used_up_is_refused_at_the_headers(provider, gateway_factory):
    gw = gateway_factory(keys_for(provider, {"vk_budget": openai_key("sk-early-budget-0001", budget_tokens=300)}))

    def expensive(r):
        reply = openai_completion(r.json())
        reply["usage"] = {"prompt_tokens": 500, "completion_tokens": 1, "total_tokens": 501}
        return Reply.json(reply)

    provider.reset(expensive)
    assert send(gw.port, "vk_budget", body(150))[0] == 200  # held ~151, spent 501: the budget is used up
    for path in (b"/v1/chat/completions", b"/v1/messages"):
        status, error = headers_only(gw.port, 20 * MB, "vk_budget", path)
        assert status == 429, (status, error)
        message = error["error"]["message"]
        assert "used up" in message and "501 of 300" in message, message
    assert len(provider.received) == 1


def test_past_max_buffered_mb_a_request_gets_a_503_in_its_apis_shape(provider, gateway_factory):
    keys = keys_for(provider, {"vk_a": openai_key("sk-early-buffer-0001"), "vk_b": openai_key("sk-early-buffer-0002")})
    gw = gateway_factory(keys, ["--set", "max_buffered_mb=8"])
    # announced past the cap: at the headers, nothing read
    status, error = headers_only(gw.port, 10 * MB, "vk_a")
    assert (
        status == 503 and error["error"]["code"] == "gateway_busy" and "max_buffered_mb 8" in error["error"]["message"]
    )
    status, error = headers_only(gw.port, 10 * MB, "vk_a", b"/v1/messages")
    assert status == 503 and error["type"] == "error" and error["error"]["type"] == "api_error", error
    # under it alone, but not with another body held: A's 5 MB are in, B's chunked body passes the cap
    a_payload = body(6 * MB)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as a:
        a.sendall(head(len(a_payload), "vk_a") + a_payload[: 5 * MB])
        read_by_gateway(gw.port, a)  # (else B's bytes may be counted first, and A is the one past the cap)
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as b:
            b.sendall(head(None, "vk_b"))
            b_payload = body(6 * MB)
            for start in range(0, len(b_payload), MB):
                piece = b_payload[start : start + MB]
                try:
                    b.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                except (BrokenPipeError, ConnectionResetError):
                    break
            status, error = answer_of(b)
            assert status == 503 and error["error"]["code"] == "gateway_busy", (status, error)
        a.sendall(a_payload[5 * MB :])  # A was never refused: it goes through
        assert answer_of(a, 30)[0] == 200
    assert [json.loads(r.body)["messages"][0]["content"][:3] for r in provider.received] == ["xxx"]
    # every byte counted was released: the cap's worth goes through again
    assert send(gw.port, "vk_b", body(7 * MB))[0] == 200
