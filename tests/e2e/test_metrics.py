"""Prometheus metrics and x-gateway-overhead-ms: scraped from real gateway processes and parsed
with prometheus_client's own parser. In-process: tests/unit/hooks/test_metrics.py."""

from __future__ import annotations

import http.client
import json
import socket
import stat
import time

import pytest

from tests.unit.hooks.test_metrics import samples, value
from tests.fakeprovider import Reply, default_reply
from tests.conftest import free_port, keys_for

REAL_KEY = "sk-real-provider-key-123456"
ALICE = "vk_alice_metrics_0001"
BOB = "vk_bob_metrics_0002"
# $1 per prompt token, $2 per completion token: costs are exact small numbers
PRICES = {"gpt-4o": {"input": 1_000_000, "output": 2_000_000}, "gpt-4o-mini": {"input": 0, "output": 0}}
MESSAGES = [{"role": "user", "content": "hi"}]


def keys_file(provider) -> dict:
    return keys_for(provider, {
            ALICE: {"provider": "openai", "api_key": REAL_KEY, "name": "alice", "models": ["gpt-4o", "gpt-4o-mini"],
                    "budget_usd": 1_000_000},  # room for the worst case each request reserves (~$65,600 here)
            BOB: {"provider": "openai", "api_key": REAL_KEY, "name": "bob"},
        }, prices=PRICES)


