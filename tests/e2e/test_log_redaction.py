"""No key reaches a real gateway's log, not even through mitmproxy's own line about a client that
hung up mid-headers. The filter itself: tests/unit/hooks/test_log_redaction.py."""

from __future__ import annotations

import socket
import time

import pytest
from tests.conftest import keys_for


VK = "vk_user_secret_7f3a"
REAL = "sk-real-provider-key-123456"


@pytest.mark.e2e
def test_a_client_that_hangs_up_mid_headers_leaves_no_key_in_the_gateway_log(provider, gateway_factory):
    keys = keys_for(provider, {VK: {"name": "alice", "provider": "openai", "api_key": REAL}})
    gw = gateway_factory(keys, ["--set", "termlog_verbosity=debug", "--set", "proxy_debug=true"])
    for header in (f"Authorization: Bearer {VK}", f"x-api-key: {VK}", "Authorization: Bearer vk_unknown_guess_42"):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode())
            time.sleep(0.2)  # let the gateway read it before the hang-up
    deadline = time.monotonic() + 10
    while gw.log().count("before completing request headers") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    log = gw.log()
    assert log.count("before completing request headers") == 3  # the line is there...
    assert VK not in log and "vk_unknown_guess_42" not in log and REAL not in log  # ...without the keys
    assert "Bearer vk_...f3a" in log
