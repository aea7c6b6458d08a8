"""Prometheus metrics on their own listener, and `x-gateway-overhead-ms` on every response.

`GatewayMetrics` is the metric set (hooks/metricset.py: one registry, names in docs/metrics.md,
its labels, its files across workers). `Metrics` is the addon part, last in the AddonChain so that
its clock sees every other part's work:

- `request`: a routed request's forwarding time goes into the flow's state (`FlowState.forwarded`).
- `responseheaders` (streams) / `response` (whole bodies): the gateway's own time is put on the
  response as `x-gateway-overhead-ms`: from the end of the client's request to the response
  leaving the gateway, less the provider's part (forwarded -> provider's headers for a stream,
  -> provider's last byte otherwise). This runs with metrics off too.
- With `metrics_port` set, each finished flow is noted (a tuple append) and folded into the
  metrics in batches (`fold`, every FOLD_EVERY seconds and before every scrape), as usage
  accounting does and for the same reason (accounting.py). Tokens and dollars are not recomputed:
  `UsageAccounting` hands over what it counts when it settles (`UsageAccounting.counted`).

Across workers (PROMETHEUS_MULTIPROC_DIR set before start): every worker binds the metrics port
with SO_REUSEPORT, and whichever answers a scrape sums all workers' files (docs/metrics.md
argues this). Those files hold key names, tokens and cost, which /metrics guards with
METRICS_TOKEN (and metricset.py keeps private).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import logging
import os
import socket
import time
from collections import Counter as Tally

from mitmproxy import ctx, exceptions, http
from prometheus_client import multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from addon.guard.record import metric_counts
from addon.policy.virtual_keys import KeyStore
from addon.hooks.accounting import client_status
from addon.hooks.metricset import GatewayMetrics, ModelLabels, label, multiprocess_dir, private_multiprocess_dir
from addon.hooks.patches import errorpages
from addon.routing.state import FlowState, state_of

log = logging.getLogger("gateway")

OVERHEAD_HEADER = errorpages.OVERHEAD_HEADER.encode()
FOLD_EVERY = 0.5  # seconds between folds of noted flows into the metrics
FOLD_AT = 10_000  # noted flows folded at once, whatever the timer
MAX_REQUEST_HEAD = 16 * 1024  # a scrape's request line and headers
SCRAPE_READ_TIMEOUT = 10.0

_current: GatewayMetrics | None = None  # the running gateway's metrics: for the module functions below


def count_store_error(operation: str) -> None:
    """For the usage store (Redis): count one failed operation. `operation` must be a constant
    of the store's code (a method name), never request text. A no-op while metrics are off."""
    if _current is not None:
        _current.store_errors.labels(operation).inc()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Metrics:
    def __init__(self, live, accounting=None) -> None:
        self.live = live  # its keys in force name keys and models; its store: budgets remaining
        self.accounting = accounting  # settled before a scrape; hands over tokens and cost
        self.metrics: GatewayMetrics | None = None  # set while metrics_port is on
        self.enabled = False
        self.noted: list[tuple] = []
        self.in_flight: Tally = Tally()  # key name -> forwarded and not finished (this process)
        self._in_flight_shown: dict[str, int] = {}
        self._series: dict[tuple[str, str], tuple] = {}  # (provider, model) -> histogram children
        self._usage_series: dict[tuple[str, str, str], tuple] = {}  # (key, provider, model) -> token, cost children
        self._labels = ModelLabels(None)
        self._labels_of: KeyStore | None = None
        self.sock: socket.socket | None = None
        self.server: asyncio.Task | None = None  # the listener
        self.folder: asyncio.Task | None = None
        self.token = ""

    def load(self, loader) -> None:
        loader.add_option(
            "metrics_port", int, 0,
            "Port of the Prometheus /metrics listener (its own, never the gateway's). 0: off.",
        )
        loader.add_option(
            "metrics_host", str, "127.0.0.1",
            "Address the /metrics listener binds. Other than loopback it needs a metrics token.",
        )
        loader.add_option(
            "metrics_token", str, "",
            "Bearer token /metrics requires. Prefer the METRICS_TOKEN environment variable "
            "(used when this is empty): mitmweb shows options.",
        )

    def configure(self, updated) -> None:
        if not {"metrics_port", "metrics_host", "metrics_token"} & set(updated):
            return
        opts = ctx.options
        port, host = opts.metrics_port, opts.metrics_host
        token = opts.metrics_token or os.environ.get("METRICS_TOKEN", "")
        if not 0 <= port <= 65535:
            raise exceptions.OptionsError(f"metrics_port must be 0 (off) or a port number, not {port}")
        if port and not token and not is_loopback(host):
            raise exceptions.OptionsError(
                f"metrics on {host}:{port} would be public: set METRICS_TOKEN, or bind them to loopback")
        sock = self._bind(host, port) if port else None  # raises OptionsError: before anything changes
        self.stop_listening()
        self.token = token
        self.sock = sock
        self.enabled = port > 0
        global _current
        if self.enabled and self.metrics is None:
            if multiprocess_dir() is not None:
                private_multiprocess_dir(multiprocess_dir())
            self.metrics = GatewayMetrics()
        _current = self.metrics if self.enabled else None
        if self.accounting is not None:
            self.accounting.counted = self.count_usage if self.enabled else None
        if self.enabled:
            self.start_serving()  # (when the event loop runs already; else running() does)
            log.info("gateway: metrics at http://%s:%d/metrics%s%s", host, port,
                     " (bearer token required)" if token else "",
                     f", summed over the workers in {multiprocess_dir()}" if multiprocess_dir() else "")

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if multiprocess_dir() is not None:  # every worker listens; any one answers with the sum
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
            return sock
        except OSError as e:
            raise exceptions.OptionsError(f"metrics_port {host}:{port}: {e.strerror or e}") from None

    def running(self) -> None:
        if self.enabled:
            self.start_serving()

    def done(self) -> None:
        self.stop_listening()
        if self.enabled:
            self.fold()
            if multiprocess_dir() is not None:
                multiprocess.mark_process_dead(os.getpid())  # its in-flight gauge leaves the sum

    def start_serving(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not running yet: running() starts it
            return
        if self.server is None and self.sock is not None:
            self.server = loop.create_task(self._listen(self.sock))
        if self.folder is None:
            self.folder = loop.create_task(self.fold_every())

    async def _listen(self, sock: socket.socket) -> None:
        server = await asyncio.start_server(self.serve, sock=sock, limit=MAX_REQUEST_HEAD)
        try:
            await asyncio.Future()  # until cancelled
        finally:
            server.close()

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.cancel()  # closes the socket
            self.server = None
        elif self.sock is not None:
            self.sock.close()
        self.sock = None
        if self.folder is not None:
            self.folder.cancel()
            self.folder = None

    async def fold_every(self) -> None:
        while True:
            await asyncio.sleep(FOLD_EVERY)
            try:
                self.fold()
            except Exception:
                log.exception("gateway: could not update the metrics")

    # --- hooks -------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or flow.response is not None or flow.error is not None or not flow.live:
            return
        state.forwarded = time.time()
        if self.enabled:
            self.in_flight[label(state.key)] += 1

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is not None and response.stream and flow.live:
            state = state_of(flow)
            forwarded = state.forwarded if state is not None else None
            upstream = response.timestamp_start - forwarded if forwarded else 0.0
            self.put_overhead(flow, response, upstream)

    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.live:
            return
        response = flow.response
        state = state_of(flow)
        forwarded = state.forwarded if state is not None else None
        if response.stream:
            overhead = state.overhead if state is not None else None
        else:
            upstream = (response.timestamp_end or time.time()) - forwarded if forwarded else 0.0
            overhead = self.put_overhead(flow, response, upstream)
        if self.enabled and state is not None:
            self.note(flow, state, response.status_code, forwarded, overhead, state.answered or "")

    def error(self, flow: http.HTTPFlow) -> None:
        if not flow.live:
            return
        state = state_of(flow)
        forwarded = state.forwarded if state is not None else None
        overhead = state.overhead if state is not None else None
        if flow.response is None and flow.error is not None:
            # mitmproxy renders its own error page after this hook: it carries the gateway's
            # time too, the request's way to the provider (the failed provider part is not ours)
            request = flow.request
            overhead = max(0.0, (forwarded or time.time()) - (request.timestamp_end or request.timestamp_start))
            errorpages.put_overhead_on_next(flow.error.msg, f"{overhead * 1000:.3f}")
        if self.enabled and state is not None:
            status = client_status(flow)  # as the ledger records it: 0 when the client had gone
            code = "upstream_timeout" if state.timeout else "client_closed" if status == 0 else "upstream_error"
            self.note(flow, state, status, forwarded, overhead, code)

    def put_overhead(self, flow: http.HTTPFlow, response: http.Response, upstream: float) -> float:
        """Put the gateway's own time on the response; `upstream` the provider's part of it."""
        overhead = max(0.0, time.time() - (flow.request.timestamp_end or flow.request.timestamp_start) - upstream)
        response.headers.fields = (*response.headers.fields, (OVERHEAD_HEADER, b"%.3f" % (overhead * 1000)))
        state = state_of(flow)
        if state is not None:
            state.overhead = overhead
        return overhead

    def note(self, flow: http.HTTPFlow, state: FlowState, status: int, forwarded: float | None, overhead: float | None,
             code: str) -> None:
        """Keep what the metrics need of a finished flow; fold() counts it."""
        if forwarded is not None:
            self.in_flight[label(state.key)] -= 1
        response = flow.response
        ended = (response.timestamp_end if response is not None else None) or time.time()
        self.noted.append(
            (
                state,
                status,
                code,
                ended - flow.request.timestamp_start,
                overhead,
                ended - forwarded if forwarded is not None else None,
                state.first_chunk_at - forwarded if forwarded is not None and state.first_chunk_at else None,
            )
        )
        if len(self.noted) >= FOLD_AT:
            self.fold()

    # --- counting ------------------------------------------------------------------------

    def model_label(self, model: str | None) -> str:
        keys = self.live.keys
        if keys is not self._labels_of:  # the keys file was (re)loaded
            self._labels, self._labels_of = ModelLabels(keys), keys
        return self._labels(model)

    def fold(self) -> None:
        """Count the noted flows into the metrics (and the in-flight gauge)."""
        m = self.metrics
        if m is None:
            return
        noted, self.noted = self.noted, []
        requests: Tally = Tally()
        series = self._series
        for state, status, code, total, overhead, upstream, ttft in noted:
            provider = label(state.provider)
            model = self.model_label(state.model)
            requests[(label(state.key), provider, model, f"{status // 100}xx", code)] += 1
            # a label set's children looked up once: labels() costs as much as an observe
            children = series.get((provider, model))
            if children is None:
                children = series[(provider, model)] = (
                    m.duration.labels(provider, model), m.upstream.labels(provider, model),
                    m.ttft.labels(provider, model), m.overhead.labels(provider))
            duration, upstream_seconds, ttft_seconds, overhead_seconds = children
            duration.observe(max(0.0, total))
            if overhead is not None:
                overhead_seconds.observe(overhead)
            if upstream is not None:
                upstream_seconds.observe(max(0.0, upstream))
            if ttft is not None:
                ttft_seconds.observe(max(0.0, ttft))
        for labels, count in requests.items():
            m.requests.labels(*labels).inc(count)
        for state, *_ in noted:
            if state.guardrails:
                for detector, action, n in metric_counts(state.guardrails):
                    m.guardrails.labels(detector, action).inc(n)
        shown = self._in_flight_shown
        for key, count in self.in_flight.items():
            if shown.get(key) != count:
                m.in_flight.labels(key).set(count)
                shown[key] = count

    def count_usage(self, state: FlowState, prompt: int, completion: int, cached: int, usd: float) -> None:
        """UsageAccounting.counted: one settled request's tokens and dollars."""
        m = self.metrics
        if m is None:
            return
        labels = (label(state.key), label(state.provider), self.model_label(state.model))
        children = self._usage_series.get(labels)
        if children is None:
            children = self._usage_series[labels] = (
                m.tokens.labels(*labels, "input"), m.tokens.labels(*labels, "output"),
                m.tokens.labels(*labels, "cached_input"), m.cost.labels(*labels))
        for child, count in zip(children, (prompt, completion, cached, usd)):
            if count:
                child.inc(count)

    async def update_budgets(self) -> None:
        """Remaining budget of every key that has one, from the store (sync or async)."""
        keys, store, m = self.live.keys, self.live.store, self.metrics
        if keys is None or store is None or m is None:
            return
        now = time.time()
        for key in keys:
            policy = key.policy
            if not policy.has_budget:
                continue
            try:
                spent = store.spend(key.fingerprint, policy.budget_period, now)
                if inspect.isawaitable(spent):
                    spent = await spent
            except Exception:  # the store is unreachable (it logs that once): keep the last values
                return
            if policy.budget_usd is not None:
                m.budget_remaining.labels(key.name, "usd").set(max(0.0, policy.budget_usd - spent.usd))
            if policy.budget_tokens is not None:
                m.budget_remaining.labels(key.name, "tokens").set(max(0, policy.budget_tokens - spent.tokens))

    def update_targets(self) -> None:
        """Up or cooling down, for every target of the keys with several (policy/targets.py);
        read from the store's local cooldown table, no I/O."""
        keys, store, m = self.live.keys, self.live.store, self.metrics
        if keys is None or store is None or m is None:
            return
        now = time.time()
        for key in keys:
            if key.failover:
                for target in key.targets:
                    name = f"{key.name}[{target.label}]" if target.label.isdigit() else target.label
                    m.target_up.labels(target.provider, name).set(0 if store.cooldown_until(target.id) > now else 1)

    # --- the /metrics listener -------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One scrape per connection: GET /metrics, bearer token when one is set."""
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SCRAPE_READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            if len(head) > MAX_REQUEST_HEAD:
                await self._reply(writer, 431, b"request headers too large\n")
                return
            status, body, extra = await self.answer(head)
            await self._reply(writer, status, body, extra)
        except Exception:
            log.exception("gateway: metrics scrape failed")
        finally:
            writer.close()

    async def answer(self, head: bytes) -> tuple[int, bytes, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return 400, b"bad request\n", {}
        method, target = parts[0], parts[1]
        if target.partition("?")[0] != "/metrics":
            return 404, b"not found: the metrics are at /metrics\n", {}
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", {"allow": "GET"}
        if self.token:
            presented = ""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "authorization":
                    scheme, _, presented = value.strip().partition(" ")
                    presented = presented.strip() if scheme.lower() == "bearer" else ""
            if not hmac.compare_digest(presented.encode(), self.token.encode()):
                return (
                    401,
                    b"unauthorized: send 'Authorization: Bearer <metrics token>'\n",
                    {"www-authenticate": 'Bearer realm="metrics"'},
                )
        if self.accounting is not None:
            self.accounting.settle()  # tokens and cost of every finished request
        self.fold()
        await self.update_budgets()
        self.update_targets()
        body = await asyncio.to_thread(self.metrics.render)  # off the event loop
        return 200, (b"" if method == "HEAD" else body), {"content-type": CONTENT_TYPE_LATEST}

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter, status: int, body: bytes, extra: dict[str, str] | None = None
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}.get(status, "Error")
        headers = {"content-type": "text/plain; charset=utf-8", **(extra or {}),
                   "content-length": str(len(body)), "connection": "close"}
        writer.write(f"HTTP/1.1 {status} {reason}\r\n".encode() +
                     "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n" + body)
        await writer.drain()

