"""What the gateway knows about one flow, as one typed record on it: `flow.metadata["gateway"]`.

The parts read and write named fields (`state.fingerprint`, `state.ticket`) instead of string keys
of a dict. A field left at None was never set (a request refused before its key was known has
no `fingerprint`; one the gateway answered itself has `answered`).

mitmproxy saves a flow's metadata (recordings, mitmweb's Save, a flow's copy) through
`copy.deepcopy` and then tnetstring, which takes only plain values: a deep copy of a FlowState is
therefore its plain dict (`to_dict`, the set fields under the names recordings have always used),
and a flow loaded from a file, or copied, carries that dict until `state_of` turns it back into a
FlowState. The live path never converts: a request's record is made once and read by attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from addon.apis.base import InboundAPI
from addon.apis.registry import APIS, api_for_request
from addon.guard.record import GuardRecord
from addon.translate.base import Exchange

KEY = "gateway"  # flow.metadata[KEY]


@dataclass(slots=True, eq=False)
class ParsedBody:
    """A request body a part before the Gateway already decoded and had its API parse
    (hooks/guardrails.py), so the Gateway does not read it again: the plain bytes and the
    object, which API parsed it, and the request's content it stands for (compared by identity:
    a part that replaced the body since makes it stale)."""

    api: str
    content: bytes
    raw: bytes
    body: dict


@dataclass(slots=True, eq=False)
class FlowState:
    # known from the request's headers (refusals after the key lookup carry them too)
    key: str | None = None  # the key's name (key-<fingerprint> when it has none)
    fingerprint: str | None = None
    provider: str | None = None  # the provider of the target this attempt goes to
    client_path: str | None = None  # the path the client called (mitmweb lists the flow by it)
    # the request, once prepared
    api: str | None = None  # the inbound API's name
    model: str | None = None  # the model the target serves (priced)
    stream: bool | None = None
    price: list[float] | None = None  # [input, output, cached input] per million tokens
    client_usage: bool | None = None  # a stream's usage: asked for by the client (None: not watched)
    resource: bool | None = None  # a stored resource's path (GET /v1/responses/{id}): nothing counted
    # a key with several targets: the attempt
    target: str | None = None  # the target's label
    target_id: str | None = None  # its id (a stored response's holder)
    fallback: bool | None = None  # the target is one of the key's fallbacks
    attempts: int | None = None
    attempt_started: float | None = None  # when this attempt began
    failed_attempts: list[dict] | None = None  # the attempts before it that failed (hooks/failover.py)
    # forwarded
    ticket: str | None = None  # the store's reservation, ended by the accounting
    held: tuple | None = None  # what the reservation holds: (tokens, usd, input, output), a background hold's size
    dropped_params: list[str] | None = None  # dropped or approximated in translation
    forwarded: float | None = None  # when it went to the provider (the metrics)
    # how it ended
    answered: str | None = None  # the gateway answered itself: its error code
    failed: bool | str | None = None  # response headers not handled / the gateway's own 502/504
    timeout: bool | None = None  # cut by upstream_timeout
    idle_timeout: float | None = None  # a stream cut after this many silent seconds
    first_chunk_at: float | None = None  # a stream's first chunk (time to first token)
    overhead: float | None = None  # the gateway's own time (x-gateway-overhead-ms), seconds
    created: str | None = None  # the stored response this request created
    background: str | None = None  # a background response it created, whose usage comes later (accounting)
    counted: bool | None = None  # its usage is in the store already (a background hold settled or charged)
    # what the key's guardrail set did (hooks/guardrails.py): counts by detector and where, never the text
    guardrails: GuardRecord | None = None
    # the live flow only, never saved: the pair's Exchange that translates its answer (set
    # while the request is forwarded), and the parameters this attempt's pair dropped
    exchange: Exchange | None = None
    dropped: tuple[str, ...] = ()
    # the request body as parsed before the Gateway (taken, and cleared, by its request hook)
    parsed: ParsedBody | None = None

    def to_dict(self) -> dict:
        """The set fields under their names, as a saved flow keeps them (a record within as its dict)."""
        saved = {name: value for name in SAVED if (value := getattr(self, name)) is not None}
        if self.guardrails is not None:
            saved["guardrails"] = self.guardrails.to_dict()
        return saved

    @classmethod
    def from_dict(cls, saved: dict) -> FlowState:
        state = cls(**{name: value for name, value in saved.items() if name in SAVED})
        if isinstance(state.guardrails, dict):
            state.guardrails = GuardRecord.from_dict(state.guardrails)
        return state

    def __deepcopy__(self, memo) -> dict:
        return self.to_dict()


SAVED = tuple(f.name for f in fields(FlowState) if f.name not in ("exchange", "dropped", "parsed"))


def state_of(flow) -> FlowState | None:
    """The flow's record, or None when the gateway has noted nothing on it yet."""
    state = flow.metadata.get(KEY)
    if state is None or type(state) is FlowState:
        return state
    state = flow.metadata[KEY] = FlowState.from_dict(state)  # loaded from a file, or a copy
    return state


def state_for(flow) -> FlowState:
    """The flow's record, made when it has none."""
    state = state_of(flow)
    if state is None:
        state = flow.metadata[KEY] = FlowState()
    return state


def api_for_flow(flow) -> InboundAPI:
    """The API a flow's client spoke: the one it was routed as (once routed, the request's path
    is the provider's), else `api_for_request`."""
    state = state_of(flow)
    api = APIS.get(state.api) if state is not None else None
    return api if api is not None else api_for_request(flow.request)
