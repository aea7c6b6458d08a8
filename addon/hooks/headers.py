"""What the gateway hides in headers: the client's secrets on the flow (replaced by their
fingerprint marker before any view sees them), the client headers never forwarded, the
provider's account headers never returned, and the real key once it was sent (redaction)."""

from __future__ import annotations

import functools

from mitmproxy import http

from addon.hooks.messages import BODY_HEADERS, Fields
from addon.providers.registry import PROVIDERS
from addon.wire.secrets import REDACTED, is_safe, mark

# client headers that must never reach a provider: the virtual key, and client-chosen
# account scoping that would not match the gateway's key
DROPPED_HEADERS = ("authorization", "x-api-key", "openai-organization", "openai-project", "cookie", "proxy-authorization")
_DROPPED = frozenset(name.encode() for name in DROPPED_HEADERS)
# client headers carrying a secret: replaced on the flow (requestheaders) before any view sees it
CLIENT_SECRETS = frozenset({b"authorization", b"x-api-key", b"proxy-authorization"})
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


def hide_secret(value: bytes) -> bytes:
    """A client secret header value as the flow keeps it: its fingerprint marker."""
    text = value.decode("utf-8", "surrogateescape")
    return value if is_safe(text) else mark(text).encode("utf-8", "surrogateescape")


def _indices(names: list[bytes], name: bytes) -> list[int]:
    """Where `name` occurs in names (list.index scans in C; a name is rarely repeated)."""
    first = names.index(name)
    if names.count(name) == 1:
        return [first]
    return [i for i, n in enumerate(names) if n == name]


def hide_client_secrets(request: http.Request, fields: Fields, names: list[bytes], markers: dict[bytes, bytes] | None) -> None:
    """Every client secret header on the flow replaced by its marker. `markers`: known header
    value -> marker, remembered for authenticated clients (a marker costs a SHA-256)."""
    new = list(fields)
    for i in [i for secret in CLIENT_SECRETS.intersection(names) for i in _indices(names, secret)]:
        value = fields[i][1]
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
    provider = flow.metadata.get("gateway", {}).get("provider")
    if provider is None:
        return
    secret = _SECRET_HEADERS[provider]
    fields = flow.request.headers.fields
    # the forwarding dropped every client header of this name and appended the provider's one
    # after the client's headers: look from the end, and stop at it
    for i in range(len(fields) - 1, -1, -1):
        name, value = fields[i]
        if name.lower() == secret:
            if value != _REDACTED:
                flow.request.headers.fields = (*fields[:i], (name, _REDACTED), *fields[i + 1:])
            return
