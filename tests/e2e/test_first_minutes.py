"""What a new user sees first: the start-up line, one access-log line per request, and which side
(gateway or provider) refused a request."""

from __future__ import annotations

import re
import socket
import threading
import time

import anthropic
import openai
import pytest

from tests.fakeprovider import Reply
from tests.conftest import keys_for

pytestmark = pytest.mark.e2e

REAL = "sk-first-minutes-real-key-7777"
VK = "vk_first_minutes_client_key"


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory):
    return gateway_factory(
        keys_for(
            provider_server,
            {
                VK: {"provider": "openai", "api_key": REAL, "name": "team-a", "models": ["gpt-4o"]},
                "vk_first_minutes_anthropic": {
                    "provider": "anthropic",
                    "api_key": "sk-ant-x",
                    "base_url": provider_server.url,
                },
                "vk_first_minutes_deepseek": {"provider": "deepseek", "api_key": "sk-ds-x", "name": "ds"},
                "vk_first_minutes_other": {"provider": "openai", "api_key": "sk-o-x", "name": "other"},
            },
        )
    )


def client(gateway, key=VK):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def wait_for(gateway, pattern: str, timeout: float = 10) -> str:
    """The access line of a counted request comes with the next accounting batch (0.2 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, gateway.log(), re.M)
        if m:
            return m.group(0)
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r} in:\n{gateway.log()}")


def test_start_up_line_names_the_endpoint_and_the_keys(gateway):
    assert (f"gateway: OpenAI-compatible endpoint http://127.0.0.1:{gateway.port}/v1 — "
            "4 virtual keys (openai 2, anthropic 1, deepseek 1)") in gateway.log()


def test_one_access_line_per_request_with_tokens_and_latency(gateway, provider):
    client(gateway).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    line = wait_for(gateway, r"^.*gateway: 200 key=team-a provider=openai model=gpt-4o tokens=5/2 latency=\d+ms$")
    assert len(provider.received) == 1
    assert "http://127.0.0.1:1/" not in gateway.log()  # mitmproxy's own line, naming the placeholder
    assert VK not in gateway.log() and REAL not in gateway.log(), line


def test_refusals_log_their_code_and_say_the_gateway_refused(gateway, provider):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(gateway).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.headers["x-gateway-error-source"] == "gateway"
    wait_for(gateway, r"gateway: 403 model_not_allowed key=team-a provider=openai model=gpt-4o-mini latency=\d+ms")
    with pytest.raises(openai.AuthenticationError) as e:
        client(gateway, "vk_nobody_has_this_key").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.response.headers["x-gateway-error-source"] == "gateway"
    wait_for(gateway, r"gateway: 401 invalid_api_key POST /v1/chat/completions latency=\d+ms")
    assert provider.received == []
    assert "vk_nobody_has_this_key" not in gateway.log()


def test_a_provider_rejecting_the_real_key_says_so_by_key_name(gateway, provider):
    provider.handler = lambda req: Reply.json(
        {
            "error": {
                "message": "Incorrect API key provided: sk-fir***7777.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
        401,
    )
    with pytest.raises(openai.AuthenticationError) as e:
        client(gateway).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    response = e.value.response
    assert response.headers["x-gateway-error-source"] == "provider"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"  # the provider's own code is kept
    assert error["message"].startswith("the provider (openai) rejected the gateway's key for virtual key 'team-a'")
    assert error["message"].endswith("Provider said: Incorrect API key provided: sk-fir***7777.")
    wait_for(gateway, r"gateway: 401 from provider key=team-a provider=openai model=gpt-4o latency=\d+ms")


def test_other_provider_errors_are_marked_as_the_providers(gateway, provider):
    provider.handler = lambda req: Reply.json(
        {"error": {"message": "slow down", "type": "requests", "param": None, "code": None}}, 429
    )
    with pytest.raises(openai.RateLimitError) as e:
        client(gateway).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.headers["x-gateway-error-source"] == "provider"
    assert e.value.response.json()["error"]["message"] == "slow down"


@pytest.fixture
def not_tls():
    """A port that answers a TLS handshake with plain HTTP."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_unreachable_provider_is_the_gateways_answer_naming_the_cause_and_the_key(gateway_factory, not_tls):
    gw = gateway_factory(
        {
            "virtual_keys": {
                "vk_first_minutes_down": {
                    "provider": "openai",
                    "api_key": "sk-down-secret-1",
                    "base_url": "http://127.0.0.1:9/v1",
                    "name": "down",
                },
                "vk_first_minutes_tls": {
                    "provider": "openai",
                    "api_key": "sk-tls-secret-2",
                    "base_url": f"https://127.0.0.1:{not_tls}/v1",
                    "name": "tls-team",
                },
            }
        }
    )
    causes = {
        "vk_first_minutes_down": ("down", "the provider refused the connection"),
        "vk_first_minutes_tls": (
            "tls-team",
            "the TLS handshake with the provider failed: The remote server does not speak TLS.",
        ),
    }
    for vk, (name, cause) in causes.items():
        with pytest.raises(openai.APIStatusError) as e:
            client(gw, vk).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 502 and e.value.body["code"] == "upstream_unreachable"
        assert e.value.response.headers["x-gateway-error-source"] == "gateway"
        assert e.value.body["message"].startswith(
            f"the gateway could not reach the provider (openai) for virtual key '{name}': {cause}"
        )
        # the log agrees with the header: the gateway answered, not the provider; the address is there
        wait_for(gw, rf"gateway: 502 upstream_unreachable key={name} provider=openai model=gpt-4o latency=\d+ms")
        wait_for(gw, rf"gateway: provider unreachable for key {name}: openai at 127\.0\.0\.1:\d+: ")
        assert "127.0.0.1" not in e.value.message  # the address is logged, not told
    # the same on Anthropic's API, in its error shape
    messages = anthropic.Anthropic(base_url=gw.url, api_key="vk_first_minutes_down", max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as e:
        messages.messages.create(model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["message"].startswith(
        "the gateway could not reach the provider (openai) for virtual key 'down': "
    )
    log = gw.log()
    assert "502 from provider" not in log
    assert not [
        secret
        for secret in ("sk-down-secret-1", "sk-tls-secret-2", "vk_first_minutes_down", "vk_first_minutes_tls")
        if secret in log
    ]


def test_a_key_sent_as_a_model_name_is_masked_in_the_access_line(gateway, provider):
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway).chat.completions.create(
            model="vk_first_minutes_other", messages=[{"role": "user", "content": "hi"}]
        )
    wait_for(gateway, r"gateway: 403 model_not_allowed key=team-a provider=openai model=\S+ latency")
    assert "vk_first_minutes_other" not in gateway.log()
