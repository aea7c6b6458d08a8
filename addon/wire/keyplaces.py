"""Every place a client may put its (virtual) key, as plain functions over strings.

The SDKs put a key in different places: `Authorization: Bearer` (OpenAI's and most others),
`x-api-key` (Anthropic's), `api-key` (Azure OpenAI's), `x-goog-api-key` (Gemini's), the query
string `?key=` (Gemini's REST examples) or `?api_key=`, and a browser may send one as a cookie. The
gateway takes a virtual key from any of them (in that order: the first found counts), never
forwards any of them to a provider, and keeps none of them in clear on a flow, a recording, in
mitmweb or a log line: each value there is its fingerprint marker (wire/secrets.py `mark`).

Every cookie value is treated as a secret (a key may sit under any cookie name; the cookie
header is never forwarded anyway); a key is taken only from a cookie named like a query
parameter (`key`, `api_key`).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote, unquote

from addon.wire.secrets import hide, unmark

# headers that may carry a client's key, in the order the gateway looks for one
KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
# query parameters (and cookie names) that carry one, compared in lowercase
KEY_PARAMS = frozenset({"key", "api_key"})


def header_key(name: str, value: str) -> str | None:
    """The key a key header holds: `Authorization` only as `Bearer <key>`."""
    if name == "authorization":
        scheme, _, token = value.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None
    return value.strip() or None


def _params(query: str) -> list[tuple[str, str, str]]:
    """(raw parameter, decoded lowercase name, decoded value) for each `&`-separated parameter."""
    out = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        out.append((part, unquote(name).lower(), unquote(value)))
    return out


def has_key_param(query: str) -> bool:
    """Whether the query may name a key parameter (a cheap test before parsing)."""
    lowered = query.lower()
    return "key" in lowered or "%" in query


def query_key(query: str) -> str | None:
    """The first non-empty `key=` or `api_key=` value of a query string (percent-decoded)."""
    if not query or not has_key_param(query):
        return None
    return next((value for _, name, value in _params(query) if name in KEY_PARAMS and value), None)


def without_key_params(query: str) -> str:
    """The query string without its key parameters (what a provider may get)."""
    if not query or not has_key_param(query):
        return query
    return "&".join(raw for raw, name, _ in _params(query) if name not in KEY_PARAMS)


def hide_query(query: str, hide: Callable[[str], str]) -> str:
    """The query string with each key parameter's value replaced by hide(value)."""
    if not query or not has_key_param(query):
        return query
    return "&".join(f"{raw.partition('=')[0]}={quote(hide(value), safe=':')}" if name in KEY_PARAMS else raw
                    for raw, name, value in _params(query))


def _cookies(header: str) -> list[tuple[str, str]]:
    pairs = []
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if name or sep:
            pairs.append((name, value))
    return pairs


def cookie_key(header: str) -> str | None:
    """The value of a cookie named `key` or `api_key` (the first non-empty one)."""
    return next(
        (value.strip('"') for name, value in _cookies(header) if name.lower() in KEY_PARAMS and value.strip('"')), None
    )


def hide_cookies(header: str, hide: Callable[[str], str]) -> str:
    """A Cookie header with every value replaced by hide(value)."""
    return "; ".join(f"{name}={hide(value)}" if value else f"{name}=" for name, value in _cookies(header))


def hide_path(path: str) -> str:
    """A request path with the values of its key parameters as their markers."""
    base, sep, query = path.partition("?")
    return f"{base}?{hide_query(query, hide)}" if sep and has_key_param(query) else path


def hide_header(name: str, value: str) -> str:
    """A client header value as flows keep it: a key header's or a cookie's values as markers."""
    lowered = name.lower()
    if lowered == "cookie":
        return hide_cookies(value, hide)
    if lowered in KEY_HEADERS or lowered == "proxy-authorization":
        return hide(value)
    return value


def unmark_header(name: str, value: str, virtual_keys: dict[str, str]) -> str:
    """A kept header value with its markers of known keys back to the keys (a replay)."""
    if name.lower() == "cookie":
        return "; ".join(f"{n}={unmark(v, virtual_keys)}" for n, v in _cookies(value))
    return unmark(value, virtual_keys)


def unmark_path(path: str, virtual_keys: dict[str, str]) -> str:
    """A kept path with the markers of known keys in its key parameters back to the keys."""
    base, sep, query = path.partition("?")
    return f"{base}?{hide_query(query, lambda v: unmark(v, virtual_keys))}" if sep and has_key_param(query) else path
