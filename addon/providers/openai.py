"""OpenAI-compatible upstreams (OpenAI, DeepSeek): the body goes through unchanged.

Only the key is swapped. Error bodies that are not already OpenAI-shaped (a proxy's HTML
502, an empty 503) are wrapped so every client sees one error shape.
"""

from __future__ import annotations

import json

from addon.wire.errors import error_body, error_type
from addon.providers.base import UpstreamRequest
from addon.providers.catalog import CATALOG


class PassthroughExchange:
    __slots__ = ()
    translates_success = False

    def translate_body(self, status: int, body: bytes) -> bytes | None:
        if status < 400 or is_openai_error(body):
            return None
        return wrap_foreign_error(status, body)

    def stream_translator(self):
        return None


PASSTHROUGH = PassthroughExchange()


class OpenAICompatible:
    def __init__(self, name: str) -> None:
        self.name = name
        self.default_base_url, self.endpoint_path, self.secret_header = CATALOG[name]

    def prepare(self, request: dict, api_key: str):
        return UpstreamRequest({"authorization": f"Bearer {api_key}"}, None), PASSTHROUGH


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
