"""Errors the gateway makes below its flow hooks (mitmproxy's 502/504 pages, the 431 for a too-large
header block, the 400 for request trailers) take the error shape of the inbound API on the request's
path: Anthropic's on /v1/messages, so the official anthropic SDK raises its own exception with the
gateway's message; OpenAI's on the OpenAI paths. HTTP/1 through the SDKs, HTTP/2 through httpx."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx2 as httpx
import openai
import pytest

from tests.fakeprovider import Reply
from tests.conftest import keys_for

pytestmark = pytest.mark.e2e

DOWN = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
KEYS = {
    "vk_shape_up": {"provider": "openai", "api_key": "sk-shape-up-real-0001"},
    "vk_shape_down": {"provider": "openai", "api_key": "sk-shape-down-real-0002", "base_url": DOWN},
    "vk_shape_ant_down": {"provider": "anthropic", "api_key": "sk-ant-shape-down-0003", "base_url": DOWN},
}
SECRETS = [s for vk, e in KEYS.items() for s in (vk, e["api_key"])]
ASK = {"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gateway(gateway_factory, provider_server):
    return gateway_factory(keys_for(provider_server, KEYS),
                           extra_args=["--set", "upstream_timeout=0.5"])


def messages_client(gateway, key: str, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=20, **kw)


def chat_client(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20)


def anthropic_error(body: object) -> dict:
    """The `error` object of an Anthropic-shaped error body (asserting the shape)."""
    assert isinstance(body, dict) and body.get("type") == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    return body["error"]


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send raw bytes, read until the gateway closes: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def test_unreachable_provider_on_messages_is_an_anthropic_502(gateway, provider):
    with pytest.raises(anthropic.InternalServerError) as e:
        messages_client(gateway, "vk_shape_down").messages.create(**ASK)
    assert e.value.status_code == 502
    error = anthropic_error(e.value.body)
    assert error["type"] == "api_error" and error["message"].startswith("the gateway could not reach the provider")
    assert e.value.response.headers["x-gateway-error-source"] == "gateway"
    # a passthrough key (Anthropic's own API upstream) too
    with pytest.raises(anthropic.InternalServerError) as e:
        messages_client(gateway, "vk_shape_ant_down").messages.create(**ASK)
    assert e.value.status_code == 502 and anthropic_error(e.value.body)["type"] == "api_error"
    # the OpenAI paths keep OpenAI's shape
    with pytest.raises(openai.InternalServerError) as e:
        chat_client(gateway, "vk_shape_down").chat.completions.create(**CHAT)
    assert e.value.status_code == 502 and e.value.body["code"] == "upstream_unreachable"
    assert provider.received == []


def test_slow_provider_on_messages_is_an_anthropic_504(gateway, provider):
    provider.handler = lambda req: Reply.json({"late": True}, delay=5)
    with pytest.raises(anthropic.InternalServerError) as e:
        messages_client(gateway, "vk_shape_up").messages.create(**ASK)
    assert e.value.status_code == 504
    error = anthropic_error(e.value.body)
    assert error["type"] == "timeout_error" and "did not answer within 0.5s" in error["message"]
    with pytest.raises(openai.InternalServerError) as e:
        chat_client(gateway, "vk_shape_up").chat.completions.create(**CHAT)
    assert e.value.status_code == 504 and e.value.body["code"] == "upstream_timeout"


def test_an_untranslatable_provider_answer_on_messages_is_an_anthropic_502(gateway, provider):
    """Once routed, the request's path is the provider's (/v1/chat/completions here): the answer
    still takes the shape of the API the client spoke."""
    provider.handler = lambda req: Reply(200, b"<html>not json</html>", {"content-type": "application/json"})
    with pytest.raises(anthropic.InternalServerError) as e:
        messages_client(gateway, "vk_shape_up").messages.create(**ASK)
    assert e.value.status_code == 502
    assert anthropic_error(e.value.body) == {
        "type": "api_error",
        "message": "the gateway could not translate the provider response",
    }
    assert provider.received[0].path == "/v1/chat/completions"


def test_concurrent_failures_each_get_their_own_apis_shape(gateway):
    def messages(_):
        try:
            messages_client(gateway, "vk_shape_down").messages.create(**ASK)
        except anthropic.APIStatusError as e:
            return e.status_code, e.body
        raise AssertionError("not refused")

    def chat(_):
        try:
            chat_client(gateway, "vk_shape_down").chat.completions.create(**CHAT)
        except openai.APIStatusError as e:
            return e.status_code, e.body
        raise AssertionError("not refused")

    with ThreadPoolExecutor(8) as pool:
        ant = [pool.submit(messages, i) for i in range(12)]
        oai = [pool.submit(chat, i) for i in range(12)]
        for f in ant:
            status, body = f.result()
            assert status == 502 and anthropic_error(body)["type"] == "api_error"
        for f in oai:
            status, body = f.result()  # the openai SDK's body is the `error` object
            assert status == 502 and body["code"] == "upstream_unreachable" and "type" in body


def test_too_large_header_block_on_messages_is_an_anthropic_431(gateway, provider):
    big = {"x-filler": "a" * (70 * 1024)}
    with pytest.raises(anthropic.APIStatusError) as e:
        messages_client(gateway, "vk_shape_up", default_headers=big).messages.create(**ASK)
    assert e.value.status_code == 431
    error = anthropic_error(e.value.body)
    assert error["type"] == "invalid_request_error" and "header block larger than" in error["message"]
    # an Anthropic client off the API paths (its anthropic-version header), and an OpenAI one
    status, headers, body = raw_exchange(
        gateway.port,
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nanthropic-version: 2023-06-01\r\n"
        b"X-Filler: " + b"a" * 70 * 1024 + b"\r\n\r\n",
    )
    assert status == 431 and anthropic_error(json.loads(body))["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="vk_shape_up", max_retries=0,
                      default_headers=big).chat.completions.create(**CHAT)
    assert e.value.status_code == 431 and e.value.body["code"] == "headers_too_large"
    assert provider.received == []


def test_request_trailers_on_messages_get_an_anthropic_400(gateway, provider):
    body = json.dumps(ASK).encode()
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: vk_shape_up\r\nanthropic-version: 2023-06-01\r\n"
            b"content-type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, headers, answer = raw_exchange(
        gateway.port, head + b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(body), body)
    )
    assert status == 400 and headers["content-type"] == "application/json"
    error = anthropic_error(json.loads(answer))
    assert error["type"] == "invalid_request_error" and "trailers" in error["message"]
    assert provider.received == []


def test_http2_error_pages_take_the_requests_shape(gateway, provider):
    """Over HTTP/2 (TLS, ALPN h2) several requests share a connection: each error is rendered for
    its own stream's API."""
    with httpx.Client(http2=True, verify=False, timeout=20) as h2:
        url = gateway.url.replace("http://", "https://")
        ant = h2.post(
            url + "/v1/messages", json=ASK, headers={"x-api-key": "vk_shape_down", "anthropic-version": "2023-06-01"}
        )
        oai = h2.post(url + "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer vk_shape_down"})
    assert ant.http_version == "HTTP/2" and oai.http_version == "HTTP/2"
    assert ant.status_code == 502 and anthropic_error(ant.json())["type"] == "api_error"
    assert oai.status_code == 502 and oai.json()["error"]["code"] == "upstream_unreachable"
    for page in (ant, oai):  # JSON, said so (mitmproxy's HTTP/2 page says text/html), from the gateway
        assert page.headers["content-type"] == "application/json"
        assert page.headers["x-gateway-error-source"] == "gateway"
        assert float(page.headers["x-gateway-overhead-ms"]) >= 0  # hooks/metrics.py's, as over HTTP/1
        assert int(page.headers["content-length"]) == len(page.content)
    assert provider.received == []


