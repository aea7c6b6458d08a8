"""The gateway's metric set (`GatewayMetrics`: one registry, names in docs/metrics.md), what
labels it takes, and where its values live across workers. The addon part that fills it and
serves it is hooks/metrics.py.

Labels are bounded: key *names* from the keys file, providers from the catalog, model labels
only from the keys file's allow-lists and price table (`ModelLabels`: a glob labels as itself)
else `other`, status classes, and refusal codes the gateway's code defines. No request text
becomes a label.

Across workers: with PROMETHEUS_MULTIPROC_DIR set (before start), prometheus_client keeps values
in per-process files in that directory, and whichever worker answers a scrape sums all workers'
files (`render`). Those files hold key names, tokens and cost: the directory is made 0700 and
each file is created 0600 (`private_multiprocess_dir`; prometheus_client would create them 0666
less the umask, readable by every local user).
"""

from __future__ import annotations

import logging
import os
from fnmatch import fnmatchcase

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client import values as prometheus_values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.process_collector import ProcessCollector

from addon.policy.virtual_keys import MODEL_ANSWERS_KEPT, KeyStore

log = logging.getLogger("gateway")
disable_created_metrics()  # no `_created` series beside every counter and histogram: half the output

# LLM calls: 5 ms (a refusal, a cached answer) to 10 min (a long reasoning stream)
LLM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# the gateway's own time is well under 5 ms when healthy: finer buckets below, the same above
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025) + LLM_BUCKETS
NONE = "none"  # label value where a request has no key, provider or model (refused before)
OTHER = "other"  # model label of a model name the keys file does not name


def label(value: str | None) -> str:
    """A key or provider name as a label value (NONE: not known)."""
    return NONE if value is None else value


def multiprocess_dir() -> str | None:
    """Where prometheus_client keeps per-process values (its own test: the variable is set)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class PrivateMmapedDict(MmapedDict):
    """prometheus_client's per-process value file, created (or found) with mode 0600."""

    def __init__(self, filename, read_mode=False):
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.fchmod(fd, 0o600)  # one left by an earlier process of the same pid, too
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)


def private_multiprocess_dir(directory: str) -> None:
    """Only the gateway's user may list or read the workers' value files: the directory 0700
    (created so if missing), and every file this process writes there 0600. prometheus_client
    looks its file class up by name when it opens a file, so replacing it there is enough."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.stat(directory).st_uid == os.geteuid():
        os.chmod(directory, 0o700)
    else:
        log.warning("gateway: metrics directory %s belongs to another user; it should be private (0700)", directory)
    prometheus_values.MmapedDict = PrivateMmapedDict


class GatewayMetrics:
    """The gateway's metric set in its own registry (a script reload makes a new one, no clash)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if multiprocess_dir() is None:  # in multiprocess mode this process's numbers mean little
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests answered, by key name, provider, model label, status class and "
            "the gateway's refusal code ('' when the provider answered).",
            ("key", "provider", "model", "status_class", "code"), registry=r)
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "Total time of a request as its client sees it: "
            "request received to response sent.", ("provider", "model"), buckets=LLM_BUCKETS, registry=r)
        self.upstream = Histogram(
            "gen_ai_server_request_duration_seconds", "The provider's time: request forwarded to the "
            "provider's last byte.", ("provider", "model"), buckets=LLM_BUCKETS, registry=r)
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Streams: request forwarded to the provider's "
            "first body piece.", ("provider", "model"), buckets=LLM_BUCKETS, registry=r)
        self.overhead = Histogram(
            "gateway_overhead_seconds", "The gateway's own time per request (x-gateway-overhead-ms): "
            "total less the provider's part.", ("provider",), buckets=OVERHEAD_BUCKETS, registry=r)
        self.tokens = Counter(
            "gen_ai_client_token_usage", "Tokens counted, by token type: input (prompt, cached "
            "included), output (completion), cached_input.", ("key", "provider", "model", "token_type"), registry=r)
        self.cost = Counter(
            "gateway_cost_usd", "Cost in USD from the keys file's prices.", ("key", "provider", "model"), registry=r)
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests forwarded and not yet finished, by key name.",
            ("key",), multiprocess_mode="livesum", registry=r)
        self.budget_remaining = Gauge(
            "gateway_budget_remaining", "What is left of a key's budget (unit: usd or tokens) in its "
            "budget period, as of the last scrape.", ("key", "unit"), multiprocess_mode="livemostrecent", registry=r)
        self.guardrails = Counter(
            "gateway_guardrails", "Matches of a key's guardrails, by detector (the built-in ones and the "
            "keys file's custom names) and action: masked (request), answer_masked, blocked.",
            ("detector", "action"), registry=r)
        self.store_errors = Counter(
            "gateway_store_errors", "Errors of the usage store (Redis), by operation.", ("operation",), registry=r)
        self.target_up = Gauge(
            "gateway_target_up", "A target of a key with several targets: 1 up, 0 cooling down after failures, "
            "as of the last scrape. target: 'pool[i]', or 'key name[i]' for a key's own list.", ("provider", "target"),
            multiprocess_mode="livemostrecent", registry=r)

    def render(self) -> bytes:
        """The text exposition; in multiprocess mode the sum over every worker's files."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class ModelLabels:
    """Model name -> label: names in the keys file's `models` lists and price table are their own
    label, a name matching a glob there is labelled by the glob, anything else is `other`."""

    def __init__(self, keys: KeyStore | None) -> None:
        names: set[str] = set()
        globs: list[str] = []
        patterns = list(keys.prices) if keys is not None else []
        for key in keys or ():
            patterns.extend(key.policy.models or ())
        for pattern in patterns:
            if any(c in pattern for c in "*?["):
                if pattern not in globs:
                    globs.append(pattern)
            else:
                names.add(pattern)
        self.names = frozenset(names)
        self.globs = tuple(globs)
        self._answers: dict[str, str] = {}

    def __call__(self, model: str | None) -> str:
        if model is None:
            return NONE
        if model in self.names:
            return model
        label = self._answers.get(model)
        if label is None:
            label = next((g for g in self.globs if fnmatchcase(model, g)), OTHER)
            if len(self._answers) >= MODEL_ANSWERS_KEPT:  # clients choose model names: stay bounded
                self._answers.clear()
            self._answers[model] = label
        return label
