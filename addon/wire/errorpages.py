"""JSON instead of mitmproxy's HTML error pages.

When a provider cannot be reached, mitmproxy's protocol layer writes its own HTML 502 before any
addon can answer. This addon swaps that renderer (for the life of the addon) for an
OpenAI-shaped JSON error, so SDKs raise a proper APIStatusError with a readable message.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1, _http2

from addon.wire.errors import ERROR_SOURCE, error_body, error_type

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


def json_error(status: int, message: str) -> bytes:
    _overheads.pop(message, None)
    status, text, code = _classify(status, message)
    return error_body(text, error_type(status), code=code)


def json_error_response(status: int, message: str = "") -> bytes:
    status, text, code = _classify(status, message)
    headers = http.Headers(Server=version.MITMPROXY, Connection="close", Content_Type="application/json",
                           **{ERROR_SOURCE.replace("-", "_"): "gateway"})
    overhead = _overheads.pop(message, None)
    if overhead is not None and overhead[1] >= time.monotonic():
        headers[OVERHEAD_HEADER] = overhead[0]
    resp = http.Response.make(status, error_body(text, error_type(status), code=code), headers)
    return http1.assemble_response(resp)


class JsonErrorPages:
    def __init__(self) -> None:
        self._saved = None

    def load(self, loader) -> None:
        if self._saved is None:
            self._saved = (_http1.make_error_response, _http2.format_error)
            _http1.make_error_response = json_error_response
            _http2.format_error = json_error  # HTTP/2 keeps its text/html content-type header

    def done(self) -> None:
        if self._saved is not None:
            _http1.make_error_response, _http2.format_error = self._saved
            self._saved = None
