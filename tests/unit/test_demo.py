"""demo/: its keys point only at the local fake provider, and its banner has words for every limit a
key can carry. Running ./run.sh demo: tests/e2e/test_demo.py."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from addon.policy.keys_parse import POLICY_FIELDS
from demo import __main__ as demo
from demo.__main__ import keys_file


def test_the_demo_keys_point_only_at_the_local_fake():
    keys = keys_file("http://127.0.0.1:5")
    endpoints = [t for k in keys["virtual_keys"].values() for t in k.get("targets", [k])]  # a key, or its targets
    urls = [p["base_url"] for p in keys["providers"].values()] + [t.get("base_url", "") for t in endpoints]
    assert {urlsplit(u).hostname for u in urls if u} == {"127.0.0.1"}
    assert {t["provider"] for t in endpoints} == {"openai", "anthropic", "deepseek"}



def test_the_banner_has_words_for_every_limit_a_key_can_carry():
    assert POLICY_FIELDS <= demo.LIMIT_WORDS.keys()
    entry = {
        "provider": "openai",
        "models": ["gpt-4o"],
        "rpm": 5,
        "tpm": 900,
        "max_parallel": 2,
        "max_output_tokens": 300,
        "budget_usd": 2.5,
        "budget_tokens": 1000,
        "budget_period": "1d",
        "expires_at": "2027-01-01",
        "disabled": True,
    }
    assert demo.limits(entry) == [
        "only gpt-4o",
        "5 requests a minute",
        "900 tokens a minute",
        "2 requests at once",
        "answers of at most 300 tokens",
        "a $2.5 budget per 1d",
        "a 1000-token budget per 1d",
        "expires 2027-01-01",
        "disabled",
    ]
    with pytest.raises(ValueError):  # a field the banner cannot name is not left out silently
        demo.limits({"provider": "openai", "some_new_limit": 1})


def test_a_client_hanging_up_mid_stream_prints_no_traceback(capfd):
    """`curl -sN ... | head` closes the stream early; the gateway then closes its connection to the
    fake provider, whose next write fails: no traceback from the demo (socketserver prints one)."""
    import json
    import socket
    import time

    from demo import provider as fake

    server = fake.start()
    try:
        body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
        with socket.create_connection(server.server_address, timeout=5) as sock:
            sock.sendall(f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         f"{fake.KEYS['openai']}\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
            assert b" 200 " in sock.recv(65536).split(b"\r\n", 1)[0]  # the stream began
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # a reset
        time.sleep(20 * fake.STREAM_DELAY + 0.3)  # every event the handler would still write
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Broken pipe" not in err and "Connection reset" not in err, err
