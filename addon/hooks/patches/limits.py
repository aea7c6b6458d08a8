"""Request limits that mitmproxy 12 does not enforce itself.

- **Header block.** mitmproxy's HTTP/1 server buffers request head bytes until the blank line,
  without bound (`_http1.Http1Server.read_headers`: "FIXME: protect against header size DoS").
  Past `max_request_header_kb` the client gets a 431 and the connection is closed. (HTTP/2 is
  bounded by h2/hpack: 64 KiB of decoded header list, 64 CONTINUATION frames.)
- **Body.** `max_request_mb` bounds what is read of a request body: above it the client gets a
  413 at once (a content-length above the limit, or a chunked body once it passes it); the rest
  is read and dropped, never kept, and the connection is closed. mitmproxy's own `body_size_limit` would apply
  to provider responses too, so it is not used.
- **Request bytes held at once.** Every request body read is counted, from its first byte until
  its flow ends, over the whole process; past `max_buffered_mb` a request is answered 503 (in its
  API's error shape) instead: at its headers when its content-length would pass the cap, else as
  soon as a piece read passes it (the rest of that body is read and dropped). Memory then comes
  back: after a large body's flow ends it is collected (`_Held.collect` says why that is needed)
  and, once the bodies held are under a quarter of the cap, the C allocator hands its free pages
  back to the system (`malloc_trim`, in a thread); large allocations get pages of their own
  (`map_large_allocations`).
- **Early answers.** A response set in `requestheaders` (a missing or unknown key, a wrong path,
  a key's rpm or budget used up) does not stop mitmproxy from reading the whole body into memory
  before sending it (`HttpStream.state_consume_request_body`). Here such a body is read and
  dropped piece by piece: the answer goes out when a small body ends (the connection stays
  usable), or at once, closing the connection after it, when the body is larger than
  EARLY_ANSWER_BYTES (declared, or read so far): a client is not kept sending megabytes to be
  refused.
- **Trailers.** A chunked request with trailers made mitmproxy raise NotImplementedError and
  close the connection without a word; the client now gets a 400.
- **Unparsable heads.** mitmproxy's own 400 for a head it cannot parse (a bad header line) or
  whose framing it refuses (a bad content-length or transfer-encoding) no longer quotes the
  offending line (it may hold a key).

The 431 and the 400s are made below the flow hooks; they take the error shape of the API on the
request's path all the same (errorpages.error_response; OpenAI's when the request line does not
parse).

These are small wrappers around mitmproxy internals, installed for the life of the addon
(`Patches`: connections still reading through a wrapper when it is taken out go on through
mitmproxy's own code); tests/e2e/test_limits.py drives them through a real mitmdump.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import re
import time
import types
from typing import Callable

from mitmproxy import exceptions, http
from mitmproxy.net.http.http1 import expected_http_body_size, read_request_head
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpResponseHeadersHook,
    HttpStream,
    RequestProtocolError,
    ResponseEndOfMessage,
    ResponseProtocolError,
    SendHttp,
    _http1,
)
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from addon.apis.registry import DEFAULT_API, api_for_path, api_for_request
from addon.routing.state import api_for_flow
from addon.wire.patching import Patches
from addon.hooks.patches.errorpages import error_response
from addon.wire.errors import GatewayError

MB = 1024 * 1024
DEFAULT_MAX_REQUEST_MB = 32  # the providers' own request limit (OpenAI, Anthropic: 32 MB)
DEFAULT_MAX_HEADER_KB = 64
DEFAULT_MAX_BUFFERED_MB = 512
LARGE_FLOW = 4 * MB  # a body this large is collected soon after its flow ends, and its memory handed back
EARLY_ANSWER_BYTES = 1 * MB  # a request answered on its headers with a larger body: answered at once
COLLECT_EVERY = 0.5  # seconds: at most one collection this often while large bodies' flows end

log = logging.getLogger("gateway")


def too_large(limit_bytes: int) -> GatewayError:
    return GatewayError(413, f"request body larger than the gateway's limit of {limit_bytes // MB} MB (max_request_mb)",
                        code="request_too_large")


def _default_refuse(flow: http.HTTPFlow, error: GatewayError) -> None:
    flow.response = http.Response.make(
        error.status, api_for_flow(flow).error_body(error), {"content-type": "application/json"}
    )


class _Limits:
    body = DEFAULT_MAX_REQUEST_MB * MB
    header = DEFAULT_MAX_HEADER_KB * 1024
    refuse: Callable[[http.HTTPFlow, GatewayError], None] = staticmethod(_default_refuse)


limits = _Limits()


class _Held:
    """Request body bytes held by the process: per flow, counted as they are read, released when
    the flow ends. `cap`: max_buffered_mb."""

    def __init__(self) -> None:
        self.cap = DEFAULT_MAX_BUFFERED_MB * MB
        self.total = 0
        self.by_flow: dict[str, int] = {}
        self.dirty = False  # a large body's flow ended since the last collection
        self.collector: asyncio.Task | None = None

    def would_pass(self, more: int) -> bool:
        return self.total + more > self.cap

    def busy(self) -> GatewayError:
        message = f"the gateway holds too many request bodies right now (max_buffered_mb {self.cap // MB}); retry soon"
        return GatewayError(503, message, code="gateway_busy", type="server_error", headers={"retry-after": "1"})

    def grow(self, flow_id: str, size: int) -> bool:
        """The flow's body is `size` bytes so far; False (nothing counted) when that would pass the cap."""
        more = size - self.by_flow.get(flow_id, 0)
        if more <= 0:
            return True
        if self.total + more > self.cap:
            return False
        self.by_flow[flow_id] = size
        self.total += more
        return True

    def release(self, flow_id: str) -> None:
        size = self.by_flow.pop(flow_id, 0)
        if size:
            self.total -= size
            if size >= LARGE_FLOW:
                self.dirty = True
                if self.collector is None or self.collector.done():
                    try:
                        self.collector = asyncio.get_running_loop().create_task(self.collect())
                    except RuntimeError:  # no loop (shutting down)
                        pass

    async def collect(self) -> None:
        """After large bodies' flows end: their memory collected and handed back to the system,
        every COLLECT_EVERY seconds while more end. A flow outlives its last use: mitmproxy's
        HTTP stream holding it is a reference cycle (its state methods are bound to it), so its
        body goes only when the cyclic collector runs, which after a burst (few new objects) may
        be long after; and freed memory stays with the process until the allocator is told."""
        while self.dirty:
            await asyncio.sleep(COLLECT_EVERY)  # (the flows' last hooks and references go first)
            self.dirty = False
            try:
                gc.collect()  # all generations: a flow that lived seconds may be in the oldest
                if _malloc_trim is not None and self.total <= self.cap // 4:
                    await asyncio.to_thread(_malloc_trim, 0)  # (without the GIL)
            except Exception:
                log.exception("gateway: could not hand memory back to the system")
                return


