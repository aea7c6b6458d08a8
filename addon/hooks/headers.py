"""What the gateway hides in headers: the client's secrets on the flow (replaced by their
fingerprint marker before any view sees them), the client headers never forwarded, the
provider's account headers never returned, and the real key once it was sent (redaction)."""

from __future__ import annotations

import functools

from mitmproxy import http

from addon.hooks.messages import BODY_HEADERS, Fields
from addon.providers.registry import PROVIDERS
from addon.routing.state import state_of
from addon.wire.keyplaces import KEY_HEADERS, hide_cookies
from addon.wire.secrets import REDACTED, hide

# client headers that must never reach a provider: every place of a virtual key (wire/keyplaces.py),
# client-chosen account scoping that would not match the gateway's key, and the hop-by-hop
# headers RFC 9110 (7.6.1) says a proxy removes whether or not Connection names them
DROPPED_HEADERS = (*KEY_HEADERS, "cookie", "proxy-authorization", "openai-organization", "openai-project",
                   "keep-alive", "proxy-connection", "te", "upgrade")
_DROPPED = frozenset(name.encode() for name in DROPPED_HEADERS)
# client headers carrying a secret: replaced on the flow (requestheaders) before any view sees it
CLIENT_SECRETS = frozenset({*(name.encode() for name in KEY_HEADERS), b"proxy-authorization", b"cookie"})
# Connection options that can never be hop-by-hop (RFC 9110 7.6.1: "a field that is intended for
# all recipients"): the message's framing and its Host, which the gateway sets itself
_NOT_HOP = frozenset({b"close", b"keep-alive", b"host", b"content-length", b"transfer-encoding", b"content-type",
                      b"content-encoding"})
# of a Connection header, what a hop may keep: the connection's own fate, which mitmproxy reads
_CONNECTION_KEPT = frozenset({b"close", b"keep-alive"})
# provider response headers that only describe the provider's connection
_RESPONSE_HOP = frozenset({b"keep-alive", b"proxy-connection", b"upgrade", b"te"})
# provider response headers that belong to the gateway's account, not the client's
ACCOUNT_HEADERS = frozenset({b"set-cookie", b"openai-organization", b"openai-project", b"anthropic-organization-id"})
_REDACTED = REDACTED.encode()
_SECRET_HEADERS = {name: provider.secret_header.encode() for name, provider in PROVIDERS.items()}
MARKERS_KEPT = 4096


@functools.lru_cache(maxsize=64)
def replaced_header_names(upstream_names: tuple[str, ...], new_body: bool) -> frozenset[bytes]:
    """Client headers (lowercase bytes) not forwarded: the client's auth, those the provider
    sets, and with a new body its framing (content-length, content-encoding)."""
    dropped = _DROPPED.union(name.lower().encode() for name in upstream_names)
    return dropped | BODY_HEADERS if new_body else dropped


def hide_secret(value: bytes, name: bytes = b"") -> bytes:
    """A client secret header value as the flow keeps it: its fingerprint marker (for a Cookie,
    every cookie's value)."""
    text = value.decode("utf-8", "surrogateescape")
    hidden = hide_cookies(text, hide) if name == b"cookie" else hide(text)
    return value if hidden == text else hidden.encode("utf-8", "surrogateescape")


def hop_by_hop(fields: Fields, names: list[bytes]) -> tuple[set[bytes], tuple | None]:
    """What a proxy must not pass on of a message's Connection header (RFC 9110 7.6.1): the
    header names it lists (never the framing, Host or the gateway's own headers: those are set
    after this), and the Connection field as it may go on (`close`/`keep-alive` only: mitmproxy
    reads them for the connection's fate; None: none)."""
    options: set[bytes] = set()
    for (_, value), name in zip(fields, names):
        if name == b"connection":
            options.update(o.strip().lower() for o in value.split(b","))
    options.discard(b"")
    kept = options & _CONNECTION_KEPT
    return options - _NOT_HOP, ((b"connection", b", ".join(sorted(kept))) if kept else None)


