"""Streams end the way the README promises, even when the provider's side fails mid-way.

When a provider's stream resets, or is ended by `stream_idle_timeout` (hooks/timeouts.py),
mitmproxy does not call the stream callable's final `f(b"")`: it calls the `error` hook and then
closes the client connection, so the client would get a cut-off stream with no finish chunk and
no `[DONE]`. This addon's `error` hook runs before mitmproxy closes the client connection (and
before UsageAccounting's): it makes that final call itself, so that

- a translated stream (Anthropic) gets its finish chunk, usage chunk and `[DONE]`, and the
  usage accounting sees the input tokens the provider had reported;
- a stream without a translator (OpenAI-compatible) and a stalled stream get the client API's
  error event (`InboundAPI.stream_error`; OpenAI: an error chunk, then `[DONE]`, and the openai
  SDK raises APIError at the error chunk);

and writes those bytes to the client's connection as the last HTTP/1.1 chunks and the
terminating chunk. mitmproxy closes the connection right after. What mitmproxy does not allow:
an HTTP/2 client's stream (or an HTTP/1.1 response framed by content-length) cannot be ended
this way; it is reset as before (the accounting still runs).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http
from mitmproxy.connection import ConnectionState

from addon.apis.registry import APIS, DEFAULT_API
from addon.routing.state import state_of
from addon.wire.sse import DONE

log = logging.getLogger("gateway")

BROKEN = ("the provider's stream broke off before its end", "upstream_stream_broken")


def stalled(seconds: float) -> tuple[str, str]:
    return f"the provider sent nothing for {seconds:g}s; the gateway ended the stream", "stream_idle_timeout"


def tail(final: bytes | list[bytes], error_events: list[bytes], idle: bool) -> list[bytes]:
    """What the client gets last. A translator's final output ends the stream itself (finish
    chunk, usage, [DONE]); without one, or after a stall, the API's error events end it (after
    the translator's output, less its [DONE])."""
    parts = [final] if isinstance(final, (bytes, bytearray)) else list(final)
    parts = [bytes(p) for p in parts if p]
    if parts and not idle:
        return parts
    if parts and parts[-1].endswith(DONE):
        parts[-1] = parts[-1][: -len(DONE)]
    return [*(p for p in parts if p), *error_events]


def chunked(parts: list[bytes]) -> bytes:
    """HTTP/1.1 chunks for `parts`, then the terminating chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


class StreamEnds:
    def error(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        state = state_of(flow)
        if response is None or not callable(response.stream) or state is None or not state.stream:
            return  # not a stream the gateway routed, or its headers never came (errorpages answers)
        try:
            idle = state.idle_timeout
            final = response.stream(b"")  # the translator's finish; the usage watcher sees it
            response.stream = True  # (whatever happens, it is not called again)
            if client_writable(flow):
                message, code = stalled(idle) if idle else BROKEN
                events = APIS.get(state.api, DEFAULT_API).stream_error(message, code)
                write_to_client(flow, tail(final, events, bool(idle)))
        except Exception:
            log.exception("gateway: could not end a broken stream for the client")


def client_writable(flow: http.HTTPFlow) -> bool:
    """The client is still there (it did not hang up: that is what failed then) and its
    response is HTTP/1.1 chunked, so that more chunks and the end can be written."""
    return bool(
        flow.client_conn.state & ConnectionState.CAN_WRITE
        and flow.request.http_version == "HTTP/1.1"
        and flow.response.headers.get("transfer-encoding", "").strip().lower() == "chunked"
    )


def write_to_client(flow: http.HTTPFlow, parts: list[bytes]) -> bool:
    """Write the last chunks straight to the client's transport, in order after what mitmproxy
    has written (its writes are synchronous, and the flow is paused in this hook)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
    io = handler.transports.get(flow.client_conn) if handler else None
    writer = io.writer if io else None
    if writer is None or writer.is_closing():
        return False
    writer.write(chunked(parts))
    return True