def _glibc(name: str, *argtypes):
    """A glibc function, None elsewhere (musl, macOS)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function


_malloc_trim = _glibc("malloc_trim", ctypes.c_size_t)
_mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024  # (mitmproxy reads 65,535 bytes at a time)


def map_large_allocations() -> None:
    """Allocations from MMAP_THRESHOLD up get pages of their own, handed back when freed. glibc
    otherwise raises its threshold to the largest block freed (up to 32 MB): after one large body,
    the next ones grow in the shared heap, whose free middle is never handed back (measured: a
    burst of 31 MB bodies left 60 more MB resident, and peaked 85 MB higher). Setting it fixes it."""
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
held = _Held()
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a request head (as h11 finds it)
# mitmproxy's quote of the line it could not parse ("Invalid header line: b'...'"): it may hold a key
_CLIENT_BYTES = re.compile(r": b['\"].*", re.S)


def _check_body_size(self: HttpStream, request: bool):
    if request and self.flow.live and (yield from _limit_request_body(self)):
        return True
    return (yield from _stream.original["check_body_size"](self, request))


def _limit_request_body(stream: HttpStream):
    """Called by mitmproxy before the requestheaders hook and for every body piece read."""
    flow = stream.flow
    buf = stream.request_body_buf
    if not buf:  # before the hook: nothing read yet
        return False
    answered = flow.response is not None  # set in requestheaders: the body is not needed
    if answered:
        read = stream.__dict__.get("_gw_read", 0) + len(buf)
        stream.__dict__["_gw_read"] = read
        buf.clear()
        try:
            declared = expected_http_body_size(flow.request)
        except ValueError:
            declared = None
        if max(read, declared or 0) <= EARLY_ANSWER_BYTES:
            return False  # drained; answered when the body ends
    elif len(buf) > limits.body:
        held.release(flow.id)
        buf.clear()
        limits.refuse(flow, too_large(limits.body))
    elif held.grow(flow.id, len(buf)):
        return False
    else:  # the process holds too many request bytes: this body is dropped
        held.release(flow.id)
        buf.clear()
        limits.refuse(flow, held.busy())
    yield from _answer_now(stream)
    return True


def _wait_for_request_headers(self: HttpStream, event):
    """mitmproxy's, then: a response set in requestheaders for a request whose declared body is
    large goes out at once, not after the body was read (and dropped)."""
    yield from _stream.original["state_wait_for_request_headers"](self, event)
    flow = self.flow
    if (flow is None or flow.response is None or event.end_stream or not flow.live
            or self.client_state != self.state_consume_request_body):
        return
    try:
        declared = expected_http_body_size(flow.request)
    except ValueError:
        return
    if declared is not None and declared > EARLY_ANSWER_BYTES:
        yield from _answer_now(self)


def _answer_now(stream: HttpStream):
    """Send the flow's response before the request body has ended; the rest of the body is
    read and dropped. HTTP/1: the response says `connection: close` and is followed by a FIN
    (a client still sending sees the answer, and mitmproxy closes once the body ends or the
    client hangs up; a full close here would leave the socket open in mitmproxy 12.3).
    HTTP/2: the stream is reset after the response."""
    flow = stream.flow
    http1 = not (flow.request.is_http2 or flow.request.is_http3)
    if http1:
        flow.response.headers["connection"] = "close"
    flow.response.timestamp_start = time.time()
    yield HttpResponseHeadersHook(flow)
    yield from stream.send_response()  # the response hook, then headers and body to the client
    yield SendHttp(ResponseEndOfMessage(stream.stream_id), stream.context.client)
    if http1:
        yield commands.CloseTcpConnection(stream.context.client, half_close=True)
    else:
        yield SendHttp(ResponseProtocolError(stream.stream_id, "request body not read", ErrorCode.REQUEST_TOO_LARGE),
                       stream.context.client)
    stream.client_state = stream.state_errored  # later body pieces are dropped
    flow.live = False


def _read_headers(self: _http1.Http1Server, event):
    # what is buffered has no blank line within the limit: the head is too large, whether or not
    # this read completed it (a head that crosses the limit within one read counts too)
    if len(self.buf) > limits.header and isinstance(event, events.DataReceived):
        head = bytes(self.buf)
        if _HEAD_END.search(head, 0, limits.header + 3) is None:
            self.buf = type(self.buf)()
            error = GatewayError(
                431,
                f"request header block larger than the gateway's limit of {limits.header // 1024} KB",
                code="headers_too_large",
            )
            yield commands.SendData(self.conn, error_response(api_of_head(head), error))
            # FIN after the answer; whatever else the client sends is dropped until it hangs up
            yield commands.CloseTcpConnection(self.conn, half_close=True)
            self.state = types.MethodType(_discard, self)
            return
    steps = _server.original["read_headers"](self, event)
    command = next(steps, None)
    if isinstance(command, commands.SendData):  # the only data mitmproxy sends here: its 400
        command = commands.SendData(self.conn, _refused_head(self, steps))
    if command is not None:
        yield command
        yield from steps


def _refused_head(self: _http1.Http1Server, steps) -> bytes:
    """mitmproxy's 400 for a request head it cannot parse (a bad header line) or whose framing it
    refuses (an invalid content-length or transfer-encoding), in the shape of the API on the
    request line once that line parses; OpenAI's when not. The head's lines and the error are
    locals of mitmproxy's read_headers, suspended at that answer (only this failure path looks)."""
    where = steps.gi_frame.f_locals if steps.gi_frame is not None else {}
    lines = [bytes(line) for line in where.get("request_head") or ()]
    if self.request is not None:
        api = api_for_request(self.request)
    else:
        try:
            read_request_head(lines[:1])  # the request line alone
            api = api_of_head(b"\r\n".join(lines))
        except (ValueError, IndexError):
            api = DEFAULT_API
    message = _CLIENT_BYTES.sub("", str(where.get("e") or "invalid request head"))
    return error_response(api, GatewayError(400, message))