def post(port: int, key: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"authorization": f"Bearer {key}", "content-type": "application/json"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def scrape(port: int, token: str | None = None, path: str = "/metrics") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def scrape_until(port: int, done, token: str | None = None, timeout: float = 15.0) -> dict:
    """Scrape until `done(samples)` (flows are folded in batches; streams end after their client)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = scrape(port, token)
        assert status == 200, body
        found = samples(body)
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def provider_handler(req):
    body = req.json()
    if body.get("model") == "gpt-4o-mini":  # the provider error case
        return Reply.json(
            {"error": {"message": "upstream broke", "type": "server_error", "param": None, "code": None}}, 500
        )
    return default_reply(req)


@pytest.mark.e2e
def test_scrape_counts_plain_streamed_refused_and_provider_error_requests(provider, gateway_factory):
    provider.reset(provider_handler)
    port = free_port()
    gw = gateway_factory(keys_file(provider), ["--set", f"metrics_port={port}"])
    answers = []
    t0 = time.monotonic()
    for _ in range(2):
        answers.append(post(gw.port, ALICE, {"model": "gpt-4o", "messages": MESSAGES}))
    answers.append(post(gw.port, ALICE, {"model": "gpt-4o", "messages": MESSAGES, "stream": True}))
    answers.append(post(gw.port, ALICE, {"model": "o3", "messages": MESSAGES}))  # not in alice's models
    answers.append(post(gw.port, "vk_nobody", {"model": "gpt-4o", "messages": MESSAGES}))
    answers.append(post(gw.port, ALICE, {"model": "gpt-4o-mini", "messages": MESSAGES}))  # provider answers 500
    wall_ms = (time.monotonic() - t0) * 1000
    assert [a[0] for a in answers] == [200, 200, 200, 403, 401, 500]
    assert b"data: [DONE]" in answers[2][2]
    assert len(provider.received) == 4  # the refusals were not forwarded
    for status, headers, _ in answers:  # every response carries the gateway's own time
        overhead = float(headers["x-gateway-overhead-ms"])
        assert 0 <= overhead < wall_ms

    found = scrape_until(port, lambda f: value(f, "gateway_requests_total") >= 6
                         and value(f, "gen_ai_client_token_usage_total") >= 21)
    requests = {dict(k)["status_class"] + "/" + dict(k)["code"] + "/" + dict(k)["key"] + "/" + dict(k)["model"]: v
                for k, v in found["gateway_requests_total"].items()}
    assert requests == {"2xx//alice/gpt-4o": 3, "4xx/model_not_allowed/alice/other": 1,
                        "4xx/invalid_api_key/none/none": 1, "5xx//alice/gpt-4o-mini": 1}
    # histograms: every request has a total time and an overhead; forwarded ones an upstream time
    assert value(found, "gen_ai_client_operation_duration_seconds_count", model="gpt-4o") == 3
    assert value(found, "gen_ai_client_operation_duration_seconds_count") == 6
    assert value(found, "gen_ai_server_request_duration_seconds_count", model="gpt-4o") == 3
    assert value(found, "gen_ai_server_request_duration_seconds_count", model="gpt-4o-mini") == 1
    assert value(found, "gen_ai_server_time_to_first_token_seconds_count") == 1  # the one stream
    assert value(found, "gateway_overhead_seconds_count") == 6
    assert value(found, "gen_ai_client_operation_duration_seconds_bucket", le="600.0") == 6
    # the gateway's time is part of the total, the provider's too
    assert value(found, "gateway_overhead_seconds_sum") < value(found, "gen_ai_client_operation_duration_seconds_sum")
    # tokens and dollars: 2 plain answers (5 + 2) and a stream (5 + 2); the 500 had none
    assert value(found, "gen_ai_client_token_usage_total", key="alice", token_type="input") == 15
    assert value(found, "gen_ai_client_token_usage_total", key="alice", token_type="output") == 6
    assert value(found, "gen_ai_client_token_usage_total", token_type="cached_input") == 0
    assert value(found, "gateway_cost_usd_total", key="alice", model="gpt-4o") == pytest.approx(15 * 1 + 6 * 2)
    assert value(found, "gateway_requests_in_flight", key="alice") == 0
    assert value(found, "gateway_budget_remaining", key="alice", unit="usd") == pytest.approx(1_000_000 - 27)
    assert not found.get("gateway_budget_remaining", {}).keys() & {(("key", "bob"), ("unit", "usd"))}  # no budget
    # no secret in the exposition
    text = scrape(port)[2]
    assert REAL_KEY.encode() not in text and ALICE.encode() not in text


@pytest.mark.e2e
def test_in_flight_counts_a_held_stream(provider, gateway_factory):
    import threading

    release = threading.Event()

    def held(req):
        from tests.fakeprovider import openai_stream
        return Reply.sse(openai_stream(req.json()), hold_after_first=release)

    provider.reset(held)
    port = free_port()
    gw = gateway_factory(keys_file(provider), ["--set", f"metrics_port={port}"])
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True}),
                 {"authorization": f"Bearer {BOB}", "content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and float(r.getheader("x-gateway-overhead-ms")) >= 0
    r.read1()  # the first chunk arrived: the stream is open
    found = scrape_until(port, lambda f: value(f, "gateway_requests_in_flight", key="bob") == 1)
    assert value(found, "gateway_requests_in_flight", key="bob") == 1
    release.set()
    r.read()
    conn.close()
    found = scrape_until(port, lambda f: value(f, "gateway_requests_total", key="bob") == 1)
    assert value(found, "gateway_requests_in_flight", key="bob") == 0
    assert value(found, "gen_ai_server_time_to_first_token_seconds_count", model="gpt-4o") == 1


@pytest.mark.e2e
def test_metrics_token_is_enforced_and_metrics_are_not_on_the_gateway_port(provider, gateway_factory):
    port = free_port()
    gw = gateway_factory(
        keys_file(provider), ["--set", f"metrics_port={port}"], env={"METRICS_TOKEN": "s3cret-metrics"}
    )
    assert post(gw.port, BOB, {"model": "gpt-4o", "messages": MESSAGES})[0] == 200
    status, headers, _ = scrape(port)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert scrape(port, "wrong-token")[0] == 401
    status, headers, body = scrape(port, "s3cret-metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "gateway_requests_total" in samples(body)
    assert scrape(port, "s3cret-metrics", path="/other")[0] == 404
    # the public gateway port does not serve them, token or not
    status, _, body = scrape(gw.port, "s3cret-metrics")
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_path"
    assert "s3cret-metrics" not in gw.log()


@pytest.mark.e2e
def test_metrics_off_loopback_need_a_token(provider, gateway_factory, monkeypatch):
    monkeypatch.delenv("METRICS_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="METRICS_TOKEN"):
        gateway_factory(keys_file(provider), ["--set", f"metrics_port={free_port()}", "--set", "metrics_host=0.0.0.0"])


@pytest.mark.e2e
def test_metrics_off_by_default_and_the_header_still_there(provider, gateway_factory):
    gw = gateway_factory(keys_file(provider))
    status, headers, _ = post(gw.port, BOB, {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 200 and float(headers["x-gateway-overhead-ms"]) >= 0
    assert "metrics at" not in gw.log()


@pytest.mark.e2e
def test_two_workers_one_scrape_shows_their_sum(provider, gateway_factory, tmp_path):
    port = free_port()
    shared = tmp_path / "metrics"
    shared.mkdir()
    shared.chmod(0o755)  # as mkdir leaves it under the usual umask: every local user could list and read it
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    keys = keys_file(provider)
    one = gateway_factory(keys, ["--set", f"metrics_port={port}"], env=env)
    two = gateway_factory(keys, ["--set", f"metrics_port={port}"], env=env)  # the same port (SO_REUSEPORT)
    for gw, count in ((one, 3), (two, 2)):
        for _ in range(count):
            assert post(gw.port, ALICE, {"model": "gpt-4o", "messages": MESSAGES})[0] == 200
    assert post(two.port, ALICE, {"model": "o3", "messages": MESSAGES})[0] == 403

    def summed(f):
        return (value(f, "gateway_requests_total", status_class="2xx") == 5
                and value(f, "gen_ai_client_token_usage_total", token_type="input") == 25)

    found = scrape_until(port, summed)
    assert value(found, "gateway_requests_total", key="alice", status_class="2xx", model="gpt-4o") == 5
    assert value(found, "gateway_requests_total", code="model_not_allowed") == 1
    assert value(found, "gen_ai_client_token_usage_total", token_type="input") == 25
    assert value(found, "gen_ai_client_token_usage_total", token_type="output") == 10
    assert value(found, "gateway_cost_usd_total", key="alice") == pytest.approx(45)
    assert value(found, "gen_ai_client_operation_duration_seconds_count") == 6
    # whichever worker answers, the sum is the same
    for _ in range(6):
        again = samples(scrape(port)[2])
        assert value(again, "gateway_requests_total") == 6
        assert value(again, "gen_ai_server_request_duration_seconds_count") == 5
    assert_private(shared, workers=2)


def assert_private(directory, workers: int) -> None:
    """The workers' value files (key names, tokens, cost): 0600, in a 0700 directory."""
    files = list(directory.glob("*.db"))
    assert len({f.name.rsplit("_", 1)[1] for f in files}) == workers, files  # every worker wrote its own
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700, oct(directory.stat().st_mode)
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {oct(0o600)}, files


# --- bounded labels, in-process over the real hooks ------------------------------------------


@pytest.mark.fleet
def test_run_sh_fleet_serves_the_sum_of_its_workers_on_metrics_port(provider):
    """GATEWAY_WORKERS=2 METRICS_PORT=... ./run.sh: one scrape, every worker's requests."""
    from tests.services.haproxy import FleetProcess

    port = free_port()
    fleet = FleetProcess(keys_file(provider), 2, env={"METRICS_PORT": str(port)}).start()
    try:
        for _ in range(6):  # a new client connection each: HAProxy spreads them over the workers
            assert post(fleet.port, BOB, {"model": "gpt-4o", "messages": MESSAGES})[0] == 200
        # requests are folded on the metrics' timer, tokens when the accounting settles its batch
        found = scrape_until(port, lambda f: value(f, "gateway_requests_total") >= 6
                             and value(f, "gen_ai_client_token_usage_total", key="bob", token_type="input") >= 30)
        assert value(found, "gateway_requests_total", key="bob", status_class="2xx") == 6
        assert value(found, "gen_ai_client_token_usage_total", key="bob", token_type="input") == 30
        files = list((fleet.state_dir / "metrics").glob("counter_*.db"))
        assert len(files) == 2, files  # both workers counted into the shared directory
        assert_private(fleet.state_dir / "metrics", workers=2)
        assert f"metrics at http://127.0.0.1:{port}/metrics" in fleet.log()
    finally:
        fleet.stop()


@pytest.mark.e2e
def test_overhead_excludes_the_providers_time(provider, gateway_factory):
    """A provider that takes 0.6 s: the client waits that long, the gateway's own time is apart."""
    from tests.fakeprovider import openai_completion, openai_stream

    def slow(req):
        body = req.json()
        if body.get("stream"):  # headers at once, then 0.3 s before each event
            return Reply.sse(openai_stream(body), delay=0.3)
        return Reply.json(openai_completion(body), delay=0.6)

    provider.reset(slow)
    port = free_port()
    gw = gateway_factory(keys_file(provider), ["--set", f"metrics_port={port}"])
    t0 = time.monotonic()
    status, headers, _ = post(gw.port, BOB, {"model": "gpt-4o", "messages": MESSAGES})
    total_ms = (time.monotonic() - t0) * 1000
    assert status == 200 and total_ms >= 600
    overhead_ms = float(headers["x-gateway-overhead-ms"])
    assert overhead_ms < total_ms - 500  # the provider's 0.6 s is not in it
    status, headers, body = post(gw.port, BOB, {"model": "gpt-4o", "messages": MESSAGES, "stream": True})
    assert status == 200 and b"[DONE]" in body
    assert float(headers["x-gateway-overhead-ms"]) < 300  # sent before the first event, which took 0.3 s
    found = scrape_until(port, lambda f: value(f, "gateway_requests_total", key="bob") == 2)
    # the same split in the histograms: the provider's time holds the waits, the overhead does not
    assert value(found, "gen_ai_server_request_duration_seconds_sum") >= 0.6 + 0.3 * 6
    assert value(found, "gen_ai_server_time_to_first_token_seconds_sum") >= 0.3
    assert value(found, "gateway_overhead_seconds_sum") == pytest.approx(
        overhead_ms / 1000 + float(headers["x-gateway-overhead-ms"]) / 1000, abs=0.002
    )


@pytest.mark.e2e
def test_provider_unreachable_page_carries_the_overhead_and_is_counted(provider, gateway_factory):
    keys = keys_file(provider)
    keys["virtual_keys"]["vk_nowhere_0003"] = {"provider": "openai", "api_key": REAL_KEY, "name": "nowhere",
                                               "base_url": f"http://127.0.0.1:{free_port()}/v1"}  # nothing listens
    port = free_port()
    gw = gateway_factory(keys, ["--set", f"metrics_port={port}"])
    status, headers, body = post(gw.port, "vk_nowhere_0003", {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_unreachable"
    assert float(headers["x-gateway-overhead-ms"]) >= 0  # mitmproxy's own error page too
    found = scrape_until(port, lambda f: value(f, "gateway_requests_total", key="nowhere") == 1)
    assert value(found, "gateway_requests_total", key="nowhere", status_class="5xx", code="upstream_error") == 1
    assert value(found, "gateway_overhead_seconds_count") == 1
    assert value(found, "gateway_requests_in_flight", key="nowhere") == 0


@pytest.mark.e2e
def test_a_client_that_hangs_up_before_its_answer_is_counted_as_the_ledger_records_it(provider, gateway_factory):
    """Status 0 (the client had gone), not mitmproxy's 502 that nobody received."""
    provider.reset(lambda req: Reply.json({"ok": True}, delay=1.5))
    port = free_port()
    gw = gateway_factory(keys_file(provider), ["--set", f"metrics_port={port}"])
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                  b"authorization: Bearer " + BOB.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while not provider.received and time.monotonic() < deadline:  # forwarded: now hang up
            time.sleep(0.02)
    found = scrape_until(port, lambda f: value(f, "gateway_requests_total", key="bob") == 1)
    assert value(found, "gateway_requests_total", key="bob", status_class="0xx", code="client_closed") == 1
    assert value(found, "gateway_requests_in_flight", key="bob") == 0


def test_target_up_is_0_for_a_target_cooling_down_and_1_for_the_others(provider, gateway_factory):
    dead = socket.socket()  # a port nothing listens on: connections are refused
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    keys = {"virtual_keys": {BOB: {"name": "bob", "targets": [
        {"provider": "openai", "api_key": REAL_KEY, "base_url": f"http://127.0.0.1:{dead_port}/v1"},
        {"provider": "openai", "api_key": "sk-real-provider-key-fallback", "base_url": provider.url + "/v1",
         "fallback": True}]}}}
    port = free_port()
    gw = gateway_factory(keys, ["--set", f"metrics_port={port}", "--set", "cooldown_s=600"])
    before = samples(scrape(port)[2])
    assert (
        value(before, "gateway_target_up", target="bob[0]") == value(before, "gateway_target_up", target="bob[1]") == 1
    )
    status, headers, _ = post(gw.port, BOB, {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 200 and headers["x-gateway-attempts"] == "2"  # the first target refused
    found = scrape_until(port, lambda f: value(f, "gateway_target_up", target="bob[0]") == 0)
    assert value(found, "gateway_target_up", provider="openai", target="bob[0]") == 0
    assert value(found, "gateway_target_up", provider="openai", target="bob[1]") == 1
