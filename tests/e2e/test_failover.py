"""Several targets per virtual key, through a real gateway and the official openai SDK
with max_retries=0: what is tested is the gateway's own failover, never the SDK's retries.

Targets are told apart by the path of their base_url on the fake provider (/a, /b, ...) and by
their real keys; a target that refuses connections is a port nothing listens on."""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.fakeprovider import FakeProvider, Received, Reply, openai_completion, openai_stream

pytestmark = pytest.mark.e2e

# a weight that makes a target the first pick of a draw (the other, weight 1, one time in 10^9):
# 1000 left it to chance once per thousand draws, and a suite run makes a few dozen
FIRST = 10**9
KEY_A, KEY_B, KEY_C = "sk-target-a-111111", "sk-target-b-222222", "sk-ant-target-c-333333"
MESSAGES = [{"role": "user", "content": "hi"}]


def closed_port() -> int:
    """A port nothing listens on: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def target(provider, name: str, key: str, **extra) -> dict:
    return {"provider": "openai", "api_key": key, "base_url": f"{provider.url}/{name}/v1", **extra}


def keys(*targets_, **entry) -> dict:
    return {"virtual_keys": {"vk_team": {"name": "team-alpha", "targets": list(targets_), **entry}}}


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_team", max_retries=0, timeout=20)


def chat(gw, **kw):
    return client(gw).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, **kw)


def served_by(provider) -> list[str]:
    """Which target each request the provider received was for: "a", "b", ..."""
    return [r.path.split("/")[1] for r in provider.received]


def ledger(gw, count: int, timeout: float = 10) -> list[dict]:
    path = Path(gw.tmp.name) / "usage.sqlite3"
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        if path.exists():
            db = sqlite3.connect(path)
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]
            db.close()
            if len(rows) >= count:
                break
        time.sleep(0.05)
    return rows


def by_target(handlers: dict):
    """A provider handler answering each target (path prefix) with its own function."""
    def handle(r: Received) -> Reply:
        return handlers[r.path.split("/")[1]](r)
    return handle


def ok(r: Received) -> Reply:
    return Reply.json(openai_completion(r.json(), text=f"from {r.path.split('/')[1]}"))


def status(code: int, **headers):
    def reply(r: Received) -> Reply:
        body = json.dumps({"error": {"message": f"fake {code}", "type": "server_error"}}).encode()
        return Reply(code, body, {"content-type": "application/json", **headers})
    return reply


def test_a_target_failing_half_the_time_costs_the_client_nothing(provider, gateway_factory):
    # cooldown_s is short so that A keeps being picked and failing: each failure is retried in the flow
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=3), target(provider, "b", KEY_B)),
                         ["--set", "cooldown_s=0.05"])
    count = {"a": 0}

    def a(r: Received) -> Reply:
        count["a"] += 1
        return status(503)(r) if count["a"] % 2 else ok(r)

    provider.reset(by_target({"a": a, "b": ok}))
    answers = []
    for _ in range(100):
        raw = chat(gw)
        answers.append(raw.parse().choices[0].message.content)
        time.sleep(0.01)
    assert len(answers) == 100  # max_retries=0: every one of them succeeded at the gateway
    failed_at_a = (count["a"] + 1) // 2
    assert failed_at_a >= 5, "A was picked and failed several times"
    assert answers.count("from b") >= failed_at_a  # every failure was answered by B, in the same request
    # each failed attempt's request went on to B with B's key, A's key never left for B
    for r in provider.received:
        assert r.headers["authorization"] == f"Bearer {KEY_A if r.path.startswith('/a/') else KEY_B}"
    rows = ledger(gw, 100)
    assert len(rows) == 100  # one row per client request, not per attempt
    assert sum(row["attempts"] for row in rows) == len(provider.received)
    assert {row["target"] for row in rows if row["attempts"] == 2} == {"1"}


def test_a_refusing_target_is_skipped_while_it_cools_down_then_tried_again(provider, gateway_factory):
    dead = {"provider": "openai", "api_key": KEY_A, "base_url": f"http://127.0.0.1:{closed_port()}/v1"}
    gw = gateway_factory(keys(dead, target(provider, "b", KEY_B, fallback=True)), ["--set", "cooldown_s=2"])
    first = chat(gw)
    assert first.parse().choices[0].message.content == "hello"
    assert first.headers["x-gateway-attempts"] == "2"  # A refused, B answered
    started = time.monotonic()
    during = []
    while time.monotonic() - started < 1.0:  # well inside the cooldown: A is not even tried
        during.append(chat(gw).headers["x-gateway-attempts"])
    assert during and set(during) == {"1"}
    time.sleep(2.2)  # the cooldown is over: A is tried again (and refuses again)
    assert chat(gw).headers["x-gateway-attempts"] == "2"
    log = gw.log()
    assert log.count("cooling down for 2s") == 2  # one line each time it entered the cooldown
    assert "healthy again" in log
    assert KEY_A not in log and "sk-...111" in log


def test_a_target_that_refused_is_connected_afresh_after_its_cooldown_on_a_kept_alive_client(provider, gateway_factory):
    port = closed_port()
    dead = {"provider": "openai", "api_key": KEY_A, "base_url": f"http://127.0.0.1:{port}/v1"}
    gw = gateway_factory(keys(dead, target(provider, "b", KEY_B, fallback=True)), ["--set", "cooldown_s=1"])
    c = client(gw)  # one kept-alive connection: mitmproxy remembers a failed connection per client connection
    ask = lambda: c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert ask().headers["x-gateway-attempts"] == "2"
    revived = FakeProvider(port=port).start()  # A is back
    try:
        time.sleep(1.2)
        answer = ask()
        assert answer.headers["x-gateway-attempts"] == "1" and len(revived.received) == 1
    finally:
        revived.stop()


class Resetter:
    """A target that resets each connection once the request has come, counting them. (Not at
    once on accept: mitmproxy 12.3 then asserts on the socket's missing peer name inside its
    connection task and the flow waits forever, a race of mitmproxy's own.)"""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(5)
            try:
                conn.recv(65536)
            except OSError:
                pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()


def test_a_resetting_target_sees_no_traffic_while_cooling_down_even_on_a_kept_alive_client(provider, gateway_factory):
    a = Resetter()
    dead = {"provider": "openai", "api_key": KEY_A, "base_url": f"http://127.0.0.1:{a.port}/v1"}
    gw = gateway_factory(keys(dead, target(provider, "b", KEY_B, fallback=True)), ["--set", "cooldown_s=1.5"])
    c = client(gw)  # one client, one kept-alive connection to the gateway throughout
    ask = lambda: c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert ask().headers["x-gateway-attempts"] == "2"
    assert a.connections == 1
    for _ in range(5):
        assert ask().headers["x-gateway-attempts"] == "1"
    assert a.connections == 1  # cooling down: not even a connection
    time.sleep(1.7)
    assert ask().headers["x-gateway-attempts"] == "2"
    assert a.connections == 2  # tried again for real, not failed from a remembered connection error
    a.sock.close()


def test_a_target_whose_tls_handshake_fails_moves_the_request_on(provider, gateway_factory):
    a = Resetter()  # its URL says https: it takes the TLS ClientHello and resets the connection
    tls = {"provider": "openai", "api_key": KEY_A, "base_url": f"https://127.0.0.1:{a.port}/v1"}
    gw = gateway_factory(keys(tls, target(provider, "b", KEY_B, fallback=True)))
    provider.reset(by_target({"b": ok}))
    raw = chat(gw)
    assert raw.parse().choices[0].message.content == "from b" and raw.headers["x-gateway-attempts"] == "2"
    assert a.connections == 1 and served_by(provider) == ["b"]
    assert "target openai[0] (sk-...111) of team-alpha cooling down for 30s" in gw.log()
    a.sock.close()


def test_which_provider_statuses_move_a_request_to_the_next_target(provider, gateway_factory):
    # A is the only primary: every request goes to A first; B, the fallback, answers what moves on
    gw = gateway_factory(keys(target(provider, "a", KEY_A), target(provider, "b", KEY_B, fallback=True)),
                         ["--set", "cooldown_s=0.01", "--set", "auth_cooldown_s=0.01"])
    # the request's own fault: the client gets it, A is not cooled (a 403 that does not say the key
    # is bad: no access to the model, a content refused; tests/e2e/test_cooldown_scope.py)
    for code in (400, 403, 404, 413, 422):
        provider.reset(by_target({"a": status(code), "b": ok}))
        with pytest.raises(openai.APIStatusError) as refused:
            chat(gw)
        assert refused.value.status_code == code and f"fake {code}" in refused.value.message
        assert refused.value.response.headers["x-gateway-attempts"] == "1"
        assert served_by(provider) == ["a"], code
    revoked = lambda r: Reply.json(
        {"error": {"message": "The API key has been revoked.", "type": "invalid_request_error"}}, 403
    )  # noqa: E731
    for code in (401, 403, 429, 500, 502, 503, 504, 529):
        time.sleep(0.1)  # A's cooldown of the code before is over
        provider.reset(by_target({"a": revoked if code == 403 else status(code), "b": ok}))
        raw = chat(gw)
        assert raw.parse().choices[0].message.content == "from b" and raw.headers["x-gateway-attempts"] == "2"
        assert served_by(provider) == ["a", "b"], code
    assert [row["attempts"] for row in ledger(gw, 13)] == [1] * 5 + [2] * 8


def test_a_429s_retry_after_longer_than_cooldown_s_keeps_the_target_cooling(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A), target(provider, "b", KEY_B, fallback=True)),
                         ["--set", "cooldown_s=0.01"])
    provider.reset(by_target({"a": status(429, **{"retry-after": "600"}), "b": ok}))
    assert chat(gw).headers["x-gateway-attempts"] == "2"
    time.sleep(0.2)  # cooldown_s is long over; the provider's Retry-After is not
    for _ in range(3):
        assert chat(gw).headers["x-gateway-attempts"] == "1"
    assert served_by(provider) == ["a", "b", "b", "b", "b"]
    assert "cooling down for 600s for model 'gpt-4o' (HTTP 429)" in gw.log()


