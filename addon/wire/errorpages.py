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
(bench/instructions.py, +0.2%); its rare 400/502 pages keep OpenAI's shape.
"""

from __future__ import annotations

import functools
import logging
import time

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import HttpStream, ResponseProtocolError, SendHttp, _http1, _http2

from addon.apis.base import InboundAPI
from addon.apis.registry import DEFAULT_API, api_for_flow
from addon.wire.errors import ERROR_SOURCE, GatewayError

# mitmproxy error message -> (our timeout text, until when), set by the timeout addon's error
# hook right before mitmproxy renders that flow's error (the renderer is not told which flow it
# is for). An entry not used at once (the client had gone) must not turn a later, unrelated
# failure with the same message into a 504: it expires.
log = logging.getLogger("gateway")

_timeouts: dict[str, tuple[str, float]] = {}
# the same for the x-gateway-overhead-ms value of the page (usage/metrics.py's error hook)
_overheads: dict[str, tuple[str, float]] = {}
TIMEOUT_MARK_SECONDS = 1.0
OVERHEAD_HEADER = "x-gateway-overhead-ms"


def _mark(marks: dict, message: str, value) -> None:
    now = time.monotonic()
    for stale in [m for m, (_, until) in marks.items() if until < now]:
        del marks[stale]
    marks[message] = (value, now + TIMEOUT_MARK_SECONDS)


def answer_next_as_timeout(message: str, text: str) -> None:
    _mark(_timeouts, message, text)


def put_overhead_on_next(message: str, value: str) -> None:
    """The next error page for `message` carries x-gateway-overhead-ms: `value` (HTTP/1 only:
    mitmproxy's HTTP/2 error path takes a body, not headers)."""
    _mark(_overheads, message, value)


def _classify(status: int, message: str) -> tuple[int, str, str | None]:
    mark = _timeouts.pop(message, None) if status == 502 else None
    if mark is not None and mark[1] >= time.monotonic():
        return 504, mark[0], "upstream_timeout"
    text = message or http.status_codes.RESPONSES.get(status, "error")
    if status == 502:
        # mitmproxy's text names the provider's address ("Connect call failed ('10.0.0.5', 443)"):
        # the operator's log gets it, the client does not
        log.warning("gateway: provider unreachable: %s", text)
        return 502, "provider unreachable (the gateway's log has the details)", "upstream_unreachable"
    return status, text, None


class _Rendering:
    flow: http.HTTPFlow | None = None  # whose error mitmproxy renders in this step, if known


_rendering = _Rendering()


def _answering() -> InboundAPI:
    """The API of the flow whose error is being rendered (OpenAI's when it is not known)."""
    flow, _rendering.flow = _rendering.flow, None  # one render per naming
    return api_for_flow(flow) if flow is not None else DEFAULT_API


def json_error(status: int, message: str) -> bytes:
    _overheads.pop(message, None)
    status, text, code = _classify(status, message)
    return _answering().error_body(GatewayError(status, text, code=code))


def error_response(api: InboundAPI, error: GatewayError, extra: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1 error response (the connection closes after it) carrying `error` in
    `api`'s shape: for answers made below the flow hooks."""
    headers = http.Headers(Server=version.MITMPROXY, Connection="close", Content_Type="application/json",
                           **{ERROR_SOURCE.replace("-", "_"): "gateway"}, **(extra or {}))
    return http1.assemble_response(http.Response.make(error.status, api.error_body(error), headers))


def json_error_response(status: int, message: str = "") -> bytes:
    status, text, code = _classify(status, message)
    overhead = _overheads.pop(message, None)
    extra = {OVERHEAD_HEADER: overhead[0]} if overhead is not None and overhead[1] >= time.monotonic() else None
    return error_response(_answering(), GatewayError(status, text, code=code), extra)


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


# the HttpStream methods whose error answers to the client are rendered in the flow's shape
_NAMED = ("handle_protocol_error",)


class JsonErrorPages:
    def __init__(self) -> None:
        self._saved = None

    def load(self, loader) -> None:
        if self._saved is None:
            self._saved = (_http1.make_error_response, _http2.format_error, *(getattr(HttpStream, n) for n in _NAMED))
            _http1.make_error_response = json_error_response
            _http2.format_error = json_error  # HTTP/2 keeps its text/html content-type header
            for name in _NAMED:
                setattr(HttpStream, name, naming_the_flow(getattr(HttpStream, name)))

    def done(self) -> None:
        if self._saved is not None:
            _http1.make_error_response, _http2.format_error, *methods = self._saved
            for name, method in zip(_NAMED, methods):
                setattr(HttpStream, name, method)
            self._saved = None
