"""Both sides of a gateway flow as text: what the client sent beside what went upstream, what the
provider answered beside what the client got. Pure: plain data in, text out (no mitmproxy), so
the mitmweb content view (addon/web/contentview.py) stays a thin adapter and tests need no proxy.

Secrets never reach this text: the client's key headers arrive already replaced by a fingerprint
marker (recording/recorder.py's Snapshot), the provider's key header reads REDACTED, and every
header whose name suggests a secret is shown as `(hidden)` unless it is one of those two forms.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import NamedTuple

from addon.wire.sse import SSEDecoder

RULE = "─" * 72
SECRET_NAMES = ("authorization", "api-key", "x-api-key", "cookie", "proxy-authorization", "token", "secret")
SAFE_VALUES = ("REDACTED", "vkfp:")
MAX_BODY_CHARS = 200_000  # a huge body is cut rather than freezing the browser


class Message(NamedTuple):
    """One HTTP message as shown: a first line, its headers, its (decoded) body."""
    title: str  # e.g. "CLIENT → GATEWAY"
    first_line: str  # "POST http://127.0.0.1:8080/v1/chat/completions" or "200 OK"
    headers: list[tuple[str, str]]
    body: bytes | None
    note: str = ""
    # show only the headers that differ from these (the other side of the same hop)
    compared_to: list[tuple[str, str]] | None = None


def header_changes(headers: list[tuple[str, str]], before: list[tuple[str, str]]) -> list[str]:
    """What the gateway changed: `+ name: value` for set or changed, `- name` for dropped."""
    old = {k.lower(): v for k, v in before}
    new = {k.lower(): v for k, v in headers}
    lines = [f"+ {k}: {header_value(k, v)}" for k, v in headers if old.get(k.lower()) != v]
    lines += [f"- {k}" for k, _ in before if k.lower() not in new]
    return lines or ["(headers unchanged)"]


def header_value(name: str, value: str) -> str:
    lowered = name.lower()
    if any(s in lowered for s in SECRET_NAMES) and not any(safe in value for safe in SAFE_VALUES):
        return "(hidden)"
    return value


def decode_body(body: bytes | None, headers: list[tuple[str, str]]) -> bytes | None:
    """Undo a content-encoding (gzip, deflate) for display; other encodings stay as they are."""
    if not body:
        return body
    encoding = next((v.strip().lower() for k, v in headers if k.lower() == "content-encoding"), "")
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError):
        return body
    return body


def content_type(headers: list[tuple[str, str]]) -> str:
    return next((v for k, v in headers if k.lower() == "content-type"), "")


def sse_events(body: bytes) -> list[tuple[str | None, str]]:
    decoder = SSEDecoder()
    return decoder.feed(body) + decoder.flush()


def compact(data: str, event: str | None = None, first: dict | None = None) -> str:
    """One event's data on one line; fields that repeat the first event's (id, model, created)
    and a `type` that repeats the event name are left out, so the changing part is readable."""
    try:
        obj = json.loads(data)
    except ValueError:
        return data
    if isinstance(obj, dict):
        if first is not None and obj is not first:
            obj = {
                k: v for k, v in obj.items() if k not in first or first[k] != v or k in ("choices", "delta", "index")
            }
        if event and obj.get("type") == event:
            obj = {k: v for k, v in obj.items() if k != "type"}
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def first_object(events: list[tuple[str | None, str]]) -> dict | None:
    for _, data in events:
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        return obj if isinstance(obj, dict) else None
    return None


def render_body(body: bytes | None, ctype: str) -> str:
    if body is None:
        return "(no body kept)"
    if not body:
        return "(empty body)"
    if "event-stream" in ctype or body.lstrip().startswith((b"data:", b"event:")):
        events = sse_events(body)
        width = len(str(len(events)))
        lines = [f"{len(events)} events, as they went over the wire:"]
        named = max((len(event) for event, _ in events if event), default=0)
        first = first_object(events)
        for i, (event, data) in enumerate(events, 1):
            label = f" {event or '':<{named}}" if named else ""
            lines.append(f"#{i:<{width}}{label}  {compact(data, event, None if i == 1 else first)}")
        if len(events) > 1 and first is not None:
            lines.append("(from #2 on, fields equal to #1's are left out)")
        return "\n".join(lines)
    text = body.decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    if len(text) > MAX_BODY_CHARS:
        text = text[:MAX_BODY_CHARS] + f"\n… ({len(text) - MAX_BODY_CHARS} more characters)"
    return text


def render_message(message: Message, with_headers: bool = True) -> str:
    lines = [RULE, f"{message.title}   {message.first_line}", RULE]
    if message.note:
        lines.append(message.note)
    if message.compared_to is not None:
        lines.append("headers the gateway changed:")
        lines += header_changes(message.headers, message.compared_to)
    elif with_headers:
        lines += [f"{name}: {header_value(name, value)}" for name, value in message.headers]
    lines.append("")
    lines.append(render_body(decode_body(message.body, message.headers), content_type(message.headers)))
    return "\n".join(lines)


def render(messages: list[Message], summary: str = "") -> str:
    parts = [summary] if summary else []
    parts += [render_message(m) for m in messages]
    return "\n\n".join(parts) + "\n"
