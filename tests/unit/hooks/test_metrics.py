"""Prometheus metrics (addon/hooks/metrics.py) in-process: the model label bound over the real hooks
and the Grafana dashboard's queries. Scraped from real gateway processes: tests/e2e/test_metrics.py."""

from __future__ import annotations

import json
import random
import string

from mitmproxy import http as mhttp
from mitmproxy.test import taddons, tflow

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from addon.hooks.chain import AddonChain
from addon.hooks.gateway import Gateway
from addon.hooks.live import Live
from addon.policy.memory_store import MemoryStore
from addon.hooks.accounting import UsageAccounting
from addon.hooks.metrics import Metrics
from addon.hooks.metricset import OTHER, ModelLabels
from addon.policy.keys_parse import parse_keys

MESSAGES = [{"role": "user", "content": "hi"}]


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


def test_model_labels_come_from_the_keys_file_only():
    keys = parse_keys(
        {
            "prices": {"gpt-4o": {"input": 1, "output": 1}, "claude-*": {"input": 1, "output": 1}},
            "virtual_keys": {"vk_1": {"provider": "openai", "api_key": "sk-x1234567890", "models": ["o3", "gpt-4.1*"]}},
        }
    )
    label = ModelLabels(keys)
    assert [label(m) for m in ("gpt-4o", "o3", "gpt-4.1-mini", "claude-3-opus", "gpt-4o-2024", "../etc", None)] == \
        ["gpt-4o", "o3", "gpt-4.1*", "claude-*", OTHER, OTHER, "none"]


NAMES = 2_000


def test_two_thousand_random_model_names_do_not_make_a_series_each(tmp_path):
    """A label per model name would make 2,000 series here (10x the bound); the labels come from the
    keys file, so there are a handful. (2,000, not more: each flow is built by mitmproxy's test helpers,
    which cost far more than the hooks under test.)"""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({
        "prices": {"gpt-4o": {"input": 1, "output": 1}},
        "virtual_keys": {"vk_open": {"provider": "openai", "api_key": "sk-open-0000000000", "name": "open",
                                     "base_url": "http://127.0.0.1:9/v1"},
                         "vk_listed": {"provider": "openai", "api_key": "sk-listed-000000000", "name": "listed",
                                       "models": ["gpt-4o"], "base_url": "http://127.0.0.1:9/v1"}}}))
    store = MemoryStore()
    live = Live(store)
    gateway, accounting = Gateway(live), UsageAccounting(live)
    metrics = Metrics(live, accounting)
    rng = random.Random(15)
    chain = AddonChain(gateway, accounting, metrics)  # in the gateway's order, Metrics last
    with taddons.context(chain) as tctx:
        tctx.configure(chain, keys_file=str(keys), usage_db="", metrics_port=free_port())
        for i in range(NAMES):
            model = "".join(rng.choices(string.ascii_letters + string.digits + '"{}\\\n', k=rng.randint(1, 40)))
            body = json.dumps({"model": model, "messages": MESSAGES}).encode()
            vk = "vk_open" if i % 2 else "vk_listed"  # forwarded, or refused (model not allowed)
            flow = tflow.tflow(
                req=mhttp.Request.make(
                    "POST",
                    "http://127.0.0.1:8080/v1/chat/completions",
                    body,
                    {"authorization": f"Bearer {vk}", "content-type": "application/json"},
                )
            )
            chain.request(flow)
            if flow.response is None:
                flow.response = mhttp.Response.make(
                    200,
                    json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode(),
                    {"content-type": "application/json"},
                )
            chain.responseheaders(flow)
            chain.response(flow)
            assert flow.response.headers["x-gateway-overhead-ms"]
        accounting.settle()
        metrics.fold()
        found = samples(metrics.metrics.render())
        chain.done()
    requests = found["gateway_requests_total"]
    assert sum(requests.values()) == NAMES
    assert {dict(k)["model"] for k in requests} == {OTHER}
    assert len(requests) == 2  # open/2xx/other, listed/4xx/model_not_allowed/other
    series = sum(len(v) for v in found.values())
    assert series < 200, series
    assert (
        value(found, "gen_ai_client_token_usage_total", key="open", model=OTHER, token_type="input") == 3 * NAMES // 2
    )


def test_grafana_dashboard_queries_only_metrics_and_labels_the_gateway_exports():
    import re
    from pathlib import Path

    from addon.hooks.metricset import GatewayMetrics

    dashboard = json.loads((Path(__file__).resolve().parents[3] / "deploy" / "grafana-dashboard.json").read_text())
    names = {family.name for family in GatewayMetrics().registry.collect()}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {re.sub(r"_(bucket|total|count|sum)$", "", name)
            for expr in exprs for name in re.findall(r"\b(gateway_\w+|gen_ai_\w+)", expr)}
    assert used <= names, used - names
    assert {"gateway_requests", "gateway_overhead_seconds", "gen_ai_server_time_to_first_token_seconds",
            "gen_ai_client_token_usage", "gateway_cost_usd"} <= used
    labels = {
        label.strip() for expr in exprs for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")
    }
    labels |= {label for expr in exprs for label in re.findall(r"(\w+)=~?\"", expr)}
    assert labels <= {"key", "provider", "model", "status_class", "code", "token_type", "unit", "le"}, labels
