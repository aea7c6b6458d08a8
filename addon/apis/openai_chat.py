"""OpenAI Chat Completions: POST /v1/chat/completions (and /chat/completions).

Errors: `{"error": {"message", "type", "param", "code"}}` (wire/errors.py). Usage: the `usage`
object of a chat.completion, and of the stream's final chunk, which the gateway always asks for
(`stream_options.include_usage`) and hides again from a client that did not (wire/tokens.py).
"""

from __future__ import annotations

import json

from addon.apis.base import check_counts, json_object
from addon.wire.tokens import StreamUsage, Usage, client_wants_stream_usage, request_stream_usage, usage_from_body
from addon.wire.errors import GatewayError, error_body, error_type
from addon.wire.streams import openai_stream_error


class OpenAIChat:
    name = "openai_chat"
    label = ""  # added to the flow's mitmweb comment
    paths = frozenset({"/chat/completions", "/v1/chat/completions"})
    methods = frozenset({"POST"})
    usage_in_stream = False
    # the fields that bound one answer's output, the first one set wins; and the field asking for
    # several answers (policy/worstcase.py holds their product)
    max_output_fields: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
    choices_field: str | None = "n"
    stored_input_fields: tuple[str, ...] = ()  # fields naming input the provider stores (Responses')

    def output_field(self, provider: str) -> str | None:
        """The field a key's max_output_tokens is sent in to `provider` (the request as the
        client wrote it: a translation reads it from there). OpenAI's reasoning models refuse
        max_tokens; other OpenAI-compatible servers may not know max_completion_tokens."""
        return "max_completion_tokens" if provider in ("openai", "azure") else "max_tokens"

    def parse_request(self, raw: bytes) -> dict:
        body = parse_object(raw)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(
                400, "'messages' is required and must be a non-empty array", param="messages", code="missing_messages"
            )
        check_counts(messages)
        # the gateway decides on these itself (stream handling, usage): a string "false" must not stream
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise GatewayError(400, "'stream' must be a boolean", param="stream", code="invalid_value")
        if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
            raise GatewayError(400, "'stream_options' must be an object", param="stream_options", code="invalid_value")
        return body

    def prepare_usage(self, body: dict, raw: bytes) -> tuple[bytes | None, bool]:
        # always ask for stream usage so the ledger can count it; accounting.py hides it
        # again from a client that did not ask
        if client_wants_stream_usage(body):
            return None, True
        return request_stream_usage(body, raw), False

    def error_body(self, error: GatewayError) -> bytes:
        return error.body()

    def is_error(self, body: bytes) -> bool:
        return is_openai_error(body)

    def foreign_error(self, status: int, body: bytes) -> bytes:
        return wrap_foreign_error(status, body)

    def stream_error(self, message: str, code: str = "gateway_error") -> list[bytes]:
        return openai_stream_error(message, code)

    def usage_from_body(self, body: bytes) -> Usage | None:
        return usage_from_body(body)

    def stream_usage(self, strip: bool) -> StreamUsage:
        return StreamUsage(strip)

    def models_page(self, page: dict) -> dict:
        return page  # the gateway's own list is OpenAI-shaped

    def model_object(self, model: dict) -> dict:
        return model


def parse_object(raw: bytes) -> dict:
    """A request body that is a JSON object with a string `model` (every OpenAI API's request)."""
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "'model' is required and must be a string", param="model", code="missing_model")
    return body


def is_openai_error(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("error"), dict)


def wrap_foreign_error(status: int, body: bytes) -> bytes:
    text = body[:200].decode("utf-8", "replace").strip()
    message = f"provider returned HTTP {status}" + (f": {text}" if text else "")
    return error_body(message, error_type(status), code="upstream_error")


OPENAI_CHAT = OpenAIChat()
