"""OpenAI Responses: POST /v1/responses (and /responses), and the stored response's own paths:
GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items, POST
/v1/responses/{id}/cancel (a background response).

Served natively by the providers whose catalog line lists it (openai, azure), passed through byte
for byte, streams chunk by chunk; other providers get a 400 naming them (no translation yet).
Errors are OpenAI's shape. Usage: the Response object's `usage` (`input_tokens`,
`output_tokens`, `input_tokens_details.cached_tokens`); in a stream, the same object inside the
final `response.completed` (or `response.incomplete` / `response.failed`) event. The stream
always carries it, so nothing is asked for and nothing is hidden.
"""

from __future__ import annotations

import json
import re

from addon.apis.openai_chat import OpenAIChat, parse_object
from addon.wire.tokens import Usage, last_event_end, token_count
from addon.wire.errors import GatewayError
from addon.wire.sse import compact_json

# a stored response's id and what may follow it: /{id}, /{id}/input_items, /{id}/cancel
RESOURCE = re.compile(r"/(resp_[A-Za-z0-9_-]{1,200})(/input_items|/cancel)?")
# a Response object's status while a background response runs, and once it has ended (its usage then final)
RUNNING = frozenset({"queued", "in_progress"})
ENDED = frozenset({"completed", "incomplete", "failed", "cancelled"})
_USAGE = b'"usage"'
_FINAL = re.compile(rb'"type"\s*:\s*"response\.(?:completed|incomplete|failed)"')


class OpenAIResponses(OpenAIChat):
    name = "openai_responses"
    label = " (responses)"  # in the flow's mitmweb comment
    paths = frozenset({"/responses", "/v1/responses"})
    methods = frozenset({"POST"})
    upstream_path = "/responses"  # under a provider's base_url
    usage_in_stream = True
    max_output_fields = ("max_output_tokens",)
    choices_field = None
    # input the provider adds from what it stores: the body does not show how much
    stored_input_fields = ("previous_response_id", "conversation", "prompt")
    # a stored response: path prefix -> methods; the rest of the path must match RESOURCE
    resource_methods = {
        "": frozenset({"GET", "DELETE"}),
        "/input_items": frozenset({"GET"}),
        "/cancel": frozenset({"POST"}),
    }

    def resource(self, tail: str) -> frozenset[str] | None:
        """The methods allowed on `tail` (what follows /v1/responses), None if it names nothing."""
        m = RESOURCE.fullmatch(tail)
        return self.resource_methods[m.group(2) or ""] if m else None

    def output_field(self, provider: str) -> str:
        return "max_output_tokens"

    def stored_ids(self, body: dict | None, tail: str) -> tuple[tuple[str, str | None], ...]:
        """The stored objects a request reads, changes or continues, as (id, the field naming it):
        the response on a resource path, a create's `previous_response_id` and `conversation`
        (policy/owners.py lets only the virtual key that created one name it)."""
        if tail:
            return ((RESOURCE.fullmatch(tail).group(1), None),)
        refers = []
        previous = body.get("previous_response_id")
        if isinstance(previous, str):
            refers.append((previous, "previous_response_id"))
        conversation = body.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        if isinstance(conversation, str):
            refers.append((conversation, "conversation"))
        return tuple(refers)

    def parse_request(self, raw: bytes) -> dict:
        body = parse_object(raw)
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise GatewayError(400, "'stream' must be a boolean", param="stream", code="invalid_value")
        return body

    def prepare_usage(self, body: dict, raw: bytes) -> tuple[bytes | None, bool]:
        return None, True  # the stream reports usage itself: watch it, change nothing

    def stream_error(self, message: str, code: str = "gateway_error") -> list[bytes]:
        """The Responses stream's own error event (the openai SDK raises APIError at it)."""
        event = {"type": "error", "code": code, "message": message, "param": None}
        return [b"event: error\ndata: " + compact_json(event).encode() + b"\n\n"]

    def usage_from_body(self, body: bytes) -> Usage | None:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        return responses_usage(data.get("usage")) if isinstance(data, dict) else None

    def stream_usage(self, strip: bool) -> ResponsesStreamUsage:
        return ResponsesStreamUsage()


def response_state(body: bytes) -> tuple[str | None, Usage | None]:
    """A whole Response object's (status, usage); (None, None) for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None
    if not isinstance(data, dict) or data.get("object") != "response":
        return None, None
    status = data.get("status")
    return (status if isinstance(status, str) else None), responses_usage(data.get("usage"))


def responses_usage(usage: object) -> Usage | None:
    """The Responses API's usage object as the gateway's Usage."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens")), token_count(cached))


class ResponsesStreamUsage:
    """Watches a Responses SSE stream for the final event's usage; passes every piece on at once
    and unchanged. Only complete events that mention `"usage"` are parsed."""

    __slots__ = ("usage", "_buf")
    strip = False
    held = b""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._buf = b""

    def feed(self, piece: bytes) -> list[bytes]:
        buf = self._buf + piece if self._buf else piece
        end = len(buf) if not piece else last_event_end(buf)
        complete, self._buf = buf[:end], buf[end:]
        if _USAGE in complete and _FINAL.search(complete):
            for event in re.split(rb"\r\n\r\n|\n\n|\r\r", complete):
                self._event(event)
        return [piece] if piece else []

    def _event(self, event: bytes) -> None:
        if not _FINAL.search(event):
            return
        payload = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:"))
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        response = data.get("response") if isinstance(data, dict) else None
        usage = responses_usage(response.get("usage")) if isinstance(response, dict) else None
        if usage is not None:
            self.usage = usage


OPENAI_RESPONSES = OpenAIResponses()
