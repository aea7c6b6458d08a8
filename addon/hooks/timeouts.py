"""Provider timeouts.

- `upstream_timeout`: a routed request that has no response headers after that many seconds is
  abandoned and the client gets a 504 in its API's shape, whatever it was waiting for: the TCP
  connect, the TLS handshake or the headers.
- `stream_idle_timeout`: a streamed response that receives no byte from the provider for that
  many seconds is ended; the client gets an error event and [DONE] (hooks/streamends.py).

mitmproxy itself only has an inactivity timeout (tcp_timeout, 10 min by default). These addons
cancel the task of the provider connection the flow is on, or waits for; mitmproxy then reports
the flow as failed, and errorpages renders the 504 (it cannot see the flow, so the error hook
hands it the message) or streamends ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.connection import Server
from mitmproxy.proxy.layer import NextLayer
from mitmproxy.proxy.layers.http import GetHttpConnection, HttpLayer

from addon.hooks.accesslog import word
from addon.hooks.patches import attempts, errorpages

from addon.routing.state import state_for, state_of
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


def client_handler(flow: http.HTTPFlow):
    """mitmproxy's ConnectionHandler of the flow's client connection (None once it is gone)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.connections.get(flow.client_conn.id) if proxyserver else None


def cancel_server_connection(flow: http.HTTPFlow) -> bool:
    """Stop the flow's server connection task: mitmproxy then fails the flow (error hook)."""
    handler = client_handler(flow)
    io = handler.transports.get(flow.server_conn) if handler else None
    if io is None or io.handler is None:
        return False  # not connected through a transport we can stop; tcp_timeout still applies
    io.handler.cancel()
    return True


def http_layer(handler) -> HttpLayer | None:
    """The HTTP layer of a client connection's stack (reverse mode: NextLayer, ReverseProxy,
    NextLayer, [ClientTLSLayer, NextLayer,] HttpLayer)."""
    layer = handler.layer
    for _ in range(16):
        if layer is None or isinstance(layer, HttpLayer):
            return layer
        layer = layer.layer if isinstance(layer, NextLayer) else getattr(layer, "child_layer", None)
    return None


def connection_being_opened(layer: HttpLayer, flow: http.HTTPFlow) -> tuple[Server | None, list[http.HTTPFlow]]:
    """The provider connection `flow` waits for, not open yet (its TCP connect or TLS handshake
    under way), and every flow waiting for it (HTTP/2 clients share one); (None, []) when the flow
    waits for no connection. Until the connection is open the flow's server_conn is not it (the
    placeholder, or an earlier attempt's connection): mitmproxy's HTTP layer knows which it is, by
    the GetHttpConnection command the flow's stream is blocked on."""
    asked = next((command for command, stream in layer.command_sources.items()
                  if isinstance(command, GetHttpConnection) and getattr(stream, "flow", None) is flow), None)
    if asked is None:
        return None, []
    for connection, commands in layer.waiting_for_establishment.items():
        if any(command is asked for command in commands):
            streams = [layer.command_sources.get(command) for command in commands]
            return connection, [s.flow for s in streams if getattr(s, "flow", None) is not None]
    return None, []


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

    def answer_as_timeout(self, flow: http.HTTPFlow, expired: dict[str, str]) -> None:
        """In the error hook of a flow this addon cut (its id in `expired`, with the client's
        text): mitmproxy's error answer becomes a 504 with that text, and the ledger and metrics
        see a timeout."""
        text = expired.pop(flow.id, None)
        if text is not None:
            state_for(flow).timeout = True
            if flow.error:
                errorpages.answer_as_timeout(flow, text)


# the options' defaults, in seconds (fleet/supervisor.py sizes HAProxy's timeouts on them)
UPSTREAM_TIMEOUT = 600
STREAM_IDLE_TIMEOUT = 120

# what an attempt cut by upstream_timeout was waiting for -> (the client's 504 text, the failed
# attempt's cause for failover's cooldown line), each formatted with the seconds
WAITED_FOR = {
    "connect": ("could not connect to the provider within {:g}s", "connect: no connection within {:g}s"),
    "handshake": ("the provider did not finish the TLS handshake within {:g}s",
                  "connect: the TLS handshake did not finish within {:g}s"),
    "headers": ("provider did not answer within {:g}s", "no response headers within {:g}s"),
}


