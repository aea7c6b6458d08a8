"""Request preparation: a parsed request body made ready for the target it goes to (the
target's model mapping, its price, a key's max_output_tokens, asking a stream for its usage, the
pair's translation) and the worst case the key's limits reserve (policy/worstcase.py). Pure: a
dict and bytes in, bytes and records out."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from addon.apis.base import InboundAPI
from addon.policy import rules
from addon.policy.virtual_keys import KeyStore, Target, VirtualKey
from addon.policy.store import Demand
from addon.policy.worstcase import cap_output, worst_case
from addon.routing.routes import Route, check_model_name
from addon.routing.state import FlowState
from addon.translate.base import Exchange, UpstreamRequest
from addon.wire.errors import GatewayError
from addon.wire.sse import json_bytes
from addon.wire.tokens import without_stream_options

log = logging.getLogger("gateway")


class Call(NamedTuple):
    """A client request being routed: what the routing found, for preparing, admitting and
    forwarding it (and, for a key with several targets, again for another target)."""
    flow: Any  # the mitmproxy flow (the hooks' business; nothing here reads it)
    fields: tuple  # the client's header fields, as they came
    names: list[bytes]  # their names, lowercase
    api: InboundAPI
    route: Route  # how the target's provider serves the API
    key: VirtualKey
    keys: KeyStore  # the keys in force when the request came (a reload swaps them whole)
    state: FlowState
    query: str
    tail: str  # a stored resource's path under the API's ("" for a request with a body)
    target: Target  # the key's target this attempt goes to (a classic key: its only one)


class Prepared(NamedTuple):
    """A request made ready for its target."""
    model: str | None  # the model the client asked for (the key's allow-list); None: a stored resource
    body: bytes | None  # the body for the provider; None: the client's goes on as sent
    upstream: UpstreamRequest  # the pair's request: its headers, path suffix, dropped parameters
    exchange: Exchange  # the pair's Exchange, which translates the answer
    demand: Demand  # the worst case the key's limits reserve


def parse_body(raw: bytes, api: InboundAPI) -> tuple[bytes, dict]:
    """The plain request body parsed by its API: (plain bytes, object)."""
    try:
        return raw, api.parse_request(raw)
    except RecursionError:
        raise GatewayError(400, "request body is nested too deeply", code="invalid_json") from None


def prepare_resource(route: Route) -> Prepared:
    """A stored resource's path (GET /v1/responses/{id}): no body, no model, nothing to reserve."""
    return Prepared(None, None, *route.pair.prepare({}), rules.NO_DEMAND)


def prepare(raw: bytes, body: dict, call: Call) -> Prepared:
    """The body checked by its API and made ready for the call's target. The model the client
    asked for is checked against the key's allow-list; state.model is the one the target serves
    (a target's model_map), which is priced."""
    api, route, key, keys, state, target = call.api, call.route, call.key, call.keys, call.state, call.target
    model = body["model"]
    check_model_name(model)
    served = target.served_model(model) if key.failover else model
    state.api, state.model, state.stream = api.name, served, bool(body.get("stream"))
    price = keys.price(served)
    state.price = [price.input, price.output, price.cached_input] if price else None
    policy = key.policy
    demand = rules.NO_DEMAND
    if policy.tpm is not None or policy.has_budget:  # the worst case its limits hold, of the request as written
        worst = price
        if key.failover and policy.budget_usd is not None:  # the priciest model a retry may be served
            worst = rules.worst_price(keys, key, model)
        demand = worst_case(policy, worst, body, raw, api, key.bound(model), model)
        hold = demand.hold  # what a background response's hold is (hooks/accounting.py)
        state.held = (demand.tokens, demand.usd, hold.input, hold.output * hold.answers)
    new_body = None
    # a key's or target's max_output_tokens: sent when the client names no maximum, a larger one lowered
    if (policy.max_output_tokens or target.max_output_tokens) and cap_output(
        body, api, target.provider, key.output_cap(target, model)
    ):
        new_body = json_bytes(body)
    if served != model:
        if price is None and key.policy.budget_usd is not None:
            raise GatewayError(403, f"model {served!r} (served for {model!r}) has no price in the keys file, and this "
                               "key has a dollar budget", param="model", code="model_not_priced")
        body["model"] = served
        new_body = json_bytes(body)
    if not state.stream:
        pass
    elif route.stream_usage:  # (after a model mapping: spliced into the mapped body)
        usage_body, state.client_usage = api.prepare_usage(body, new_body or raw)
        new_body = usage_body or new_body
    else:  # a provider that rejects stream_options: ask for nothing, hide nothing
        state.client_usage = True  # (usage is still counted when it sends some)
        if body.pop("stream_options", None) is not None:
            new_body = json_bytes(body)
    try:
        upstream, exchange = route.pair.prepare(body)  # raises GatewayError for what it cannot serve
    except (TypeError, AttributeError, KeyError, ValueError, IndexError, RecursionError) as e:
        # a field of a type the translation did not expect: the client's fault, not a 500
        log.warning("gateway: request refused, a field has an unexpected type (%s)", type(e).__name__)
        raise GatewayError(
            400, "a request field has a type or value the gateway cannot translate", code="invalid_value"
        ) from None
    if upstream.body is not None:
        new_body = upstream.body
        if state.stream and not route.stream_usage:  # a pair's body (translated) asks for none either
            new_body = without_stream_options(new_body)
    return Prepared(model, new_body, upstream, exchange, demand)
