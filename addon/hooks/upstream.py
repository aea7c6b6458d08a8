"""Pointing a prepared request at its target: the target's address, parsed once, and the request
rewritten for it (scheme, host, path, headers, body) in one pass over the header fields. The
Gateway does it for a request's first attempt, Failover for another target's."""

from __future__ import annotations

import functools
from typing import NamedTuple

from mitmproxy.net.http import url

from addon.hooks.headers import replaced_header_names
from addon.hooks.messages import framing_fields
from addon.hooks.patches import wirekeys
from addon.routing.prepare import Call, Prepared


class Address(NamedTuple):
    """An upstream URL, parsed."""
    scheme: bytes
    host: str
    port: int
    path: str
    host_header: bytes  # host, plus :port unless it is the scheme's default


@functools.lru_cache(maxsize=1024)
def address_of(upstream_url: str) -> Address:
    """An upstream URL parsed once: the Request.url setter re-parses (urllib + IDNA) on every
    request, and the scheme/host/port setters each rewrite the Host header again."""
    scheme, host, port, path = url.parse(upstream_url)
    hostname = host.decode("idna")
    return Address(scheme, hostname, port, path.decode("utf-8", "surrogateescape"), url.hostport(scheme, host, port))


def address_for(call: Call, prepared: Prepared) -> Address:
    """Where the call's target takes the prepared request (may refuse: azure)."""
    route, upstream = call.route, prepared.upstream
    path = route.path + call.tail + upstream.path_suffix if call.tail or upstream.path_suffix else route.path
    return address_of(route.provider.upstream_url(call.target, path, call.state.model or prepared.model))


def point(call: Call, prepared: Prepared, address: Address) -> None:
    """Rewrite the call's request for its target at `address`; the flow's state keeps the pair's
    Exchange, which translates the answer."""
    flow, state, upstream, new_body = call.flow, call.state, prepared.upstream, prepared.body
    request = flow.request
    wirekeys.register(flow.id, call.target.api_key, address.host, address.port)
    data = request.data  # set directly: the property setters each rewrite Host again
    data.scheme, data.host, data.port = address.scheme, address.host, address.port
    if data.authority:  # HTTP/2 :authority
        data.authority = address.host_header
    query = call.query
    if query and upstream.keep_query:
        request.path = f"{address.path}{'&' if '?' in address.path else '?'}{query}"
    else:
        request.path = address.path
    if upstream.dropped:  # never silently: the response header and the access line name them
        state.dropped_params = list(upstream.dropped)
    # Drop the client's auth headers, point Host at the provider, set the provider's headers
    # and a new body's framing in one pass over the fields: each Headers.pop / __setitem__
    # rescans them all.
    # the flow carries a placeholder where the real key goes (hooks/patches/wirekeys.py)
    # a key-optional local server without a key: no key header at all
    upstream_headers = call.route.provider.auth_headers(wirekeys.placeholder(flow.id) if call.target.api_key else "")
    if upstream.headers:
        upstream_headers.update(upstream.headers)
    if state.stream:
        upstream_headers = {**upstream_headers, "accept-encoding": "identity"}  # stream callables see raw bytes
    replaced = replaced_header_names(tuple(upstream_headers), new_body is not None)
    host = address.host_header
    names = call.names
    forwarded = [(f[0], host) if n == b"host" else f for f, n in zip(call.fields, names) if n not in replaced]
    forwarded += [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in upstream_headers.items()]
    if new_body is not None:  # the provider's body, or the client's with the usage request
        forwarded += framing_fields(names, new_body)
        request.data.content = new_body
    request.headers.fields = tuple(forwarded)
    state.exchange, state.dropped = prepared.exchange, upstream.dropped
