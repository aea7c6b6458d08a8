"""Anthropic Messages: POST /v1/messages and POST /v1/messages/count_tokens.

Errors: `{"type": "error", "error": {"type", "message"}}`, the type chosen by status as Anthropic
does (ERROR_STATUSES below), so the anthropic SDK raises the matching class. Usage:
Anthropic's `usage` object (`input_tokens` without the cache, `cache_read_input_tokens`,
`cache_creation_input_tokens`, `output_tokens`) of a message, and of a stream's `message_start`
and `message_delta` events (always sent: nothing to ask for, nothing to strip).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from addon.apis.base import check_counts, json_object
from addon.wire.tables import Mapping
from addon.wire.tokens import StreamUsage, Usage
from addon.wire.errors import GatewayError
from addon.wire.sse import compact_json

# where no table row names the status: Anthropic's own choice for other 4xx and 5xx answers
_OTHER_4XX, _OTHER_5XX = "invalid_request_error", "api_error"


# Anthropic error type <-> HTTP status, as Anthropic documents them. The upstream status is kept
# when there is one; this serves errors inside a stream, and the gateway's own answers.
ERROR_STATUSES: Mapping[str, int] = Mapping([
    ("invalid_request_error", 400),
    ("authentication_error", 401),
    ("billing_error", 402),
    ("permission_error", 403),
    ("not_found_error", 404),
    ("request_too_large", 413),
    ("rate_limit_error", 429),
    ("api_error", 500),
    ("timeout_error", 504),
    ("overloaded_error", 529),
], default_forward=500, default_reverse="api_error")


def error_type(status: int) -> str:
    kind = ERROR_STATUSES.reverse(status)
    if ERROR_STATUSES.forward(kind) == status:
        return kind
    return _OTHER_5XX if status >= 500 else _OTHER_4XX


def error_dict(message: str, kind: str) -> dict:
    # request_id: Anthropic's own request id; the gateway's answers have none
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": None}


def error_body(message: str, kind: str) -> bytes:
    return json.dumps(error_dict(message, kind)).encode()


def error_event(message: str, kind: str = "api_error") -> bytes:
    return b"event: error\ndata: " + compact_json(error_dict(message, kind)).encode() + b"\n\n"


def anthropic_error(body: bytes) -> dict | None:
    """The `error` object of an Anthropic error body, else None."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and data.get("type") == "error" and isinstance(data.get("error"), dict):
        return data["error"]
    return None


def usage_from_dict(usage: object) -> Usage | None:
    """Anthropic usage -> the ledger's: prompt = input + cache reads + cache writes."""
    if not isinstance(usage, dict):
        return None

    def count(name: str) -> int:
        value = usage.get(name)
        return value if type(value) is int and value > 0 else 0

    cached = count("cache_read_input_tokens")
    prompt = count("input_tokens") + count("cache_creation_input_tokens") + cached
    return Usage(prompt, count("output_tokens"), cached)


class AnthropicStreamUsage(StreamUsage):
    """Usage from client-bound Anthropic events: `message_start` carries the input side,
    `message_delta` the final counts (later values win). Never strips."""

    __slots__ = ("_seen",)

    def __init__(self, strip: bool = False) -> None:
        super().__init__(False)
        self._seen: dict = {}

    def _event(self, event: bytes) -> bytes:
        payload = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:"))
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return event
        if not isinstance(data, dict):
            return event
        usage = data.get("usage") if data.get("type") == "message_delta" else (data.get("message") or {}).get("usage")
        if isinstance(usage, dict):
            self._seen.update({k: v for k, v in usage.items() if type(v) is int})
            self.usage = usage_from_dict(self._seen)
        return event


class AnthropicMessages:
    name = "anthropic_messages"
    paths = frozenset({"/v1/messages"})
    methods = frozenset({"POST"})
    usage_in_stream = True
    needs_messages = True
    max_output_fields: tuple[str, ...] = ("max_tokens",)
    choices_field = None
    stored_input_fields: tuple[str, ...] = ()  # fields naming input the provider stores (Responses')

    def output_field(self, provider: str) -> str | None:
        return "max_tokens" if self.max_output_fields else None

    def parse_request(self, raw: bytes) -> dict:
        body = json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "model: field required (a string)", param="model", code="missing_model")
        messages = body.get("messages")
        if isinstance(messages, list):
            check_counts(messages)
        elif self.needs_messages:
            raise GatewayError(400, "messages: field required (an array)", param="messages", code="missing_messages")
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise GatewayError(400, "stream: must be a boolean", param="stream", code="invalid_value")
        return body

    def prepare_usage(self, body: dict, raw: bytes) -> tuple[bytes | None, bool]:
        return None, True  # Anthropic streams always carry usage: nothing to strip

    def error_body(self, error: GatewayError) -> bytes:
        return error_body(error.message, error_type(error.status))

    def is_error(self, body: bytes) -> bool:
        return anthropic_error(body) is not None

    def foreign_error(self, status: int, body: bytes) -> bytes:
        text = body[:200].decode("utf-8", "replace").strip()
        return error_body(f"provider returned HTTP {status}" + (f": {text}" if text else ""), error_type(status))

    def stream_error(self, message: str, code: str = "gateway_error") -> list[bytes]:
        # Anthropic's error events carry a type, no code: a stall is a timeout, the rest api_error
        return [error_event(message, "timeout_error" if code == "stream_idle_timeout" else "api_error")]

    def usage_from_body(self, body: bytes) -> Usage | None:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        return usage_from_dict(data.get("usage")) if isinstance(data, dict) else None

    def stream_usage(self, strip: bool) -> AnthropicStreamUsage:
        return AnthropicStreamUsage()

    def models_page(self, page: dict) -> dict:
        return models_page(page)

    def model_object(self, model: dict) -> dict:
        return model_object(model)


class AnthropicCountTokens(AnthropicMessages):
    """POST /v1/messages/count_tokens: `{"input_tokens": n}`; nothing is billed for it."""

    name = "anthropic_count_tokens"
    paths = frozenset({"/v1/messages/count_tokens"})
    max_output_fields = ()  # counts the input, answers nothing: no output to hold

    def usage_from_body(self, body: bytes) -> Usage | None:
        return None


def models_page(openai_page: dict) -> dict:
    """GET /v1/models in Anthropic's list shape (for a client that sends anthropic-version)."""
    data = [model_object(m) for m in openai_page.get("data") or []]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def model_object(openai_model: dict) -> dict:
    created = openai_model.get("created") or 0
    return {"type": "model", "id": openai_model["id"], "display_name": openai_model["id"],
            "created_at": datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


ANTHROPIC_MESSAGES = AnthropicMessages()
ANTHROPIC_COUNT_TOKENS = AnthropicCountTokens()
