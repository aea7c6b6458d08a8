"""No request can forge a log line: what a client chose (model, path, header bytes) is escaped in
the gateway's output, whatever line break, terminal escape or field it carries.

A real gateway, its real output: the attack of the second hardening round was a model name
holding `\\n[..] gateway: 200 key=FORGED-ADMIN ... tokens=999999/999999`, which the access log
wrote raw as a line of its own.
"""

from __future__ import annotations

import re
import socket
import time

import openai
import pytest
from tests.conftest import keys_for

pytestmark = pytest.mark.e2e

VK = "vk_victim_log_3141592"
FORGED = "[12:00:00.000] gateway: 200 key=FORGED-ADMIN provider=openai model=gpt-4o tokens=999999/999999 latency=1ms"
# what str.splitlines() (and so most log readers) takes for the end of a line, and what a
# terminal does with an escape: erase the line, back to column 1, red
BREAKS = {"LF": "\n", "CR": "\r", "CRLF": "\r\n", "NEL": "\x85", "LS": "\u2028", "PS": "\u2029",
          "VT": "\x0b", "FF": "\x0c", "FS": "\x1c", "ANSI": "\x1b[2K\x1b[1G\x1b[31m"}
RAW = ("\r", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1b")
# a record's start: its time, for mitmproxy's own lines the client's address, then who speaks
RECORD = re.compile(r"^\[\d\d:\d\d:\d\d\.\d{3}\](?:\[127\.0\.0\.1:\d+\])? (?:gateway: |Client closed )")


@pytest.fixture
def gateway(provider, gateway_factory):
    return gateway_factory(keys_for(provider, {
            VK: {"provider": "openai", "api_key": "sk-log-real-key-271828", "name": "victim"},
            "vk_limited_log_1618": {"provider": "openai", "api_key": "sk-log-real-key-271828", "name": "limited",
                                    "models": ["gpt-4o-mini"]},
        }))


def raw(port: int, head: bytes, close_early: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        if close_early:
            return b""
        data = b""
        while b"\r\n\r\n" not in data:
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
        return data


def wait_for(gw, count: int, needle: str) -> str:
    """The output once `count` lines hold `needle` (access lines come with the next accounting
    batch), at most 10 s."""
    deadline = time.monotonic() + 10
    text = gw.log()
    while text.count(needle) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        text = gw.log()
    return text


def test_no_client_field_can_start_end_or_recolour_a_log_line(gateway, provider):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=VK, max_retries=0)
    limited = openai.OpenAI(base_url=gateway.url + "/v1", api_key="vk_limited_log_1618", max_retries=0)
    for brk in BREAKS.values():
        client.chat.completions.create(model=f"gpt-4o{brk}{FORGED}", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.PermissionDeniedError):  # a refusal's line names the model too
            limited.chat.completions.create(model=f"gpt-4o{brk}{FORGED}", messages=[{"role": "user", "content": "hi"}])
    # a second field on the same line
    client.chat.completions.create(model="gpt-4o key=FORGED-ADMIN tokens=999999/999999",
                                   messages=[{"role": "user", "content": "hi"}])
    assert len(provider.received) == len(BREAKS) + 1
    # paths, as raw bytes on the request line (no key: logged as they came); an HTTP/1 request
    # target cannot hold a space, CR, LF, VT or FF (mitmproxy splits the line at them: a 400)
    paths = [
        b"/v1/nothing\xe2\x80\xa8FORGED-PATH",
        b"/v1/nothing\xe2\x80\xa9FORGED-PATH",
        b"/v1/nothing\xc2\x85FORGED-PATH",
        b"/v1/nothing\x85FORGED-PATH",
        b"/v1/nothing\x1b[2K\x1b[1GFORGED-PATH",
    ]
    for path in paths:
        answer = raw(gateway.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    # header bytes: mitmproxy logs a head the client broke off
    raw(gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nx-note: \xe2\x80\xa8" + FORGED.encode() +
        b"\x1b[2K\r\nAuthorization: Bearer " + VK.encode(), close_early=True)

    text = wait_for(gateway, 2 * len(BREAKS) + 1 + len(paths), "FORGED")
    for char in RAW:
        assert char not in text, f"{char!r} reached the log"
    lines = text.splitlines()
    forged = [line for line in lines if "FORGED" in line]
    assert len(forged) >= 2 * len(BREAKS) + 1 + len(paths), text
    for line in forged:
        # the only lines that name FORGED are the gateway's own, about the real key or a path
        assert RECORD.match(line), line
        assert " key=victim " in line or " key=limited " in line or "FORGED-PATH" in line or "Client closed" in line, (
            line
        )
        assert not line.startswith("[12:00:00.000]"), line
    # what the client sent is there, escaped, and the model with a space is one quoted field
    assert 'model="gpt-4o\\n[12:00:00.000] gateway: 200 key=FORGED-ADMIN' in text
    assert 'model="gpt-4o\\u2028[12:00:00.000]' in text and 'model="gpt-4o\\x85[12:00:00.000]' in text
    assert 'model="gpt-4o\\x1b[2K\\x1b[1G\\x1b[31m[12:00:00.000]' in text
    assert 'model="gpt-4o key=FORGED-ADMIN tokens=999999/999999"' in text
    assert "403 model_not_allowed key=limited" in text
    assert "404 unknown_path GET /v1/nothing\\u2028FORGED-PATH latency=" in text
    assert "404 unknown_path GET /v1/nothing\\udc85FORGED-PATH latency=" in text  # a lone byte: a surrogate escape
    assert "/v1/nothing\\x1b[2K\\x1b[1GFORGED-PATH" in text
    # every access line about the victim's requests is one line, with its latency at the end
    victim = [line for line in lines if " key=victim " in line]
    assert len(victim) == len(BREAKS) + 1 and all(line.endswith("ms") for line in victim), victim
    assert VK not in text
