"""Another upstream attempt inside the same flow, before any byte of the answer left the gateway.

mitmproxy sends one upstream request per flow: `HttpStream` (proxy/layers/http) connects, sends
`flow.request`, and hands the response it gets to the client. This module installs a subclass of
it that can try again, for flows an addon armed (`arm(flow)`), when an attempt fails before the
client was sent anything:

- the connection to the provider fails (refused, reset, DNS, TLS);
- the connection fails or is cut while the response headers are awaited (upstream_timeout cuts it),
  or while a whole (not streamed) response body is read;
- the response headers carry a status in RETRYABLE. For 403 and 429 (BODY_DECIDES) the error body
  is read first (up to FAILED_BODY_KEPT bytes): whose fault the failure was depends on what the
  provider says (a key revoked or a model refused; a rate limit or a request too large).

Then it yields `AttemptFailedHook(flow)`, with the failure in `failure(flow)`. An addon that wants
another attempt points `flow.request` at the next target and calls `retry(flow)`; the stream then
reads and drops the rest of the failed response (an error body: small), and sends `flow.request`
again, on a connection to its (new) address. Everything else is mitmproxy's own path: the attempt
that answers streams chunk by chunk, exactly as a single attempt would, and the addons'
`responseheaders`/`response` hooks see only that attempt. Once a response's headers went to the
client (a stream started) nothing is retried: the client gets what the provider sends.

A flow that was not armed costs one dict lookup per response; the one change for every flow is that
a connection that failed to open is not remembered (forget_failed_connection).
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http
from mitmproxy.connection import Server
from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import (ErrorCode, GetHttpConnection, RequestData, RequestEndOfMessage, RequestHeaders,
                                         RequestTrailers, ResponseData, ResponseEndOfMessage, ResponseHeaders,
                                         ResponseProtocolError, ResponseTrailers, SendHttp)
from mitmproxy.proxy.utils import expect

from addon.wire.patching import Patches

# statuses that move a request to the next target: rate limited, overloaded, down, or the
# target's key refused (401/403). 400, 404, 413, 422 are the request's own fault.
RETRYABLE = frozenset({401, 403, 429, 500, 502, 503, 504, 529})
# statuses whose error body is read before the hook decides (hooks/failover.py, targets.fault)
BODY_DECIDES = frozenset({403, 429})
FAILED_BODY_KEPT = 64 * 1024  # bytes of such a body read at most before deciding (an error body is small)

# of a failed response, what the deciding addon may read (flow metadata stays serialisable, and
# free of the provider's other headers: recordings and mitmweb keep it)
KEPT_HEADERS = ("retry-after", "retry-after-ms")

_ARMED = "gateway.attempts"  # flow.metadata: the failure of the last attempt, and the retry flag


@dataclass
class AttemptFailedHook(commands.StartHook):
    """An upstream attempt of an armed flow failed before any byte reached the client: an addon
    may point flow.request at another target and call retry(flow)."""

    flow: http.HTTPFlow


def arm(flow: http.HTTPFlow) -> None:
    """Let this flow's failed attempts be retried (the caller's attempt_failed hook decides)."""
    flow.metadata[_ARMED] = {}


def armed(flow: http.HTTPFlow) -> bool:
    return _ARMED in flow.metadata


def failure(flow: http.HTTPFlow) -> dict:
    """The last failed attempt: {"status": 429, "headers": {"retry-after": "7"}} (KEPT_HEADERS,
    lowercase) or {"error": "connect: ..."}. For BODY_DECIDES statuses, during the hook only,
    "body": the start of the error body as text (it is not kept in the flow's metadata)."""
    return flow.metadata.get(_ARMED, {}).get("failure", {})


def note_cause(flow: http.HTTPFlow, cause: str) -> None:
    """Said by whoever cuts an armed flow's attempt (upstream_timeout): the failure that follows
    is this `cause` ("connect: the TLS handshake did not finish within 5s"), not mitmproxy's words
    for a cancelled connection ("connection closed")."""
    state = flow.metadata.get(_ARMED)
    if state is not None:
        state["cause"] = cause


def retry(flow: http.HTTPFlow) -> None:
    """Called by an attempt_failed hook that pointed flow.request at another target."""
    flow.metadata[_ARMED]["retry"] = True


def retrying(flow: http.HTTPFlow) -> bool:
    """In an attempt_failed hook: whether an earlier part asked for another attempt."""
    return flow.metadata.get(_ARMED, {}).get("retry", False)


class RetryingHttpStream(http_layer.HttpStream):
    # a failed attempt whose body is read before deciding: (its ResponseHeaders, body, trailers)
    _failed: tuple[ResponseHeaders, bytearray, list] | None = None

    def _armed(self) -> dict | None:
        state = self.flow.metadata.get(_ARMED) if self.flow is not None else None
        return state if state is not None and self.flow.live and self.flow.error is None else None

    def _ask(self, state: dict, what: dict) -> layer.CommandGenerator[bool]:
        """Yield the hook; True: flow.request points at another target, send it."""
        cause = state.pop("cause", None)
        state["failure"] = {"error": cause} if cause is not None and "error" in what else what
        state.pop("retry", None)
        yield AttemptFailedHook(self.flow)
        what.pop("body", None)  # for the hook only: flow metadata is recorded and shown
        return bool(state.pop("retry", False)) and self.flow.live and self.flow.error is None

    def forget_failed_connection(self) -> None:
        """mitmproxy remembers a server connection that failed to open, per client connection, and
        fails every later request of that client to the same address with the old error, without
        trying (a kept-alive client would never reach a provider that is back). Forget it: each
        request gets its own connection attempt."""
        address = (self.flow.request.host, self.flow.request.port)
        for owner in self.context.layers:
            if isinstance(owner, http_layer.HttpLayer):
                # never opened (refused, DNS, timeout), or its task over (a TLS handshake that failed
                # or was cut: its ConnectionClosed came before its end time): nothing of it can come
                # later, which the layer would look it up for
                for connection in [c for c in owner.connections if isinstance(c, Server) and c.error
                                   and (c.timestamp_tcp_setup is None or c.timestamp_end is not None)
                                   and c.address == address]:
                    del owner.connections[connection]
                return

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        while True:
            self.forget_failed_connection()
            connection, err = yield GetHttpConnection(
                (self.flow.request.host, self.flow.request.port),
                self.flow.request.scheme == "https",
                self.flow.server_conn.via,
                self.flow.server_conn.transport_protocol,
            )
            if not err:
                self.context.server = self.flow.server_conn = connection
                return True
            state = self._armed()
            if state is None or not (yield from self._ask(state, {"error": f"connect: {err}"})):
                # mitmproxy's own (super(): http_layer.HttpStream is this class while installed,
                # and this class's would ask the hook about the same failure a second time)
                yield from super().handle_protocol_error(
                    ResponseProtocolError(self.stream_id, err, ErrorCode.CONNECT_FAILED)
                )
                return False

    @expect(ResponseHeaders)
    def state_wait_for_response_headers(self, event: ResponseHeaders) -> layer.CommandGenerator[None]:
        state = self._armed()
        if state is not None and event.response.status_code in RETRYABLE:
            self.flow.response = event.response  # the hook reads the status and Retry-After
            if event.response.status_code in BODY_DECIDES and not event.end_stream:
                self._failed = (event, bytearray(), [])  # the body first: it says whose fault it was
                self.server_state = self.state_read_failed_body
                return
            if (yield from self._ask(state, self._failure(event))):
                self.flow.response = None
                if event.end_stream:
                    yield from self._send_again()
                else:
                    self.server_state = self.state_drop_failed_response
                return
        yield from super().state_wait_for_response_headers(event)

    @staticmethod
    def _failure(event: ResponseHeaders, body: bytes | None = None) -> dict:
        headers = event.response.headers
        what = {"status": event.response.status_code,
                "headers": {name: headers[name] for name in KEPT_HEADERS if name in headers}}
        if body is not None:
            what["body"] = body[:FAILED_BODY_KEPT].decode("utf-8", "replace")
        return what

    @expect(ResponseData, ResponseTrailers, ResponseEndOfMessage)
    def state_read_failed_body(self, event) -> layer.CommandGenerator[None]:
        """A BODY_DECIDES failure's body, read (bounded) before the hook decides on it."""
        headers, body, later = self._failed
        if isinstance(event, ResponseData):
            body += event.data
            if len(body) <= FAILED_BODY_KEPT:
                return
        elif isinstance(event, ResponseTrailers):
            later.append(event)
            return
        yield from self._decide(isinstance(event, ResponseEndOfMessage))

    def _decide(self, ended: bool, broken: ResponseProtocolError | None = None) -> layer.CommandGenerator[None]:
        """The hook decides on a failure whose body was read (all of it when `ended`); without
        another attempt, the response goes on as if its headers had just come: mitmproxy's own
        path (the responseheaders hooks, a whole body or a stream), fed what was read."""
        headers, body, later = self._failed
        state = self._armed()
        if state is not None and (yield from self._ask(state, self._failure(headers, bytes(body)))):
            self._failed = None
            self.flow.response = None
            if ended or broken is not None:
                yield from self._send_again()
            else:
                self.server_state = self.state_drop_failed_response
            return
        self._failed = None
        if broken is not None:
            return (yield from super().handle_protocol_error(broken))
        yield from super().state_wait_for_response_headers(headers)
        if body:
            yield from self.server_state(ResponseData(self.stream_id, bytes(body)))
        for event in later:
            yield from self.server_state(event)
        if ended:
            yield from self.server_state(ResponseEndOfMessage(self.stream_id))

    @expect(ResponseData, ResponseTrailers, ResponseEndOfMessage)
    def state_drop_failed_response(self, event) -> layer.CommandGenerator[None]:
        """The rest of a failed attempt's response: read and dropped, then the next attempt."""
        if isinstance(event, ResponseEndOfMessage):
            yield from self._send_again()

    def handle_protocol_error(self, event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseProtocolError) and self.client_state == self.state_done:
            if self.server_state == self.state_drop_failed_response:  # the failed one broke off: no matter
                return (yield from self._send_again())
            if self.server_state == self.state_read_failed_body:  # broke off while its body was read
                return (yield from self._decide(False, event))
            if self.server_state in (self.state_wait_for_response_headers, self.state_consume_response_body):
                state = self._armed()  # nothing reached the client yet
                if state is not None and (yield from self._ask(state, {"error": event.message})):
                    self.flow.response = None
                    self.response_body_buf.clear()
                    return (yield from self._send_again())
        yield from super().handle_protocol_error(event)

    def _send_again(self) -> layer.CommandGenerator[None]:
        """flow.request as it is now, on a connection to its address (as state_consume_request_body)."""
        self.server_state = self.state_wait_for_response_headers
        failed = self.context.server
        if failed.connected and failed.alpn != b"h2":
            # HTTP/1: this runs while mitmproxy's client for that connection is still handling the
            # failed response's end (it resets itself right after); reused now, it would drop the
            # next answer. A new connection for the next attempt (HTTP/2 multiplexes: reused).
            yield commands.CloseConnection(failed)
        if not (yield from self.make_server_connection()):
            return
        request = self.flow.request
        content = request.raw_content
        yield SendHttp(RequestHeaders(self.stream_id, request, not (content or request.trailers)), self.context.server)
        if content:
            yield SendHttp(RequestData(self.stream_id, content), self.context.server)
        if request.trailers:
            yield SendHttp(RequestTrailers(self.stream_id, request.trailers), self.context.server)
        yield SendHttp(RequestEndOfMessage(self.stream_id), self.context.server)


_streams = Patches(http_layer, HttpStream=RetryingHttpStream)


class Attempts:
    """Installs RetryingHttpStream as mitmproxy's HTTP stream for the life of the addon (streams
    made before it is taken out stay what they are: they need nothing of it)."""

    def load(self, loader) -> None:
        _streams.install()

    def done(self) -> None:
        _streams.undo()