def test_weights_split_the_requests(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=3), target(provider, "b", KEY_B, weight=1)))
    c = client(gw)
    for _ in range(400):
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    split = served_by(provider)
    # binomial(400, 0.75): mean 300, sd 8.7; +-40 is 4.6 sd (a false failure about once in 250,000 runs)
    assert len(split) == 400 and 260 <= split.count("a") <= 340


def anthropic_reply(r: Received) -> Reply:
    body = r.json()
    return Reply.json({"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                       "content": [{"type": "text", "text": "from claude"}], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 3}})


def test_every_primary_down_the_anthropic_fallback_answers_translated(provider, gateway_factory, tmp_path):
    fallback = {"provider": "anthropic", "api_key": KEY_C, "base_url": f"{provider.url}/c/v1", "fallback": True,
                "model_map": {"gpt-4o": "claude-sonnet-4-6", "gpt-4o-mini": "claude-haiku-4-5"}}
    entry = keys(target(provider, "a", KEY_A), target(provider, "b", KEY_B), fallback)
    entry["prices"] = {"claude-sonnet-4-6": {"input": 3, "output": 15}, "gpt-4o": {"input": 2.5, "output": 10}}
    recording = tmp_path / "flows.mitm"
    gw = gateway_factory(entry, ["--set", f"record_file={recording}"])
    provider.reset(by_target({"a": status(500), "b": status(529), "c": anthropic_reply}))
    raw = chat(gw)
    answer = raw.parse()
    assert answer.choices[0].message.content == "from claude"  # an OpenAI chat completion
    assert raw.headers["x-gateway-attempts"] == "3"
    assert sorted(served_by(provider)) == ["a", "b", "c"]
    sent = provider.received[-1]
    assert sent.path == "/c/v1/messages" and sent.headers["x-api-key"] == KEY_C
    body = sent.json()
    assert body["model"] == "claude-sonnet-4-6" and body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    ]
    assert "max_tokens" in body and "authorization" not in sent.headers
    row = ledger(gw, 1)[0]
    assert (row["provider"], row["model"], row["target"], row["attempts"]) == ("anthropic", "claude-sonnet-4-6", "2", 3)
    assert row["cost_usd"] == pytest.approx((9 * 3 + 3 * 15) / 1e6)  # the served model's price
    # what mitmweb shows of it: the recorded flow is the answering attempt, commented so
    gw.stop()
    from mitmproxy.io import FlowReader
    with open(recording, "rb") as f:
        [flow] = [f for f in FlowReader(f).stream() if f.request.path != "/health"]
    assert flow.comment == "team-alpha -> anthropic claude-sonnet-4-6 (fallback, attempt 3)"
    assert flow.request.path == "/c/v1/messages" and flow.response.status_code == 200
    # and the attempts that failed before it, for its view (web/contentview.py): what each answered, when
    failed = flow.metadata["gateway"]["failed_attempts"]
    assert [a["attempt"] for a in failed] == [1, 2]
    assert sorted((a["provider"], a["target"], a["status"], a["fallback"]) for a in failed) == [
        ("openai", "0", 500, False), ("openai", "1", 529, False)]
    assert failed[0]["started"] <= failed[1]["started"] <= flow.response.timestamp_start
    assert all(0 <= a["ms"] < 5000 for a in failed)


def test_a_429_before_the_first_byte_fails_over_and_the_stream_passes_chunk_by_chunk(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B)))
    hold = threading.Event()
    provider.reset(
        by_target(
            {
                "a": status(429, **{"retry-after": "1"}),
                "b": lambda r: Reply.sse(
                    openai_stream(r.json(), pieces=("one ", "two ", "three")), hold_after_first=hold
                ),
            }
        )
    )
    stream = client(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        hold.set()  # B holds everything after its first chunk until the client has seen it
    assert "".join(pieces) == "one two three"
    assert provider.holds_released == [True]
    assert served_by(provider) == ["a", "b"]


def test_a_failure_after_the_first_chunk_does_not_switch(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B)))
    provider.reset(by_target({"a": lambda r: Reply.sse(openai_stream(r.json(), pieces=("one ", "two"))[:2], cut=True),
                              "b": ok}))
    stream = client(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    seen = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk.choices[0].delta.content)
    assert seen == ["one "]
    assert served_by(provider) == ["a"]  # B never saw it


