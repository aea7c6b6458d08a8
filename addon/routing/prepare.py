"""Request preparation: a parsed request body made ready for the target it goes to (the
target's model mapping, its price, a key's max_output_tokens, asking a stream for its usage, the
pair's translation) and the worst case the key's limits reserve (policy/worstcase.py). Pure: a
dict and bytes in, bytes and records out."""

from __future__ import annotations

import logging

from addon.apis.base import InboundAPI
from addon.policy import rules
from addon.policy.worstcase import cap_output, worst_case
from addon.routing.routes import check_model_name
from addon.wire.errors import GatewayError
from addon.wire.sse import json_bytes
from addon.wire.tokens import without_stream_options

log = logging.getLogger("gateway")


def parse_body(raw: bytes, api: InboundAPI) -> tuple[bytes, dict]:
    """The plain request body parsed by its API: (plain bytes, object)."""
    try:
        return raw, api.parse_request(raw)
    except RecursionError:
        raise GatewayError(400, "request body is nested too deeply", code="invalid_json") from None


def prepare(parsed: tuple[bytes, dict], context):
    """The body checked by its API and made ready for the provider: (model, new body or
    None, the pair's UpstreamRequest and Exchange, the worst case the key's limits reserve).
    `model` is the one the client asked for (the key's allow-list); meta["model"] the one
    the target serves (a target's model_map), which is priced."""
    raw, body = parsed
    api, route, key, keys, meta, target = (
        context.api,
        context.route,
        context.key,
        context.keys,
        context.meta,
        context.target,
    )
    model = body["model"]
    check_model_name(model)
    served = target.served_model(model) if key.failover else model
    meta.update(api=api.name, model=served, stream=bool(body.get("stream")))
    price = keys.price(served)
    meta["price"] = [price.input, price.output, price.cached_input] if price else None
    policy = key.policy
    demand = rules.NO_DEMAND
    if policy.tpm is not None or policy.has_budget:  # the worst case its limits hold, of the request as written
        worst = price
        if key.failover and policy.budget_usd is not None:  # the priciest model a retry may be served
            worst = rules.worst_price(keys, key, model)
        demand = worst_case(policy, worst, body, raw, api, key.bound(model), model)
        hold = demand.hold  # what a background response's hold is (hooks/accounting.py)
        meta["held"] = (demand.tokens, demand.usd, hold.input, hold.output * hold.answers)
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
    if not meta["stream"]:
        pass
    elif route.stream_usage:  # (after a model mapping: spliced into the mapped body)
        new_body = api.prepare_usage(body, new_body or raw, meta) or new_body
    else:  # a provider that rejects stream_options: ask for nothing, hide nothing
        meta["client_usage"] = True  # (usage is still counted when it sends some)
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
        if meta["stream"] and not route.stream_usage:  # a pair's body (translated) asks for none either
            new_body = without_stream_options(new_body)
    return model, new_body, upstream, exchange, demand
