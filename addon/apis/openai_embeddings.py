"""OpenAI Embeddings: POST /v1/embeddings (and /embeddings).

Served natively by the providers whose catalog line lists it (providers/catalog.py), passed
through byte for byte; a provider without it gets a 400 naming it. Errors are OpenAI's shape,
as for chat. Usage: the response's `usage.prompt_tokens` (embeddings have no output tokens, so a
price's `input` alone prices them). Embeddings do not stream.
"""

from __future__ import annotations

from addon.apis.openai_chat import OpenAIChat, parse_object
from addon.wire.errors import GatewayError

ENCODINGS = ("float", "base64")


class OpenAIEmbeddings(OpenAIChat):
    name = "openai_embeddings"
    label = " (embeddings)"  # in the flow's mitmweb comment
    paths = frozenset({"/embeddings", "/v1/embeddings"})
    methods = frozenset({"POST"})
    upstream_path = "/embeddings"  # under a provider's base_url
    usage_in_stream = True  # nothing streams
    max_output_fields = ()  # no output tokens: a budget holds the input only
    choices_field = None

    def output_field(self, provider: str) -> None:
        return None

    def parse_request(self, raw: bytes) -> dict:
        body = parse_object(raw)
        if body.get("input") is None or body["input"] == "" or body["input"] == []:
            raise GatewayError(400, "'input' is required: a string or an array", param="input", code="missing_input")
        if body.get("encoding_format") is not None and body["encoding_format"] not in ENCODINGS:
            raise GatewayError(
                400, '\'encoding_format\' must be "float" or "base64"', param="encoding_format", code="invalid_value"
            )
        if body.get("stream") is not None:
            raise GatewayError(
                400, "embeddings do not stream: leave 'stream' out", param="stream", code="invalid_value"
            )
        return body


OPENAI_EMBEDDINGS = OpenAIEmbeddings()
