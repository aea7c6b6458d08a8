"""Streams end the way the README promises, even when the provider's side fails mid-way.

When a provider's stream resets, or is ended by `stream_idle_timeout` (wire/timeouts.py),
mitmproxy does not call the stream callable's final `f(b"")`: it calls the `error` hook and then
closes the client connection, so the client would get a cut-off stream with no finish chunk and
no `[DONE]`. This addon's `error` hook runs before mitmproxy closes the client connection (and
before UsageAccounting's): it makes that final call itself, so that

- a translated stream (Anthropic) gets its finish chunk, usage chunk and `[DONE]`, and the
  usage accounting sees the input tokens the provider had reported;
- a stream without a translator (OpenAI-compatible) and a stalled stream get an OpenAI-shaped
  error event, then `[DONE]` (the openai SDK raises APIError at the error event);

and writes those bytes to the client's connection as the last HTTP/1.1 chunks and the
terminating chunk. mitmproxy closes the connection right after. What mitmproxy does not allow:
an HTTP/2 client's stream (or an HTTP/1.1 response framed by content-length) cannot be ended
this way; it is reset as before (the accounting still runs).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http
from mitmproxy.connection import ConnectionState

from addon.wire.errors import error_dict
from addon.wire.sse import DONE, encode_data

log = logging.getLogger("gateway")

BROKEN = error_dict("the provider's stream broke off before its end", "server_error", "upstream_stream_broken")


def stalled(seconds: float) -> dict:
    return error_dict(f"the provider sent nothing for {seconds:g}s; the gateway ended the stream",
                      "timeout", "stream_idle_timeout")


def tail(final: bytes | list[bytes], error: dict | None) -> list[bytes]:
    """What the client gets last: the stream callable's final output, then `error` (if any)
    and [DONE], unless that output ended the stream itself and nothing went wrong after."""
    parts = [final] if isinstance(final, (bytes, bytearray)) else list(final)
    parts = [bytes(p) for p in parts if p]
    done = bool(parts) and parts[-1].endswith(DONE)
    if error is None and done:
        return parts
    if done:
        parts[-1] = parts[-1][: -len(DONE)]
        parts = [p for p in parts if p]
    return [*parts, encode_data(error or BROKEN), DONE]


def chunked(parts: list[bytes]) -> bytes:
    """HTTP/1.1 chunks for `parts`, then the terminating chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


class StreamEnds:
    def error(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        meta = flow.metadata.get("gateway", {})
        if response is None or not callable(response.stream) or not meta.get("stream"):
            return  # not a stream the gateway routed, or its headers never came (errorpages answers)
        try:
            idle = meta.get("idle_timeout")
            final = response.stream(b"")  # the translator's finish; the usage watcher sees it
            response.stream = True  # (whatever happens, it is not called again)
            if client_writable(flow):
                write_to_client(flow, tail(final, stalled(idle) if idle else None))
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