def test_a_rejected_real_key_is_skipped_for_auth_cooldown(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B)),
                         ["--set", "cooldown_s=0.1", "--set", "auth_cooldown_s=600"])
    provider.reset(by_target({"a": status(401), "b": ok}))
    assert chat(gw).headers["x-gateway-attempts"] == "2"
    time.sleep(0.5)  # longer than cooldown_s: a 401 is not an ordinary failure
    for _ in range(5):
        assert chat(gw).headers["x-gateway-attempts"] == "1"
    assert served_by(provider) == ["a"] + ["b"] * 6
    log = gw.log()
    assert log.count("refused its key, HTTP 401") == 1 and "cooling down for 600s" in log
    assert KEY_A not in log and "sk-...111" in log


def test_every_target_cooling_down_answers_503_no_healthy_target(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A)), ["--set", "cooldown_s=30"])
    provider.reset(by_target({"a": status(503)}))
    with pytest.raises(openai.InternalServerError) as first:
        chat(gw)
    assert first.value.status_code == 503 and "fake 503" in first.value.message  # the provider's own answer
    with pytest.raises(openai.InternalServerError) as second:
        chat(gw)
    assert second.value.status_code == 503 and second.value.response.json()["error"]["code"] == "no_healthy_target"
    assert 1 <= int(second.value.response.headers["retry-after"]) <= 30
    assert len(provider.received) == 1  # the second never left the gateway


