"""A provider that takes the connection and never finishes the TLS handshake (or never even
answers the SYN): `upstream_timeout` covers connecting and the handshake, not only the wait for
response headers. Through a real gateway: the client gets the gateway's 504 `upstream_timeout`
in its API's shape within about that time, plain and streamed, on /v1/chat/completions and
/v1/messages; a key with a second target fails over to it and cools the stalled one down as a
connect failure; the stalled connections are closed; the gateway prints no traceback.

Before the fix, the timeout looked for the flow's server connection, which is only set once the
handshake is done: it found none and let the request wait (tcp_timeout, 10 minutes)."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from tests.e2e.test_failover import KEY_A, KEY_B, by_target, ok, served_by
from tests.fakeprovider import Reply, openai_stream

pytestmark = pytest.mark.e2e

TIMEOUT = 1  # upstream_timeout in these tests, seconds
SLACK = 4  # the sweep runs every TIMEOUT/4; a busy machine: a hang is `CLIENT_TIMEOUT`, well above
CLIENT_TIMEOUT = 15
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
ASK = {"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
REAL_OPENAI, REAL_ANTHROPIC = "sk-stalled-openai-7777", "sk-ant-stalled-8888"
MODES = ("silent", "garbage", "midway", "syn")


def self_signed(tmp) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp / "cert.pem", tmp / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


class Stalled:
    """A provider address whose TLS handshake never completes:

    - silent: accepts the connection and says nothing;
    - garbage: reads the ClientHello and answers bytes that are no ServerHello, a TLS record
      header promising 16 KiB and a little of it (OpenSSL waits for the rest; plain text is
      refused at once: tests/e2e/test_first_minutes.py);
    - midway: reads the ClientHello, starts a real handshake and sends its first record (the
      ServerHello), then stops: the gateway waits for the rest of the server's flight;
    - syn: never accepts, its backlog full: the SYN goes unanswered, the TCP connect itself hangs.

    Counts the connections it accepted and the ClientHellos it read; `closed()` says how many of
    them the gateway has closed."""

    def __init__(self, mode: str, tmp) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.hellos = 0
        self.fillers: list[socket.socket] = []
        if mode == "syn":
            self.sock.listen(0)
            for _ in range(4):  # fill the accept queue: later SYNs are dropped (and retried for minutes)
                filler = socket.socket()
                filler.setblocking(False)
                try:
                    filler.connect(("127.0.0.1", self.port))
                except BlockingIOError:
                    pass
                self.fillers.append(filler)
            return
        self.sock.listen(64)
        if mode == "midway":
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(*self_signed(tmp))
        threading.Thread(target=self.serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            threading.Thread(target=self.stall, args=(conn,), daemon=True).start()

    def stall(self, conn: socket.socket) -> None:
        if self.mode == "silent":
            return
        conn.settimeout(10)
        try:
            if self.mode == "garbage":
                conn.recv(65536)
                self.hellos += 1
                conn.sendall(b"\x16\x03\x03\x40\x00" + b"\x02\x00\x3f\xfc" + b"\x5a" * 60)
                return
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            server = self.tls.wrap_bio(incoming, outgoing, server_side=True)
            flight = b""
            while not flight:  # the whole ClientHello (it may come in several pieces)
                data = conn.recv(65536)
                if not data:
                    return
                incoming.write(data)
                try:
                    server.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                flight = outgoing.read()
            self.hellos += 1
            first = 5 + int.from_bytes(flight[3:5], "big")  # the first record: the ServerHello
            assert flight[0] == 0x16 and len(flight) > first, "a handshake flight of several records"
            conn.sendall(flight[:first])
        except (OSError, ssl.SSLError):
            pass

    def closed(self, wait: float = 5) -> int:
        """How many accepted connections the gateway has closed (reads up to their EOF)."""
        deadline = time.monotonic() + wait
        count = 0
        for conn in self.accepted:
            while True:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    if not conn.recv(65536):
                        count += 1
                        break
                except ConnectionResetError:
                    count += 1
                    break
                except OSError:  # timed out: still open
                    break
        return count

    def syn_sent(self) -> int:
        """Sockets of this machine still trying to connect to this port (SYN_SENT)."""
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = open(table).read().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields[3] == "02" and int(fields[2].rsplit(":", 1)[1], 16) == self.port:
                    count += 1
        return count

    def close(self) -> None:
        for s in [self.sock, *self.accepted, *self.fillers]:
            s.close()


@pytest.fixture
def stalled(tmp_path):
    servers: list[Stalled] = []

    def make(mode: str) -> Stalled:
        servers.append(Stalled(mode, tmp_path))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def post(gw, path: str, body: dict, headers: dict) -> tuple[httpx.Response, float, bytes]:
    """(response, seconds it took, body) of one request on a new connection."""
    started = time.monotonic()
    with httpx.Client(timeout=CLIENT_TIMEOUT) as c, c.stream("POST", gw.url + path, json=body, headers=headers) as r:
        content = r.read()
    return r, time.monotonic() - started, content


def assert_clean(gw) -> None:
    log = gw.log()
    assert "Traceback" not in log and "has crashed" not in log, log
    for secret in (REAL_OPENAI, REAL_ANTHROPIC, KEY_A, KEY_B, "vk_stalled"):
        assert secret not in log


@pytest.mark.parametrize("mode", MODES)
def test_a_stalled_handshake_is_the_gateways_504_within_upstream_timeout(mode, stalled, gateway_factory):
    server = stalled(mode)
    gw = gateway_factory(
        {
            "virtual_keys": {
                "vk_stalled_chat": {
                    "provider": "openai",
                    "api_key": REAL_OPENAI,
                    "base_url": server.url,
                    "name": "stalled-chat",
                },
                "vk_stalled_messages": {
                    "provider": "anthropic",
                    "api_key": REAL_ANTHROPIC,
                    "base_url": server.url,
                    "name": "stalled-messages",
                },
            }
        },
        ["--set", f"upstream_timeout={TIMEOUT}"],
    )
    syn_before = server.syn_sent()
    requests = {  # all at once: several stalled connections at a time
        "chat": ("/v1/chat/completions", CHAT, {"authorization": "Bearer vk_stalled_chat"}),
        "chat stream": ("/v1/chat/completions", {**CHAT, "stream": True}, {"authorization": "Bearer vk_stalled_chat"}),
        "messages": ("/v1/messages", ASK, {"x-api-key": "vk_stalled_messages", "anthropic-version": "2023-06-01"}),
        "messages stream": ("/v1/messages", {**ASK, "stream": True},
                            {"x-api-key": "vk_stalled_messages", "anthropic-version": "2023-06-01"}),
    }
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = dict(zip(requests, pool.map(lambda args: post(gw, *args), requests.values())))
    for what, (response, seconds, content) in answers.items():
        assert response.status_code == 504, (what, content)
        assert TIMEOUT * 0.9 <= seconds < TIMEOUT + SLACK, (what, seconds)
        assert response.headers["x-gateway-error-source"] == "gateway"
        assert response.headers["content-type"] == "application/json"
        body = json.loads(content)
        if what.startswith("chat"):
            assert body["error"]["code"] == "upstream_timeout" and body["error"]["type"] == "timeout", body
            message = body["error"]["message"]
        else:
            assert body["type"] == "error" and body["error"]["type"] == "timeout_error", body
            message = body["error"]["message"]
        assert f"within {TIMEOUT}s" in message and ("connect" if mode == "syn" else "TLS handshake") in message, message
    if mode == "syn":
        assert not server.accepted
        deadline = time.monotonic() + 5  # the gateway gave up its connects: no SYN of its own is left
        while server.syn_sent() > syn_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.syn_sent() == syn_before
    else:
        assert len(server.accepted) == 4
        if mode != "silent":
            assert server.hellos == 4  # the handshake had begun
        assert server.closed() == 4  # the gateway closed every stalled connection
    for name in ("stalled-chat", "stalled-messages"):
        deadline = time.monotonic() + 10
        while gw.log().count(f"504 upstream_timeout key={name}") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.log().count(f"504 upstream_timeout key={name}") == 2
    assert_clean(gw)


def test_http2_requests_waiting_for_the_same_stalled_handshake_all_get_the_504(stalled, gateway_factory):
    """Over HTTP/2 the requests of one client connection wait for one provider connection: the
    timeout of the first cuts it for all of them, each answered as a timeout."""
    server = stalled("midway")
    gw = gateway_factory({"virtual_keys": {
        "vk_stalled_h2": {"provider": "openai", "api_key": REAL_OPENAI, "base_url": server.url, "name": "stalled-h2"}}},
        ["--set", f"upstream_timeout={TIMEOUT}"])
    with httpx.Client(http2=True, verify=False, timeout=CLIENT_TIMEOUT) as h2:
        ask = lambda delay: (
            time.sleep(delay),
            h2.post(
                gw.url.replace("http://", "https://") + "/v1/chat/completions",
                json=CHAT,
                headers={"authorization": "Bearer vk_stalled_h2"},
            ),
        )[1]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, (0, 0.2, 0.4)))
        # the same client connection asks again: a new attempt at the provider, not the failed
        # connection's remembered error (an instant 502 from mitmproxy's memory)
        again = ask(0)
        answers.append(again)
    for response in answers:
        assert response.http_version == "HTTP/2"
        assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout", response.text
        assert response.headers["x-gateway-error-source"] == "gateway"
    assert len(server.accepted) == 2 and server.closed() == 2
    assert_clean(gw)


@pytest.mark.parametrize("mode,stream", [("silent", False), ("garbage", True), ("midway", False), ("syn", True)])
def test_a_stalled_target_fails_over_to_the_next_and_cools_down_as_a_connect_failure(mode, stream, stalled, provider,
                                                                                      gateway_factory):
    server = stalled(mode)
    first = {"provider": "openai", "api_key": KEY_A, "base_url": server.url}
    second = {"provider": "openai", "api_key": KEY_B, "base_url": f"{provider.url}/b/v1", "fallback": True}
    gw = gateway_factory({"virtual_keys": {"vk_stalled_team": {"name": "team-alpha", "targets": [first, second]}}},
                         ["--set", f"upstream_timeout={TIMEOUT}"])
    streamed = lambda r: Reply.sse(openai_stream(r.json(), pieces=("from ", "b")))
    provider.reset(by_target({"b": streamed if stream else ok}))
    headers = {"authorization": "Bearer vk_stalled_team"}
    response, seconds, content = post(gw, "/v1/chat/completions", {**CHAT, "stream": stream}, headers)
    assert response.status_code == 200 and response.headers["x-gateway-attempts"] == "2", content
    assert TIMEOUT * 0.9 <= seconds < TIMEOUT + SLACK
    if stream:
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in content.decode().splitlines()
                       if line.startswith("data: {") and json.loads(line[6:])["choices"])
        assert text == "from b" and content.rstrip().endswith(b"data: [DONE]")
    else:
        assert json.loads(content)["choices"][0]["message"]["content"] == "from b"
    # what the second target received: the client's request, with its own key, to its own path
    [sent] = provider.received
    assert sent.path == "/b/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {KEY_B}"
    assert sent.json()["messages"] == CHAT["messages"] and sent.json().get("stream", False) == stream
    log = gw.log()
    phase = "no connection" if mode == "syn" else "the TLS handshake did not finish"
    assert (
        f"target openai[0] (sk-...111) of team-alpha cooling down for 30s (connect: {phase} within {TIMEOUT}s)" in log
    ), log
    # cooling down: the next request goes straight to the second target, the stalled one is not touched
    accepted = len(server.accepted)
    again, seconds, _ = post(gw, "/v1/chat/completions", CHAT, headers)
    assert again.status_code == 200 and again.headers["x-gateway-attempts"] == "1" and seconds < TIMEOUT
    assert served_by(provider) == ["b", "b"] and len(server.accepted) == accepted
    if mode != "syn":
        assert server.closed() == accepted == 1
    assert_clean(gw)
