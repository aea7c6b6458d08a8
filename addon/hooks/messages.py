"""Reading and rewriting mitmproxy HTTP messages in one pass over their raw header fields.

mitmproxy's `Headers.get` decodes and lower-cases every field name on each lookup, and
`Message.content` does such a lookup for content-encoding each time it is read: on the request
path those scans were a good part of the gateway's own CPU. These helpers compare bytes instead;
`lower_names` lower-cases a message's field names once for a hook that looks up several.
"""

from __future__ import annotations

from mitmproxy import http

from addon.wire import bounded

BODY_HEADERS = frozenset({b"content-encoding", b"content-length"})  # a new body's framing replaces them
_BODY_HEADERS_AND_TYPE = BODY_HEADERS | {b"content-type"}
_IDENTITY = frozenset({b"", b"identity"})

Fields = tuple[tuple[bytes, bytes], ...]


def lower_names(fields: Fields) -> list[bytes]:
    """The field names lower-cased, in field order (membership and index tests then run in C)."""
    return [name.lower() for name, _ in fields]


def field_value(fields: Fields, names: list[bytes], name: bytes) -> str | None:
    """Header `name` (lowercase bytes) from fields and their `lower_names`; duplicates joined
    with ", " as Headers.get does."""
    if name not in names:
        return None
    if names.count(name) == 1:
        return fields[names.index(name)][1].decode("utf-8", "surrogateescape")
    return b", ".join(f[1] for f, n in zip(fields, names) if n == name).decode("utf-8", "surrogateescape")


def header(headers: http.Headers, name: bytes) -> str | None:
    """The value of header `name` (lowercase bytes), duplicates joined with ", " as Headers.get does."""
    fields = headers.fields
    return field_value(fields, lower_names(fields), name)


def plain_content(message: http.Message, names: list[bytes] | None = None, limit: int | None = None) -> bytes:
    """The body with any content-encoding removed (raises ValueError when it cannot be decoded).
    `names`: the message's `lower_names`, when the caller has them. `limit`: decode incrementally
    and raise bounded.TooLarge as soon as the decoded body passes `limit` bytes (request bodies:
    a small compressed body must not expand in memory without bound)."""
    fields = message.headers.fields
    if names is None:
        names = lower_names(fields)
    if b"content-encoding" in names and any(
        n == b"content-encoding" and f[1].strip().lower() not in _IDENTITY for f, n in zip(fields, names)
    ):
        if limit is not None:
            return bounded.decode(message.raw_content or b"", field_value(fields, names, b"content-encoding"), limit)
        return message.content or b""  # mitmproxy decodes gzip, deflate, br, zstd
    return message.raw_content or b""


def framing_fields(names: list[bytes], body: bytes) -> list[tuple[bytes, bytes]]:
    """The content-length of a new, unencoded body, unless the message is chunked (mitmproxy
    then frames it); after the fields in BODY_HEADERS were dropped."""
    return [] if b"transfer-encoding" in names else [(b"content-length", b"%d" % len(body))]


def replace_body(message: http.Message, body: bytes, content_type: bytes | None = None) -> None:
    """A new, unencoded body with its framing headers, in one pass over the header fields
    (`message.content = ...` plus header edits rescans the fields once per header)."""
    dropped = BODY_HEADERS if content_type is None else _BODY_HEADERS_AND_TYPE
    fields = message.headers.fields
    names = lower_names(fields)
    kept = [f for f, n in zip(fields, names) if n not in dropped]
    if content_type is not None:
        kept.append((b"content-type", content_type))
    message.headers.fields = (*kept, *framing_fields(names, body))
    message.data.content = body