def test_attempts_used_up_with_a_healthy_target_left_tell_the_sdk_to_retry_at_once(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B)),
                         ["--set", "max_attempts=1"])
    provider.reset(
        by_target({"a": status(503, **{"x-should-retry": "false"}), "b": ok})
    )  # the provider's own, replaced
    with pytest.raises(openai.InternalServerError) as failed:
        chat(gw)
    headers = failed.value.response.headers
    assert (headers["x-should-retry"], headers["retry-after-ms"]) == ("true", "0")
    # the official SDK retries on that header, and its retry goes to B (A is cooling down)
    retried = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_team", max_retries=1, timeout=20)
    provider.reset(by_target({"a": status(503), "b": ok}))
    assert retried.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content == "from b"


def test_limits_count_a_client_request_once_whatever_its_attempts(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B), rpm=2),
                         ["--set", "cooldown_s=0.01"])
    provider.reset(by_target({"a": status(503), "b": ok}))
    for _ in range(2):
        assert chat(gw).headers["x-gateway-attempts"] == "2"
    with pytest.raises(openai.RateLimitError):
        chat(gw)
    assert len(provider.received) == 4
    assert [row["attempts"] for row in ledger(gw, 3)][:2] == [2, 2]


@pytest.mark.fleet
def test_a_cooldown_set_by_one_gateway_is_honoured_by_another_sharing_redis(provider, gateway_factory, redis_server):
    entry = keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B))
    one, two = (
        gateway_factory(entry, ["--set", f"redis_url={redis_server.url}", "--set", "cooldown_s=60"]) for _ in range(2)
    )
    provider.reset(by_target({"a": status(503), "b": ok}))
    assert chat(one).headers["x-gateway-attempts"] == "2"  # A failed at the first gateway: it cools A down
    time.sleep(1.5)  # the other gateway reads the shared cooldowns every 0.5 s
    for _ in range(10):
        assert chat(two).headers["x-gateway-attempts"] == "1"  # A is the first pick, yet it is skipped
    assert served_by(provider) == ["a"] + ["b"] * 11