def api_of_head(head: bytes):
    """The inbound API of a request head not read to its end: by the request line's path (and
    an `anthropic-version` header among the lines received)."""
    target = head.partition(b"\r\n")[0].split(b" ")
    path = target[1].decode("latin-1") if len(target) > 1 else ""
    return api_for_path(path, b"\nanthropic-version:" in head.lower())


def _discard(self: _http1.Http1Server, event):
    if isinstance(event, events.ConnectionClosed):
        yield commands.CloseConnection(self.conn)
    else:
        self.buf = type(self.buf)()


def _read_body(self: _http1.Http1Server, event):
    try:
        yield from _server.original["read_body"](self, event)
    except NotImplementedError:  # h11 parsed trailers: "HTTP trailers are not implemented yet."
        message = "chunked requests with trailers are not supported"
        error = GatewayError(400, message, code="trailers_not_supported")
        yield commands.SendData(self.conn, error_response(api_for_request(self.request), error))
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(RequestProtocolError(self.stream_id, message, ErrorCode.GENERIC_CLIENT_ERROR))
        self.state = self.done


_stream = Patches(HttpStream, check_body_size=_check_body_size,
                  state_wait_for_request_headers=_wait_for_request_headers)
_server = Patches(_http1.Http1Server, read_headers=_read_headers, read_body=_read_body)


