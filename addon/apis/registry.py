"""The inbound APIs the gateway serves, and which one a request path is. Adding an API means a
module in apis/, a line here, and its translation pairs in translate/registry.py."""

from __future__ import annotations

from addon.apis.anthropic_messages import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES
from addon.apis.base import InboundAPI
from addon.apis.openai_chat import OPENAI_CHAT
from addon.apis.openai_embeddings import OPENAI_EMBEDDINGS
from addon.apis.openai_responses import OPENAI_RESPONSES

APIS: dict[str, InboundAPI] = {api.name: api for api in (OPENAI_CHAT, ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS,
                                                           OPENAI_EMBEDDINGS, OPENAI_RESPONSES)}
# request path (no query) -> the API served there
ENDPOINTS: dict[str, InboundAPI] = {path: api for api in APIS.values() for path in api.paths}
# path prefix ("/v1/responses/") -> the API whose stored resources live under it (an API with a
# `resource(tail)` method: the methods allowed on what follows, or None)
RESOURCES: dict[str, InboundAPI] = {
    path + "/": api for api in APIS.values() if hasattr(api, "resource") for path in api.paths
}
# what answers where no API is served (unknown paths, /health, /v1/models)
DEFAULT_API: InboundAPI = OPENAI_CHAT


def resource_for(path: str) -> tuple[InboundAPI, str] | tuple[None, None]:
    """(API, the rest of the path) for a path under an API's resources (no query)."""
    for prefix, api in RESOURCES.items():
        if path.startswith(prefix):
            return api, path[len(prefix) - 1:]
    return None, None


def api_for_path(path: str, anthropic_client: bool = False) -> InboundAPI:
    """The API whose error shape an answer on `path` (query allowed) takes; off the APIs' paths
    (/v1/models, unknown paths) an `anthropic_client` (one that sends `anthropic-version`) gets
    Anthropic's, any other client OpenAI's."""
    path = path.partition("?")[0]
    api = ENDPOINTS.get(path) or resource_for(path)[0]
    if api is not None:
        return api
    return ANTHROPIC_MESSAGES if anthropic_client else DEFAULT_API


def api_for_request(request) -> InboundAPI:
    """`api_for_path` of a request, an Anthropic client known by its `anthropic-version` header."""
    return api_for_path(request.path, "anthropic-version" in request.headers)