def test_http2_timeout_page_is_json(gateway, provider):
    provider.handler = lambda req: Reply.json({"late": True}, delay=5)
    with httpx.Client(http2=True, verify=False, timeout=20) as h2:
        ant = h2.post(gateway.url.replace("http://", "https://") + "/v1/messages", json=ASK,
                      headers={"x-api-key": "vk_shape_up", "anthropic-version": "2023-06-01"})
    assert ant.http_version == "HTTP/2" and ant.status_code == 504
    assert ant.headers["content-type"] == "application/json"
    assert anthropic_error(ant.json())["type"] == "timeout_error"


MESSAGES_HEAD = (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: vk_shape_up\r\n"
                 b"anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n")
CHAT_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer vk_shape_up\r\n"
             b"content-type: application/json\r\n")


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize("framing, reason", [
    # request smuggling: both framings (mitmproxy's header validation, after the request is read)
    (lambda body: b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body) + chunked(body),
     "both transfer-encoding and content-length"),
    (lambda body: b"Content-Length: %d\r\nBad Name: 1\r\n\r\n" % len(body) + body, "invalid header name"),
    # a head mitmproxy cannot parse (its request line can): before any hook
    (lambda body: b"Content-Length: 1x\r\n\r\n" + body, "content-length"),
    (lambda body: b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body),
     "transfer-encoding"),
    (lambda body: b"Authorization Bearer vk_shape_up\r\n\r\n" + body, "header line"),  # not echoed
], ids=["cl-and-te", "bad-header-name", "bad-cl", "two-te", "bad-header-line"])
def test_refused_framing_is_a_400_in_the_paths_shape(gateway, provider, framing, reason):
    """mitmproxy's own 400s for a head it refuses take the shape of the API on the request line;
    nothing is forwarded."""
    status, headers, answer = raw_exchange(gateway.port, MESSAGES_HEAD + framing(json.dumps(ASK).encode()))
    assert status == 400 and headers["content-type"] == "application/json", answer
    error = anthropic_error(json.loads(answer))
    assert error["type"] == "invalid_request_error" and reason in error["message"].lower(), error
    assert b"vk_shape_up" not in answer
    status, headers, answer = raw_exchange(gateway.port, CHAT_HEAD + framing(json.dumps(CHAT).encode()))
    assert status == 400 and headers["content-type"] == "application/json", answer
    error = json.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and reason in error["message"].lower(), error
    assert b"vk_shape_up" not in answer
    assert provider.received == []


