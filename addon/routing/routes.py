"""The route table: how each provider serves each inbound API, built once from the tables of
apis/, providers/ and translate/ (nothing here branches on an API or provider name)."""

from __future__ import annotations

from typing import NamedTuple

from addon.apis.registry import APIS
from addon.providers.base import Provider
from addon.providers.registry import PROVIDERS
from addon.routing.state import FlowState
from addon.translate.base import Pair
from addon.translate.registry import PAIRS
from addon.wire.errors import GatewayError


class Route(NamedTuple):
    provider: Provider
    pair: Pair
    path: str = ""  # the provider API's path under the key's base_url
    stream_usage: bool = True  # the provider accepts stream_options.include_usage (catalog.py)


def build_route(api: str, provider: Provider) -> Route | None:
    """How `provider` serves inbound `api`: natively if it speaks it (the catalog's `apis`),
    else through a pair to its chat API; None: it cannot (a 400, nothing forwarded)."""
    for speaks in (api, provider.api):
        pair = PAIRS.get((api, speaks))
        if pair is not None and speaks in provider.info.apis:
            path = provider.endpoint_path if speaks == provider.api else APIS[speaks].upstream_path
            return Route(provider, pair, path, provider.info.stream_usage)
    return None


# inbound API name -> provider name -> how that provider serves it (built once; a provider
# without a pair for an API is missing here, and gets a 400)
ROUTES: dict[str, dict[str, Route]] = {
    api: {name: route for name, provider in PROVIDERS.items() if (route := build_route(api, provider))}
    for api in APIS
}
SERVED = ", ".join(f"{'/'.join(sorted(api.methods))} {max(api.paths, key=len)}" for api in APIS.values())


def describe_attempt(state: FlowState) -> str:
    """mitmweb's comment for where a flow went, from its state (key, provider, and once known the
    model, the API and the attempt): "team-alpha -> anthropic claude-sonnet-4-6 (fallback, attempt 2)"."""
    model = f" {state.model}" if state.model else ""
    api = APIS.get(state.api or "")
    attempt = state.attempts or 1
    notes = [n for n in ("fallback" if state.fallback else "", f"attempt {attempt}" if attempt > 1 else "") if n]
    return (f"{state.key} -> {state.provider}{model}{getattr(api, 'label', '')}"
            + (f" ({', '.join(notes)})" if notes else ""))


MAX_MODEL_BYTES = 256  # model names are kept (caches, ledger rows): longer ones are refused


def check_model_name(model: str) -> None:
    if len(model) > MAX_MODEL_BYTES or len(model.encode("utf-8", "surrogatepass")) > MAX_MODEL_BYTES:
        raise GatewayError(400, f"'model' is longer than {MAX_MODEL_BYTES} bytes", param="model", code="invalid_model")
