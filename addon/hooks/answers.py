"""The gateway's own answers and marks on a flow: an error in the shape of the API the client
spoke, a provider's error named as the provider's, and the markers mitmweb lists them by."""

from __future__ import annotations

import json

from mitmproxy import http

from addon.hooks.messages import plain_content, replace_body
from addon.policy import targets
from addon.routing.routes import describe_attempt
from addon.routing.state import api_for_flow, state_for, state_of
from addon.wire.errors import ERROR_SOURCE, GatewayError

JSON_HEADERS = {"content-type": "application/json"}
GATEWAY_ERROR_HEADERS = {**JSON_HEADERS, ERROR_SOURCE: "gateway"}

# list markers in mitmweb: mitmproxy's emoji shortcodes whose glyphs plain fonts (DejaVu) have
REFUSED_MARK, PROVIDER_ERROR_MARK, FAILED_MARK = ":heavy_multiplication_x:", ":warning:", ":zap:"


def answer(flow: http.HTTPFlow, error: GatewayError) -> None:
    """Answer `error` in the error shape of the API the client spoke (apis/registry.py)."""
    body = api_for_flow(flow).error_body(error)
    flow.response = http.Response.make(error.status, body, {**GATEWAY_ERROR_HEADERS, **error.headers})
    code = error.code or error.type
    state_for(flow).answered = code
    flow.marked = REFUSED_MARK
    flow.comment = row_comment(flow)  # says why: "team-a -> openai gpt-4o · refused 429 budget_exceeded"


def provider_error(flow: http.HTTPFlow) -> None:
    """Mark a provider's error response as the provider's; a 401, or a 403 that says the key is
    invalid or revoked, says that the provider rejected the gateway's key for this virtual key (by
    name), not the client's key; another 403 that it refused this request."""
    response = flow.response
    response.headers[ERROR_SOURCE] = "provider"
    flow.comment = row_comment(flow)
    state = state_of(flow)
    if response.status_code not in (401, 403) or state is None or state.provider is None:
        return
    try:
        body = json.loads(plain_content(response))
        error = body["error"]
        said = error.get("message") or ""
    except (ValueError, KeyError, TypeError, AttributeError):
        return
    name = state.key if state.key is not None else "?"
    if response.status_code == 403 and not targets.fault(403, json.dumps(body), model=state.model).key:
        # no access to a model, a content refused: this request's own, not the key (policy/targets.py)
        error["message"] = (f"the provider ({state.provider}) refused this request for virtual key "
                            f"{name!r}. Provider said: {said}")
    else:
        verb = "rejected" if response.status_code == 401 else "refused"
        error["message"] = (f"the provider ({state.provider}) {verb} the gateway's key for virtual key "
                            f"{name!r}; check its api_key in the keys file. Provider said: {said}")
    replace_body(response, json.dumps(body).encode(), b"application/json")


def row_comment(flow: http.HTTPFlow) -> str:
    """mitmweb's comment, the one place its list says what happened: which key went to which
    provider and model, and an error's source and code: "team-a -> openai gpt-4o · provider 429",
    "refused 401 invalid_api_key". Kept short: the column is narrow (web/listing.py widens it)."""
    state = state_of(flow)
    said = [describe_attempt(state)] if state is not None and state.key is not None else []
    response = flow.response
    if response is not None and state is not None and state.answered is not None:
        said.append(f"refused {response.status_code} {state.answered}")
    elif response is not None and response.status_code >= 400 and ERROR_SOURCE in response.headers:
        said.append(f"{response.headers[ERROR_SOURCE]} {response.status_code}")  # provider's, or the gateway's 502/504
    guard = state.guardrails if state is not None else None
    if guard is not None and guard.masked:  # (counts only, as the x-gateway-guardrails header)
        said.append("guardrails masked=" + ",".join(f"{d}:{n}" for d, n in sorted(guard.masked.items())))
    return " · ".join(said)


def show_gateway_address(flow: http.HTTPFlow) -> None:
    """A request the gateway answered itself was sent to the gateway: show it so, rather than
    to the unreachable placeholder (reverse mode's target) it never went to."""
    address = flow.client_conn.sockname
    if address and address[0] and flow.request.port == 1:
        flow.request.host, flow.request.port = address[0], address[1]