class RequestLimits:
    """Options max_request_mb and max_request_header_kb; installs the wrappers above.
    `refuse(flow, error)`: how a 413 is answered in the client's API format."""

    def __init__(self, refuse: Callable[[http.HTTPFlow, GatewayError], None] | None = None) -> None:
        if refuse is not None:
            limits.refuse = refuse

    def load(self, loader) -> None:
        loader.add_option(
            "max_request_mb", int, DEFAULT_MAX_REQUEST_MB,
            "Largest request body the gateway reads, in MB (after that: 413, connection closed). "
            "Bodies of requests refused on their headers (no or unknown key) are read and dropped, never kept.",
        )
        loader.add_option(
            "max_request_header_kb", int, DEFAULT_MAX_HEADER_KB,
            "Largest HTTP/1 request header block, in KB (after that: 431, connection closed).",
        )
        loader.add_option(
            "max_buffered_mb", int, DEFAULT_MAX_BUFFERED_MB,
            "Request body bytes the gateway holds at once, all requests together, in MB: a request that "
            "would pass it gets a 503 (at its headers when its content-length says so). Bounds memory "
            "under many large requests.",
        )
        _stream.install()
        _server.install()
        map_large_allocations()

    def configure(self, updated) -> None:
        from mitmproxy import ctx

        if "max_request_mb" in updated:
            if not 1 <= ctx.options.max_request_mb <= 4096:
                raise exceptions.OptionsError("max_request_mb must be between 1 and 4096")
            limits.body = ctx.options.max_request_mb * MB
        if "max_request_header_kb" in updated:
            if not 1 <= ctx.options.max_request_header_kb <= 1024:
                raise exceptions.OptionsError("max_request_header_kb must be between 1 and 1024")
            limits.header = ctx.options.max_request_header_kb * 1024
        if "max_buffered_mb" in updated:
            if not 1 <= ctx.options.max_buffered_mb <= 65536:
                raise exceptions.OptionsError("max_buffered_mb must be between 1 and 65536")
            held.cap = ctx.options.max_buffered_mb * MB

    def response(self, flow: http.HTTPFlow) -> None:
        held.release(flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        held.release(flow.id)

    def done(self) -> None:
        _stream.undo()
        _server.undo()
