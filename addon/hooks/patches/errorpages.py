"""JSON instead of mitmproxy's HTML error pages.

When a provider cannot be reached, mitmproxy's protocol layer writes its own HTML 502 before any
addon can answer. This addon swaps that renderer (for the life of the addon) for a JSON error in
the shape of the inbound API the request was made on (OpenAI's, or Anthropic's on /v1/messages:
apis/registry.py), so SDKs raise a proper APIStatusError with a readable message.

The renderer is not told which request it answers. mitmproxy's HttpStream (which has the flow)
hands the error to the connection layer, which renders it at once, in the same step: its
`handle_protocol_error` (unreachable, timed out, broken off) is wrapped to name the flow for
exactly that step. Not `check_invalid` (mitmproxy's request-smuggling checks of headers): it runs
for every request and response, and a generator wrapper there cost ~20 k instructions per request
(bench/instructions.py, +0.2%). Its rare 400/502 pages follow mitmproxy's error hook instead,
which runs right before them: the hook marks the error message with the flow's API (the page
for that message takes it), as the timeout and overhead marks below do.

HTTP/1 pages are whole responses (`_http1.make_error_response`). For HTTP/2, mitmproxy writes
`content-type: text/html` and the status of its own error code (a 504 went out as 502) before
the body: `Http2Server._handle_event` is wrapped to send the page's own status and headers.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import socket
import time

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.utils import human
from mitmproxy.proxy.commands import SendData
from mitmproxy.proxy.layers.http import HttpStream, ResponseProtocolError, SendHttp, _http1, _http2

from addon.apis.base import InboundAPI
from addon.wire.patching import Patches
from addon.apis.registry import DEFAULT_API
from addon.routing.state import api_for_flow, state_of
from addon.hooks.accesslog import key_name
from addon.wire.errors import ERROR_SOURCE, GatewayError

# mitmproxy error message -> (our timeout text, until when), set by the timeout addon's error
# hook right before mitmproxy renders that flow's error (the renderer is not told which flow it
# is for). An entry not used at once (the client had gone) must not turn a later, unrelated
# failure with the same message into a 504: it expires.
log = logging.getLogger("gateway")

_timeouts: dict[str, tuple[str, float]] = {}
# the same by flow id, for a page rendered knowing its flow (naming_the_flow): flows cut at once
# fail with the same message ("connection closed"), and each must find its own mark
_flow_timeouts: dict[str, tuple[str, float]] = {}
# the same for the x-gateway-overhead-ms value of the page (hooks/metrics.py's error hook)
_overheads: dict[str, tuple[str, float]] = {}
# the same for the API of the flow that failed with that message (JsonErrorPages.error)
_apis: dict[str, tuple[InboundAPI, float]] = {}
TIMEOUT_MARK_SECONDS = 1.0
OVERHEAD_HEADER = "x-gateway-overhead-ms"
# flow.metadata: headers an addon wants on that flow's error page (hooks/failover.py's "retry
# at once" when a failed attempt cannot be retried inside the flow)
PAGE_HEADERS = "gateway.page_headers"


def _mark(marks: dict, message: str, value) -> None:
    now = time.monotonic()
    for stale in [m for m, (_, until) in marks.items() if until < now]:
        del marks[stale]
    marks[message] = (value, now + TIMEOUT_MARK_SECONDS)


def answer_next_as_timeout(message: str, text: str) -> None:
    _mark(_timeouts, message, text)


def answer_as_timeout(flow: http.HTTPFlow, text: str) -> None:
    """The error page of `flow` (failed, its error hook running) is a 504 saying `text`."""
    _mark(_flow_timeouts, flow.id, text)
    answer_next_as_timeout(flow.error.msg, text)  # for a page rendered without its flow


def put_overhead_on_next(message: str, value: str) -> None:
    """The next error page for `message` carries x-gateway-overhead-ms: `value`."""
    _mark(_overheads, message, value)


def _classify(status: int, message: str, flow: http.HTTPFlow | None = None) -> tuple[int, str, str | None]:
    mark = None
    if status == 502:
        if flow is None:
            mark = _timeouts.pop(message, None)
        else:
            mark = _flow_timeouts.pop(flow.id, None)
            if mark is not None:
                _timeouts.pop(message, None)  # the mark by message its error hook made as well
    if mark is not None and mark[1] >= time.monotonic():
        return 504, mark[0], "upstream_timeout"
    text = message or http.status_codes.RESPONSES.get(status, "error")
    if status == 502:
        # mitmproxy's text names the provider's address ("Connect call failed ('10.0.0.5', 443)"):
        # the operator's log gets it, the client gets the cause and the key's name
        state = state_of(flow) if flow is not None else None
        if state is None or state.key is None:
            log.warning("gateway: provider unreachable: %s", text)
            return 502, "provider unreachable (the gateway's log has the details)", "upstream_unreachable"
        provider, name = state.provider if state.provider is not None else "the provider", key_name(state)
        log.warning("gateway: provider unreachable for key %s: %s at %s: %s", name, provider,
                    human.format_address((flow.request.host, flow.request.port)), text)
        cause = unreachable_cause(text, flow.request.host, flow.request.scheme == "https")
        return (
            502,
            f"the gateway could not reach the provider ({provider}) for virtual key '{name}': {cause}",
            "upstream_unreachable",
        )
    return status, text, None


_ERRNO = re.compile(r"\[Errno (-?\d+)\]")
_DNS = {
    getattr(socket, n)
    for n in ("EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA", "EAI_ADDRFAMILY")
    if hasattr(socket, n)
}


def unreachable_cause(message: str, host: str, tls: bool) -> str:
    """mitmproxy's connect or TLS error text as the cause a client can act on. The address
    (an internal IP, a port) is left to the log; a DNS failure names the host the keys file gives."""
    m = _ERRNO.search(message)
    number = int(m.group(1)) if m else None
    if number in _DNS or "name or service not known" in message.lower():
        return f"the DNS lookup of {host} failed"
    if number == errno.ECONNREFUSED:
        return "the provider refused the connection (nothing listens at its base_url)"
    if number == errno.ETIMEDOUT or "timed out" in message.lower():
        return "connecting to the provider timed out"
    if number in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "no route to the provider (network unreachable)"
    if tls and number is None:  # connected: what failed is the TLS handshake (OpenSSL's words)
        return f"the TLS handshake with the provider failed: {message[:200]}"
    return "could not connect to the provider"


class _Rendering:
    flow: http.HTTPFlow | None = None  # whose error mitmproxy renders in this step, if known


_rendering = _Rendering()


def _answering(message: str) -> tuple[InboundAPI, http.HTTPFlow | None]:
    """The API of the flow whose error is being rendered: the flow named for this step, else the
    one the error hook marked with this message, else OpenAI's; and the named flow, if any."""
    flow, _rendering.flow = _rendering.flow, None  # one render per naming
    mark = _apis.pop(message, None)
    if flow is not None:
        return api_for_flow(flow), flow
    return (mark[0] if mark is not None and mark[1] >= time.monotonic() else DEFAULT_API), None


