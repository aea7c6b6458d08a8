"""The real provider key goes on the wire, never on the flow.

mitmproxy sends `flow.request` as it is once the `request` hook returns, and everything that
can read a flow (mitmweb's /flows and /updates, a paused intercept, `save_stream_file`, `export`)
reads that same object. So the gateway puts a placeholder on the flow (`REDACTED.<flow id>`,
where the provider's key header goes) and registers the real key with the upstream address it
routed to. When mitmproxy serialises the request head for the provider connection (HTTP/1:
`Http1Client.send`; HTTP/2: `format_h2_request_headers`) the placeholder is swapped for the key
in the bytes sent, and only if the connection goes to the address the gateway routed to: a host
edited in mitmweb after routing gets the placeholder (and the provider's 401), never the key.

The registration is used once (popped when sent) and dropped with the flow (`forget`).
"""

from __future__ import annotations

from mitmproxy.proxy.layers.http import RequestHeaders, _http1, _http2

from addon.wire.patching import Patches
from addon.wire.secrets import REDACTED

# placeholder (bytes) -> (real key, (host, port) the gateway routed to)
_pending: dict[bytes, tuple[bytes, tuple[str, int]]] = {}


def placeholder(flow_id: str) -> str:
    return f"{REDACTED}.{flow_id}"


def register(flow_id: str, api_key: str, host: str, port: int) -> str:
    """The placeholder to put on the flow instead of `api_key`."""
    token = placeholder(flow_id)
    _pending[token.encode()] = (api_key.encode(), (host, port))
    return token


def forget(flow_id: str) -> None:
    _pending.pop(placeholder(flow_id).encode(), None)


def pending() -> int:
    return len(_pending)


def on_the_wire(fields, address) -> list | None:
    """`fields` with the placeholder replaced by the real key, when the connection's address is
    the routed one; None when there is nothing to swap. Pops the registration either way."""
    for i, (name, value) in enumerate(fields):
        if not value.startswith((b"Bearer REDACTED.", b"REDACTED.")):
            continue
        token = value[7:] if value.startswith(b"Bearer ") else value
        entry = _pending.pop(token, None)
        if entry is None:
            return None
        secret, routed = entry
        if address is None or (address[0], address[1]) != routed:
            return None  # edited after routing: the provider gets the placeholder, not the key
        out = list(fields)
        out[i] = (name, value.replace(token, secret))
        return out
    return None


def _h1_send(self, event):
    if isinstance(event, RequestHeaders):
        swapped = on_the_wire(event.request.headers.fields, self.conn.address)
        if swapped is not None:
            # the head is assembled (to bytes) before this generator's first yield; the flow's
            # headers are put back once that command has been handled
            headers = event.request.headers
            kept, headers.fields = headers.fields, tuple(swapped)
            try:
                return (yield from _client.original["send"](self, event))
            finally:
                headers.fields = kept
    return (yield from _client.original["send"](self, event))


def _h2_request_headers(context, event):
    hdrs = yield from _h2.original["format_h2_request_headers"](context, event)
    swapped = on_the_wire(hdrs, context.server.address)
    return swapped if swapped is not None else hdrs


_client = Patches(_http1.Http1Client, send=_h1_send)
_h2 = Patches(_http2, format_h2_request_headers=_h2_request_headers)


class WireKeys:
    """Installs the swap in mitmproxy's HTTP/1 and HTTP/2 clients for the life of the addon."""

    def load(self, loader) -> None:
        _client.install()
        _h2.install()

    def done(self) -> None:
        _client.undo()
        _h2.undo()
