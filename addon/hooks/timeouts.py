"""Provider timeouts.

- `upstream_timeout`: a routed request that has no response headers after that many seconds is
  abandoned and the client gets an OpenAI-shaped 504.
- `stream_idle_timeout`: a streamed response that receives no byte from the provider for that
  many seconds is ended; the client gets an error event and [DONE] (hooks/streamends.py).

mitmproxy itself only has an inactivity timeout (tcp_timeout, 10 min by default). These addons
cancel the flow's server connection task; mitmproxy then reports the flow as failed, and
errorpages renders the 504 (it cannot see the flow, so the error hook hands it the message) or
streamends ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, exceptions, http

from addon.hooks.accesslog import word
from addon.hooks.patches import attempts

from addon.hooks.patches import errorpages
log = logging.getLogger("gateway")


def seconds_option(name: str) -> float:
    """A positive number of seconds from a str option (mitmproxy options cannot be floats)."""
    value = getattr(ctx.options, name)
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if not 0 < seconds < float("inf"):
        raise exceptions.OptionsError(f"{name} must be a positive number of seconds, not {value!r}")
    return seconds


def cancel_server_connection(flow: http.HTTPFlow) -> bool:
    """Stop the flow's server connection task: mitmproxy then fails the flow (error hook)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
    io = handler.transports.get(flow.server_conn) if handler else None
    if io is None or io.handler is None:
        return False  # not connected through a transport we can stop; tcp_timeout still applies
    io.handler.cancel()
    return True


class Sweeper:
    """One sweep task for all flows, every second at most (a TimerHandle per request costs more
    than a dict entry): subclasses say what `expire(now)` ends."""

    seconds: float
    sweeper: asyncio.Task | None = None

    def running(self) -> None:
        self.sweeper = asyncio.get_running_loop().create_task(self.sweep())

    def done(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.seconds / 4))
            try:
                self.expire(time.monotonic())
            except Exception:
                log.exception("gateway: %s check failed", type(self).__name__)

    def expire(self, now: float) -> None:
        raise NotImplementedError

    def answer_as_timeout(self, flow: http.HTTPFlow, expired: set[str], text: str) -> None:
        """In the error hook of a flow this addon cut (its id in `expired`): mitmproxy's error
        answer becomes a 504 with `text`, and the ledger and metrics see a timeout."""
        if flow.id in expired:
            expired.discard(flow.id)
            flow.metadata.setdefault("gateway", {})["timeout"] = True
            if flow.error:
                errorpages.answer_next_as_timeout(flow.error.msg, text)


# the options' defaults, in seconds (fleet/supervisor.py sizes HAProxy's timeouts on them)
UPSTREAM_TIMEOUT = 600
STREAM_IDLE_TIMEOUT = 120


class UpstreamTimeout(Sweeper):
    def __init__(self) -> None:
        # flow id -> (deadline, flow), in arrival order, which is deadline order: one sweep task
        # instead of a timer per request (a TimerHandle costs more than a dict entry)
        self.waiting: dict[str, tuple[float, http.HTTPFlow]] = {}
        self.expired: set[str] = set()
        self.seconds = float(UPSTREAM_TIMEOUT)

    def load(self, loader) -> None:
        loader.add_option(
            "upstream_timeout", str, str(UPSTREAM_TIMEOUT),
            "Seconds a provider may take to start answering a routed request before the "
            "gateway gives up and answers 504. Streams are not cut once they have started.",
        )

    def configure(self, updated) -> None:
        if "upstream_timeout" in updated:
            self.seconds = seconds_option("upstream_timeout")

    def expire(self, now: float) -> None:
        while self.waiting:
            flow_id, (deadline, flow) = next(iter(self.waiting.items()))
            if deadline > now:
                break  # (after a runtime change of upstream_timeout, order is approximate)
            del self.waiting[flow_id]
            self._expire(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or "provider" not in flow.metadata.get("gateway", {}):
            return
        self.waiting[flow.id] = (time.monotonic() + self.seconds, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)

    def attempt_failed(self, flow: http.HTTPFlow) -> None:
        if attempts.retrying(flow):  # another attempt (another target): its own upstream_timeout
            self.expired.discard(flow.id)
            self.waiting.pop(flow.id, None)
            self.waiting[flow.id] = (time.monotonic() + self.seconds, flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)
        self.answer_as_timeout(flow, self.expired, f"provider did not answer within {self.seconds:g}s")

    def _cancel(self, flow: http.HTTPFlow) -> None:
        self.waiting.pop(flow.id, None)

    def _expire(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        self.expired.add(flow.id)
        if cancel_server_connection(flow):
            log.warning("gateway: %s timed out after %gs", word(flow.request.pretty_url), self.seconds)
        else:
            self.expired.discard(flow.id)


class StreamIdleTimeout(Sweeper):
    """Ends a response whose provider went quiet after its headers for `stream_idle_timeout`
    seconds: a stream that sent no byte for that long (the client gets an error event and
    [DONE], hooks/streamends.py), or a whole body still incomplete that long after its headers
    (the client gets a 504, as for upstream_timeout).

    Each streamed response's callable is wrapped to note the time of every piece; the sweep
    looks at every response in flight."""

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[http.HTTPFlow, list[float]]] = {}  # flow id -> (flow, [last byte])
        self.expired: set[str] = set()  # whole bodies cut (for the error hook's 504)
        self.seconds = float(STREAM_IDLE_TIMEOUT)

    def load(self, loader) -> None:
        loader.add_option(
            "stream_idle_timeout", str, str(STREAM_IDLE_TIMEOUT),
            "Seconds a provider may go quiet after its response headers: a stream that sends no "
            "byte for that long is ended with an error event (code stream_idle_timeout) and "
            "[DONE]; a whole body not complete by then gets a 504.",
        )

    def configure(self, updated) -> None:
        if "stream_idle_timeout" in updated:
            self.seconds = seconds_option("stream_idle_timeout")

    def expire(self, now: float) -> None:
        for flow_id, (flow, last) in list(self.waiting.items()):
            if now - last[0] < self.seconds:
                continue
            del self.waiting[flow_id]
            if flow.error is not None or not flow.live or flow.response is None:
                continue
            streamed = bool(flow.response.stream)
            if streamed:
                flow.metadata.setdefault("gateway", {})["idle_timeout"] = self.seconds
            else:
                self.expired.add(flow_id)
            if cancel_server_connection(flow):
                log.warning("gateway: %s: %s, nothing from the provider for %gs", word(flow.request.pretty_url),
                            "stream ended" if streamed else "response body abandoned", self.seconds)
            else:
                self.expired.discard(flow_id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        meta = flow.metadata.get("gateway", {})
        if response is None or "provider" not in meta or "answered" in meta:
            return  # not routed, or answered by the gateway itself
        last = [time.monotonic()]
        self.waiting[flow.id] = (flow, last)
        if not response.stream:
            return  # a whole body: its deadline runs from the headers
        inner = response.stream
        monotonic = time.monotonic

        def stream(piece: bytes):
            last[0] = monotonic()
            return inner(piece) if callable(inner) else piece

        response.stream = stream

    def response(self, flow: http.HTTPFlow) -> None:
        self.waiting.pop(flow.id, None)

    def attempt_failed(self, flow: http.HTTPFlow) -> None:
        if attempts.retrying(flow):  # a whole body cut: another attempt, whose headers start again
            self.expired.discard(flow.id)
            self.waiting.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.waiting.pop(flow.id, None)
        self.answer_as_timeout(flow, self.expired, f"provider sent its response headers but not the body within {self.seconds:g}s")
