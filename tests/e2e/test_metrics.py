"""Prometheus metrics and x-gateway-overhead-ms: scraped from real gateway processes and parsed
with prometheus_client's own parser; the label bound in-process over the real hooks."""

from __future__ import annotations

import http.client
import json
import random
import socket
import string
import time

import pytest
from mitmproxy import http as mhttp
from mitmproxy.test import taddons, tflow
from prometheus_client.parser import text_string_to_metric_families

from addon.hooks.chain import AddonChain
from addon.gateway import Gateway
from addon.policy.store import MemoryStore
from addon.hooks.accounting import UsageAccounting
from addon.hooks.metrics import OTHER, Metrics, ModelLabels
from addon.policy.keys import parse_keys
from tests.fakeprovider import Reply, default_reply

REAL_KEY = "sk-real-provider-key-123456"
ALICE = "vk_alice_metrics_0001"
BOB = "vk_bob_metrics_0002"
# $1 per prompt token, $2 per completion token: costs are exact small numbers
PRICES = {"gpt-4o": {"input": 1_000_000, "output": 2_000_000}, "gpt-4o-mini": {"input": 0, "output": 0}}
MESSAGES = [{"role": "user", "content": "hi"}]


def keys_file(provider) -> dict:
    return {
        "providers": {"openai": {"base_url": provider.url + "/v1"}},
        "prices": PRICES,
        "virtual_keys": {
            ALICE: {"provider": "openai", "api_key": REAL_KEY, "name": "alice", "models": ["gpt-4o", "gpt-4o-mini"],
                    "budget_usd": 1_000_000},  # room for the worst case each request reserves (~$65,600 here)
            BOB: {"provider": "openai", "api_key": REAL_KEY, "name": "bob"},
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def samples(text: bytes) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}, via prometheus_client's parser."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for k, v in found.get(name, {}).items() if want <= set(k))


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
        return Reply.json({"error": {"message": "upstream broke", "type": "server_error", "param": None, "code": None}}, 500)
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
    gw = gateway_factory(keys_file(provider), ["--set", f"metrics_port={port}"], env={"METRICS_TOKEN": "s3cret-metrics"})
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
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
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


# --- bounded labels, in-process over the real hooks ------------------------------------------


def test_model_labels_come_from_the_keys_file_only():
    keys = parse_keys({"prices": {"gpt-4o": {"input": 1, "output": 1}, "claude-*": {"input": 1, "output": 1}},
                       "virtual_keys": {"vk_1": {"provider": "openai", "api_key": "sk-x1234567890", "models": ["o3", "gpt-4.1*"]}}})
    label = ModelLabels(keys)
    assert [label(m) for m in ("gpt-4o", "o3", "gpt-4.1-mini", "claude-3-opus", "gpt-4o-2024", "../etc", None)] == \
        ["gpt-4o", "o3", "gpt-4.1*", "claude-*", OTHER, OTHER, "none"]


def test_ten_thousand_random_model_names_do_not_make_ten_thousand_series(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({
        "prices": {"gpt-4o": {"input": 1, "output": 1}},
        "virtual_keys": {"vk_open": {"provider": "openai", "api_key": "sk-open-0000000000", "name": "open",
                                     "base_url": "http://127.0.0.1:9/v1"},
                         "vk_listed": {"provider": "openai", "api_key": "sk-listed-000000000", "name": "listed",
                                       "models": ["gpt-4o"], "base_url": "http://127.0.0.1:9/v1"}}}))
    store = MemoryStore()
    gateway, accounting = Gateway(store), UsageAccounting(store)
    metrics = Metrics(gateway, accounting, store)
    rng = random.Random(15)
    chain = AddonChain(gateway, accounting, metrics)  # in the gateway's order, Metrics last
    with taddons.context(chain) as tctx:
        tctx.configure(chain, keys_file=str(keys), usage_db="", metrics_port=free_port())
        for i in range(10_000):
            model = "".join(rng.choices(string.ascii_letters + string.digits + '"{}\\\n', k=rng.randint(1, 40)))
            body = json.dumps({"model": model, "messages": MESSAGES}).encode()
            vk = "vk_open" if i % 2 else "vk_listed"  # forwarded, or refused (model not allowed)
            flow = tflow.tflow(req=mhttp.Request.make("POST", "http://127.0.0.1:8080/v1/chat/completions", body,
                                                      {"authorization": f"Bearer {vk}", "content-type": "application/json"}))
            chain.request(flow)
            if flow.response is None:
                flow.response = mhttp.Response.make(200, json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode(),
                                                    {"content-type": "application/json"})
            chain.responseheaders(flow)
            chain.response(flow)
            assert flow.response.headers["x-gateway-overhead-ms"]
        accounting.settle()
        metrics.fold()
        found = samples(metrics.metrics.render())
        chain.done()
    requests = found["gateway_requests_total"]
    assert sum(requests.values()) == 10_000
    assert {dict(k)["model"] for k in requests} == {OTHER}
    assert len(requests) == 2  # open/2xx/other, listed/4xx/model_not_allowed/other
    series = sum(len(v) for v in found.values())
    assert series < 200, series
    assert value(found, "gen_ai_client_token_usage_total", key="open", model=OTHER, token_type="input") == 3 * 5000


def test_grafana_dashboard_queries_only_metrics_and_labels_the_gateway_exports():
    import re
    from pathlib import Path

    from addon.hooks.metrics import GatewayMetrics

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json").read_text())
    names = {family.name for family in GatewayMetrics().registry.collect()}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {re.sub(r"_(bucket|total|count|sum)$", "", name)
            for expr in exprs for name in re.findall(r"\b(gateway_\w+|gen_ai_\w+)", expr)}
    assert used <= names, used - names
    assert {"gateway_requests", "gateway_overhead_seconds", "gen_ai_server_time_to_first_token_seconds",
            "gen_ai_client_token_usage", "gateway_cost_usd"} <= used
    labels = {label.strip() for expr in exprs for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
    labels |= {label for expr in exprs for label in re.findall(r"(\w+)=~?\"", expr)}
    assert labels <= {"key", "provider", "model", "status_class", "code", "token_type", "unit", "le"}, labels


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
        assert f"metrics at http://127.0.0.1:{port}/metrics" in fleet.log()
    finally:
        fleet.stop()


def test_supervisor_removes_a_dead_workers_in_flight_share_only(tmp_path, monkeypatch):
    from fleet.supervisor import forget_metrics

    for name in ("gauge_livesum_4242.db", "gauge_livemostrecent_4242.db", "counter_4242.db", "gauge_livesum_4343.db"):
        (tmp_path / name).write_bytes(b"")
    forget_metrics(4242)  # no PROMETHEUS_MULTIPROC_DIR: nothing to do
    assert len(list(tmp_path.iterdir())) == 4
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    forget_metrics(4242)
    # its live gauges leave the sum; its counters stay (past requests happened); other workers untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4242.db", "gauge_livesum_4343.db"]


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
    assert value(found, "gateway_overhead_seconds_sum") == pytest.approx(overhead_ms / 1000 + float(headers["x-gateway-overhead-ms"]) / 1000, abs=0.002)


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
    assert value(before, "gateway_target_up", target="bob[0]") == value(before, "gateway_target_up", target="bob[1]") == 1
    status, headers, _ = post(gw.port, BOB, {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 200 and headers["x-gateway-attempts"] == "2"  # the first target refused
    found = scrape_until(port, lambda f: value(f, "gateway_target_up", target="bob[0]") == 0)
    assert value(found, "gateway_target_up", provider="openai", target="bob[0]") == 0
    assert value(found, "gateway_target_up", provider="openai", target="bob[1]") == 1