def test_no_response_headers_within_upstream_timeout_moves_to_the_next_target(provider, gateway_factory):
    gw = gateway_factory(keys(target(provider, "a", KEY_A, weight=FIRST), target(provider, "b", KEY_B)),
                         ["--set", "upstream_timeout=1"])
    slow = lambda r: Reply.json(openai_completion(r.json(), text="too late"), delay=4)
    provider.reset(by_target({"a": slow, "b": ok}))
    raw = chat(gw)
    assert raw.parse().choices[0].message.content == "from b"
    assert raw.headers["x-gateway-attempts"] == "2"
    assert "cooling down for 30s" in gw.log()


def test_the_messages_api_fails_over_too_and_answers_in_its_own_shape(provider, gateway_factory):
    import anthropic

    primary = {"provider": "anthropic", "api_key": KEY_C, "base_url": f"{provider.url}/c/v1", "weight": FIRST}
    fallback = target(provider, "b", KEY_B, fallback=True, model="gpt-4o-mini")
    gw = gateway_factory(keys(primary, fallback))
    provider.reset(by_target({"c": status(529), "b": ok}))
    with anthropic.Anthropic(base_url=gw.url, api_key="vk_team", max_retries=0) as client:
        message = client.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES)
    assert message.content[0].text == "from b"  # an Anthropic message, made from the OpenAI answer
    sent = provider.received[-1]
    assert sent.path == "/b/v1/chat/completions" and sent.json()["model"] == "gpt-4o-mini"
    assert sent.headers["authorization"] == f"Bearer {KEY_B}" and "x-api-key" not in sent.headers


def test_the_next_attempt_at_the_same_provider_address_gets_its_answer(gateway_factory):
    """Both targets at one host:port: the failed attempt's HTTP/1 connection is not reused for
    the next one while mitmproxy is still finishing the failed exchange on it (seen with the
    demo's provider, Python's http.server: the next attempt's answer was dropped, the client hung)."""
    from demo import provider as demo

    server = demo.start(0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        gw = gateway_factory(
            keys(
                {"provider": "openai", "api_key": "sk-revoked-123456", "base_url": url + "/openai/v1", "weight": FIRST},
                {"provider": "openai", "api_key": demo.KEYS["openai"], "base_url": url + "/openai/v1"},
            ),
            ["--set", "auth_cooldown_s=0.001"],
        )
        for _ in range(4):  # new client connections, and a kept-alive one
            for c in (client(gw), client(gw)):
                time.sleep(0.01)  # the revoked key's cooldown is over: it is tried (and refused) each time
                raw = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
                assert raw.headers["x-gateway-attempts"] == "2"
                assert raw.parse().choices[0].message.content.startswith("[demo] openai")
    finally:
        server.shutdown()


def test_a_stream_fails_over_to_another_provider_and_is_translated(provider, gateway_factory):
    from tests.e2e.test_anthropic_e2e import stream_events, text_block

    fallback = {"provider": "anthropic", "api_key": KEY_C, "base_url": f"{provider.url}/c/v1", "fallback": True,
                "model": "claude-sonnet-4-6"}
    gw = gateway_factory(keys(target(provider, "a", KEY_A), fallback))
    provider.reset(by_target({"a": status(503), "c": lambda r: Reply.sse(stream_events([text_block("Hel", "lo")]))}))
    stream = client(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 21  # Anthropic's count, translated
    assert provider.received[-1].path == "/c/v1/messages" and provider.received[-1].json()["stream"] is True
    row = ledger(gw, 1)[0]
    assert (row["provider"], row["model"], row["attempts"], row["streamed"]) == ("anthropic", "claude-sonnet-4-6", 2, 1)