class UpstreamTimeout(Sweeper):
    def __init__(self) -> None:
        # flow id -> (deadline, flow), in arrival order, which is deadline order: one sweep task
        # instead of a timer per request (a TimerHandle costs more than a dict entry)
        self.waiting: dict[str, tuple[float, http.HTTPFlow]] = {}
        self.expired: dict[str, str] = {}  # flow id -> the client's 504 text
        self.seconds = float(UPSTREAM_TIMEOUT)

    def load(self, loader) -> None:
        loader.add_option(
            "upstream_timeout", str, str(UPSTREAM_TIMEOUT),
            "Seconds a provider may take to start answering a routed request (connecting, the "
            "TLS handshake and the response headers, per attempt) before the gateway gives up "
            "and answers 504. Streams are not cut once they have started.",
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
        if flow.response or flow.error or (state := state_of(flow)) is None or state.provider is None:
            return
        self.waiting[flow.id] = (time.monotonic() + self.seconds, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)

    def attempt_failed(self, flow: http.HTTPFlow) -> None:
        if attempts.retrying(flow):  # another attempt (another target): its own upstream_timeout
            self.expired.pop(flow.id, None)
            self.waiting.pop(flow.id, None)
            self.waiting[flow.id] = (time.monotonic() + self.seconds, flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)
        self.answer_as_timeout(flow, self.expired)

    def _cancel(self, flow: http.HTTPFlow) -> None:
        self.waiting.pop(flow.id, None)

    def _expire(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        handler = client_handler(flow)
        layer = http_layer(handler) if handler is not None else None
        connection, cut = connection_being_opened(layer, flow) if layer is not None else (None, [])
        if connection is not None:
            # not connected yet: the connection task it waits for is stopped, for every flow
            # waiting for it (their provider never got that far either)
            io = handler.transports.get(connection)
            if io is None or io.handler is None:
                return
            waited_for = "connect" if connection.timestamp_tcp_setup is None else "handshake"
        elif cancel_server_connection(flow):
            io, waited_for, cut = None, "headers", [flow]
        else:
            return  # not connected through a transport we can stop; tcp_timeout still applies
        text, cause = (template.format(self.seconds) for template in WAITED_FOR[waited_for])
        for each in cut:
            self.waiting.pop(each.id, None)
            self.expired[each.id] = text
            attempts.note_cause(each, cause)  # failover's cooldown line says it, not mitmproxy's words
        if io is not None:
            io.handler.cancel()
        log.warning("gateway: %s timed out after %gs (%s)", word(flow.request.pretty_url), self.seconds, cause)


class StreamIdleTimeout(Sweeper):
    """Ends a response whose provider went quiet after its headers for `stream_idle_timeout`
    seconds: a stream that sent no byte for that long (the client gets an error event and
    [DONE], hooks/streamends.py), or a whole body still incomplete that long after its headers
    (the client gets a 504, as for upstream_timeout).

    Each streamed response's callable is wrapped to note the time of every piece; the sweep
    looks at every response in flight."""

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[http.HTTPFlow, list[float]]] = {}  # flow id -> (flow, [last byte])
        self.expired: dict[str, str] = {}  # whole bodies cut: flow id -> the error hook's 504 text
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
                state_for(flow).idle_timeout = self.seconds
            else:
                self.expired[flow_id] = f"provider sent its response headers but not the body within {self.seconds:g}s"
            if cancel_server_connection(flow):
                log.warning("gateway: %s: %s, nothing from the provider for %gs", word(flow.request.pretty_url),
                            "stream ended" if streamed else "response body abandoned", self.seconds)
            else:
                self.expired.pop(flow_id, None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        state = state_of(flow)
        if response is None or state is None or state.provider is None or state.answered is not None:
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
            self.expired.pop(flow.id, None)
            self.waiting.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.waiting.pop(flow.id, None)
        self.answer_as_timeout(flow, self.expired)