def error_page(api: InboundAPI, error: GatewayError, extra: dict[str, str] | None = None) -> http.Response:
    """An answer made below the flow hooks, carrying `error` in `api`'s shape."""
    headers = http.Headers(Server=version.MITMPROXY, Content_Type="application/json",
                           **{ERROR_SOURCE.replace("-", "_"): "gateway"}, **(extra or {}))
    return http.Response.make(error.status, api.error_body(error), headers)


def error_response(api: InboundAPI, error: GatewayError, extra: dict[str, str] | None = None) -> bytes:
    """`error_page` as a whole HTTP/1 response (the connection closes after it)."""
    return _http1_bytes(error_page(api, error, extra))


def _http1_bytes(page: http.Response) -> bytes:
    page.headers["connection"] = "close"
    return http1.assemble_response(page)


def mitmproxy_page(status: int, message: str) -> http.Response:
    """The gateway's page for an error mitmproxy answers itself (`status`, its `message`)."""
    overhead = _overheads.pop(message, None)
    api, flow = _answering(message)
    page = flow.metadata.get(PAGE_HEADERS) if flow is not None else None
    status, text, code = _classify(status, message, flow)
    extra = {OVERHEAD_HEADER: overhead[0]} if overhead is not None and overhead[1] >= time.monotonic() else None
    if page:
        extra = {**extra, **page} if extra else page
    return error_page(api, GatewayError(status, text, code=code), extra)


def json_error_response(status: int, message: str = "") -> bytes:
    """In place of `_http1.make_error_response`."""
    return _http1_bytes(mitmproxy_page(status, message))


def _h2_error_page(self: _http2.Http2Server, event):
    """Wraps `Http2Server._handle_event`: an error for a stream whose response has not started
    gets the gateway's page, status and headers included (mitmproxy's own branch for it writes
    text/html and its error code's status); every other event is mitmproxy's."""
    if (isinstance(event, ResponseProtocolError) and (status := event.code.http_status_code()) is not None
            and self.is_open_for_us(event.stream_id)
            and not self.h2_conn.streams[event.stream_id].state_machine.headers_sent):
        page = mitmproxy_page(status, event.message)
        headers = [
            (b":status", b"%d" % page.status_code),
            *((name.lower(), value) for name, value in page.headers.fields),
        ]
        self.h2_conn.send_headers(event.stream_id, headers)
        self.h2_conn.send_data(event.stream_id, page.content, end_stream=True)
        yield SendData(self.conn, self.h2_conn.data_to_send())
    else:
        yield from _h2.original["_handle_event"](self, event)


def naming_the_flow(method):
    """Wrap an HttpStream generator method: while a ResponseProtocolError it yields for the
    client is handled (the connection layer renders it then, synchronously), the renderer
    knows the flow. Replies to blocking commands pass through unchanged."""

    @functools.wraps(method)
    def wrapper(self: HttpStream, *args):
        steps = method(self, *args)
        reply = None
        while True:
            try:
                command = steps.send(reply)
            except StopIteration as stop:
                return stop.value
            if isinstance(command, SendHttp) and isinstance(command.event, ResponseProtocolError):
                _rendering.flow = self.flow
                try:
                    reply = yield command
                finally:
                    _rendering.flow = None
            else:
                reply = yield command

    return wrapper


_pages = Patches(_http1, make_error_response=json_error_response)
_h2 = Patches(_http2.Http2Server, _handle_event=_h2_error_page)
# the HttpStream methods whose error answers to the client are rendered in the flow's shape
_named = Patches(HttpStream, handle_protocol_error=naming_the_flow(HttpStream.handle_protocol_error))


class JsonErrorPages:
    def load(self, loader) -> None:
        for patches in (_pages, _h2, _named):
            patches.install()

    def error(self, flow: http.HTTPFlow) -> None:
        """mitmproxy renders the pages of its header validation (check_invalid) right after this
        hook, not told which flow they are for: the page with this message takes this flow's API."""
        if flow.error is not None:
            _mark(_apis, flow.error.msg, api_for_flow(flow))

    def done(self) -> None:
        for patches in (_pages, _h2, _named):
            patches.undo()