def drop_hop_by_hop(request: http.Request, fields: Fields, names: list[bytes]) -> Fields:
    """A client request's Connection header applied on the flow, at its headers: the headers
    it names were for the hop to the gateway and end here (dropped now: mitmproxy's own h2c
    handling would otherwise delete the Connection header and leave them; a key header it names
    stays for the gateway to read, and is never forwarded anyway), and it keeps only `close`/
    `keep-alive`, so it can name none of the headers the gateway sets later. The new fields."""
    if names.count(b"connection") == 1 and fields[names.index(b"connection")][1].strip().lower() in _CONNECTION_KEPT:
        return fields  # `Connection: keep-alive` (what the SDKs send): nothing to do
    named, connection = hop_by_hop(fields, names)
    named -= CLIENT_SECRETS  # a key named there is for this hop, the gateway's: read, then never forwarded
    kept = tuple(f for f, n in zip(fields, names) if n != b"connection" and n not in named)
    request.headers.fields = kept + ((connection,) if connection else ())
    return request.headers.fields


def response_hop_by_hop(response: http.Response, names: list[bytes]) -> bool:
    """The provider's hop-by-hop headers off a response, before the gateway adds its own (a
    provider's `Connection: x-gateway-attempts` must not make a proxy after the gateway drop
    it). True: the headers changed."""
    fields = response.headers.fields
    if b"connection" in names:
        named, connection = hop_by_hop(fields, names)
        if not named and _RESPONSE_HOP.isdisjoint(names):
            return False  # `Connection: keep-alive` (most providers), nothing else: as it is
        dropped = named | _RESPONSE_HOP | {b"connection"}
        kept = tuple(f for f, n in zip(fields, names) if n not in dropped)
        response.headers.fields = kept + ((connection,) if connection else ())
        return True
    if not _RESPONSE_HOP.isdisjoint(names):
        response.headers.fields = tuple(f for f, n in zip(fields, names) if n not in _RESPONSE_HOP)
        return True
    return False


def _indices(names: list[bytes], name: bytes) -> list[int]:
    """Where `name` occurs in names (list.index scans in C; a name is rarely repeated)."""
    first = names.index(name)
    if names.count(name) == 1:
        return [first]
    return [i for i, n in enumerate(names) if n == name]


def hide_client_secrets(
    request: http.Request, fields: Fields, names: list[bytes], markers: dict[bytes, bytes] | None
) -> None:
    """Every client secret header on the flow replaced by its marker. `markers`: known header
    value -> marker, remembered for authenticated clients (a marker costs a SHA-256)."""
    new = list(fields)
    for i in [i for secret in CLIENT_SECRETS.intersection(names) for i in _indices(names, secret)]:
        value = fields[i][1]
        if names[i] == b"cookie":  # (not remembered: its own form, and rarely the same twice)
            new[i] = (fields[i][0], hide_secret(value, b"cookie"))
            continue
        hidden = markers.get(value) if markers is not None else None
        if hidden is None:
            hidden = hide_secret(value)
            if markers is not None:
                if len(markers) >= MARKERS_KEPT:
                    markers.clear()
                markers[value] = hidden
        new[i] = (fields[i][0], hidden)
    request.headers.fields = tuple(new)


def redact(flow: http.HTTPFlow) -> None:
    """The real key is on the request object while it is sent; overwrite it afterwards so
    no view, log line or saved flow carries it."""
    state = state_of(flow)
    if state is None or state.provider is None:
        return
    secret = _SECRET_HEADERS[state.provider]
    fields = flow.request.headers.fields
    # the forwarding dropped every client header of this name and appended the provider's one
    # after the client's headers: look from the end, and stop at it
    for i in range(len(fields) - 1, -1, -1):
        name, value = fields[i]
        if name.lower() == secret:
            if value != _REDACTED:
                flow.request.headers.fields = (*fields[:i], (name, _REDACTED), *fields[i + 1:])
            return
