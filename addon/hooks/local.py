"""What the gateway answers itself, never forwarded: `GET /health` (load balancers) and
`GET /v1/models` (the models a key may use, in the shape of the client's API)."""

from __future__ import annotations

import json

from mitmproxy import http

from addon.apis.registry import api_for_request
from addon.hooks.answers import JSON_HEADERS
from addon.policy import rules
from addon.policy.virtual_keys import VirtualKey
from addon.routing.routes import check_model_name
from addon.wire.errors import GatewayError

HEALTH_PATHS = frozenset({"/health", "/v1/health"})
MODELS_PATHS = frozenset({"/models", "/v1/models"})


def answer_health(flow: http.HTTPFlow, path: str) -> None:
    request = flow.request
    if request.method not in ("GET", "HEAD"):
        raise GatewayError(405, f"method {request.method} not allowed on {path}", code="method_not_allowed")
    flow.response = http.Response.make(200, b'{"status":"ok"}', JSON_HEADERS)


def answer_models(flow: http.HTTPFlow, key: VirtualKey, model: str | None) -> None:
    """GET /v1/models lists the key's models; GET /v1/models/{id} answers one the key may use."""
    if model is not None:
        check_model_name(model)
    if model is None:
        body = rules.models_page(key)
    elif key.policy.allows_model(model):  # any model, for a key without a models list
        body = rules.model_object(key, model)
    else:
        raise GatewayError(
            404, f"model {model!r} is not available to this virtual key", param="model", code="model_not_found"
        )
    # in the client's API's shape: an Anthropic client (anthropic-version; Claude Code's model
    # discovery) gets Anthropic's list
    api = api_for_request(flow.request)
    body = api.models_page(body) if model is None else api.model_object(body)
    flow.response = http.Response.make(200, json.dumps(body).encode(), JSON_HEADERS)