def test_a_provider_answer_with_both_framings_is_a_502_in_the_paths_shape(gateway, provider):
    """mitmproxy refuses it (response smuggling) before any response hook: the page follows the
    error hook."""
    provider.handler = lambda req: Reply(
        200, b"", {"content-type": "application/json", "content-length": "2"}, chunks=[b"{}"]
    )
    with pytest.raises(anthropic.InternalServerError) as e:
        messages_client(gateway, "vk_shape_up").messages.create(**ASK)
    assert e.value.status_code == 502 and e.value.response.headers["content-type"] == "application/json"
    assert anthropic_error(e.value.body)["type"] == "api_error"
    with pytest.raises(openai.InternalServerError) as e:
        chat_client(gateway, "vk_shape_up").chat.completions.create(**CHAT)
    assert e.value.status_code == 502 and e.value.body["type"] == "bad_gateway"


def test_an_unreadable_request_line_keeps_openais_shape(gateway, provider):
    status, headers, answer = raw_exchange(
        gateway.port, b"POST /v1/messages HTTP/7\r\nHost: gw\r\nanthropic-version: 2023-06-01\r\n\r\n"
    )
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(answer)["error"]["type"] == "invalid_request_error"
    assert provider.received == []


def test_no_secret_in_the_log(gateway):
    time.sleep(0.2)
    log = gateway.log()
    for secret in SECRETS:
        assert secret not in log
