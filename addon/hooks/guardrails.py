"""Guardrails on the data path: a key's guardrail set (keys file, addon/guard/config.py) masks
or blocks what its clients send, and masks what they get back when the set says
`responses: "mask"`. The detectors, the text of each API and the masking are pure (addon/guard/);
this module only meets the flows.

Two parts, because their hooks must run at two places of the chain (addon/gateway.py):

- `GuardRequests`, before the Snapshot and the Gateway: the client's body is masked (or the
  request answered 400 `content_blocked`) before anything keeps, shows, translates or forwards
  it, so the flow, recordings, mitmweb and the provider all see the masked text only. It parses
  the body with its API's own parser and hands the object to the Gateway (`FlowState.parsed`),
  which would otherwise parse it a second time.
- `GuardAnswers`, after the Gateway (whose responseheaders chose the stream and whose response
  translated a whole body): what the client receives, in its own API's shape, is masked last,
  and a recording's copy of the provider's raw answer is masked too.

What was found is on the flow's record (`FlowState.guardrails`, a guard/record.py GuardRecord:
counts by detector and where, never the text), in the `x-gateway-guardrails` response header,
the access line, the ledger's `guardrails` column, the metrics and mitmweb's gateway view.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from mitmproxy import http

from addon.apis.registry import ENDPOINTS
from addon.guard import places
from addon.guard.config import GuardSet
from addon.guard.record import GuardRecord
from addon.guard.scan import Outcome, guard_body, header_value
from addon.guard.stream import StreamGuard, mask_answer
from addon.hooks.answers import answer
from addon.hooks.messages import field_value, lower_names, plain_content, replace_body
from addon.routing.state import ParsedBody, api_for_flow, state_for, state_of
from addon.wire.bounded import TooLarge
from addon.wire.errors import GatewayError
from addon.wire.sse import json_bytes
from addon.wire.streams import frame_for_new_length

log = logging.getLogger("gateway")

HEADER = "x-gateway-guardrails"
OFF_LOOP_BYTES = 1024 * 1024  # larger bodies are parsed and scanned in a thread: the loop serves others meanwhile
MAX_BODY = 64 * 1024 * 1024  # decoded bytes scanned at most (a larger one is refused by the gateway anyway)
PLACES_NAMED = 10  # a block's message names this many places at most


class Guardrails:
    """The state both parts share: the set of each guarded flow still in flight."""

    def __init__(self, live) -> None:
        self.live = live  # anything with a `keys` attribute: the KeyStore in force (hooks/live.py)
        self.sets: dict[str, GuardSet] = {}  # flow id -> its key's set (popped when the flow ends)
        self.requests = GuardRequests(self)
        self.answers = GuardAnswers(self)

    def set_for(self, flow: http.HTTPFlow) -> GuardSet | None:
        state = state_of(flow)
        fingerprint = state.fingerprint if state is not None else None
        keys = self.live.keys
        if fingerprint is None or keys is None:
            return None
        key = keys.by_fingerprint(fingerprint)
        return key.guardrails if key is not None else None


def note(flow: http.HTTPFlow, guard: GuardSet) -> GuardRecord:
    state = state_for(flow)
    if state.guardrails is None:
        state.guardrails = GuardRecord(guard.name, guard.action)
    return state.guardrails


class GuardRequests:
    def __init__(self, shared: Guardrails) -> None:
        self.shared = shared

    def request(self, flow: http.HTTPFlow):
        if flow.response or flow.error or not flow.live:
            return None
        guard = self.shared.set_for(flow)
        if guard is None:
            return None
        api = ENDPOINTS.get(flow.request.path.partition("?")[0])
        walk = places.REQUESTS.get(api.name) if api is not None else None
        if walk is None:  # a stored resource (GET /v1/responses/{id}): no client text
            return None
        self.shared.sets[flow.id] = guard
        request = flow.request
        if not request.raw_content:
            return None
        names = lower_names(request.headers.fields)
        if len(request.raw_content) > OFF_LOOP_BYTES or b"content-encoding" in names:
            return self.guard_off_loop(flow, guard, walk, names, api)
        self.apply(flow, guard, scan(request, names, guard, walk, api))
        return None

    async def guard_off_loop(self, flow, guard, walk, names, api) -> None:
        found = await asyncio.get_running_loop().run_in_executor(None, scan, flow.request, names, guard, walk, api)
        if flow.response is None and flow.error is None and flow.live:
            self.apply(flow, guard, found)

    def apply(self, flow: http.HTTPFlow, guard: GuardSet, found: Scanned | None) -> None:
        """Replace the body with the masked one, or answer the block (None: the body is not
        JSON: the gateway answers that). A body its API parsed is handed to the Gateway."""
        if found is None:
            return
        outcome = found.outcome
        if not outcome:
            if found.body is not None:
                state_for(flow).parsed = ParsedBody(found.api, found.content, found.raw, found.body)
            return
        body = found.masked
        info = note(flow, guard)
        where = [w for w, _ in outcome.places]
        if guard.action == "block":
            replace_body(flow.request, body)  # never forwarded; what is kept and shown holds no match
            detectors = outcome.detectors
            info.blocked, info.where = list(detectors), where
            named = "; ".join(f"{', '.join(d)} in {w}" for w, d in outcome.places[:PLACES_NAMED])
            more = len(outcome.places) - PLACES_NAMED
            message = (f"request blocked by guardrails ({guard.name}): {named}"
                       + (f"; and {more} more place(s)" if more > 0 else ""))
            answer(flow, GatewayError(400, message, code="content_blocked",
                                      headers={HEADER: header_value({}, detectors)}))
            log.info("gateway: guardrails %s blocked a request: %s", guard.name, ",".join(detectors))
            return
        replace_body(flow.request, body)
        if found.body is not None:  # (masked strings in place of strings: what the API checked still holds)
            state_for(flow).parsed = ParsedBody(found.api, flow.request.raw_content, body, found.body)
        info.masked, info.where = dict(sorted(outcome.counts.items())), where
        flow.comment = (flow.comment + " · " if flow.comment else "") + "guardrails " + header_value(outcome.counts)
        log.info("gateway: guardrails %s %s", guard.name, header_value(outcome.counts))


@dataclass(slots=True, eq=False)
class Scanned:
    """One request body scanned: what it was read from, the object its API parsed (None: the API
    refused it; its JSON object was scanned anyway, so what is kept and shown of a refused request
    is masked too), what was found, and the masked body's bytes when something was."""

    api: str
    content: bytes
    raw: bytes
    body: dict | None
    outcome: Outcome
    masked: bytes | None


def scan(request: http.Request, names, guard: GuardSet, walk, api) -> Scanned | None:
    """The body read, parsed by its API and scanned (masked in place); pure work, run in a
    thread for big bodies. The API's parse is the one the Gateway needs (it is handed over)."""
    content = request.raw_content
    try:
        raw = plain_content(request, names, MAX_BODY)
    except (ValueError, TooLarge):
        return None  # the gateway refuses it (invalid_encoding, too large)
    body = loose = None
    try:
        body = api.parse_request(raw)
    except RecursionError:
        return None
    except GatewayError:  # refused by the gateway anyway: still masked if it is a JSON object
        try:
            loose = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(loose, dict):
            return None
    scanned = body if body is not None else loose
    outcome = guard_body(guard.scanner, walk(scanned), mask=True)  # (a blocked body is kept masked too)
    return Scanned(api.name, content, raw, body, outcome, json_bytes(scanned) if outcome else None)


class GuardAnswers:
    def __init__(self, shared: Guardrails) -> None:
        self.shared = shared
        self.streams: dict[str, StreamGuard] = {}

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        guard = self.shared.sets.get(flow.id)
        response = flow.response
        if guard is None or response is None:
            return
        state = state_of(flow)
        info = state.guardrails if state is not None else None
        if info is not None and info.masked:
            response.headers[HEADER] = header_value(info.masked)
        if not guard.responses or response.status_code != 200:
            return
        fields = response.headers.fields
        if not (field_value(fields, lower_names(fields), b"content-type") or "").startswith("text/event-stream"):
            return
        inner = response.stream
        if not inner:
            return  # (the gateway streams every event stream it forwards)
        api = api_for_flow(flow)
        stream = self.streams[flow.id] = StreamGuard(api.name, guard.scanner)
        if inner is True:
            frame_for_new_length(response.headers, flow.request.http_version)
        response.stream = masked_stream(inner, stream, api)

    def response(self, flow: http.HTTPFlow) -> None:
        guard = self.shared.sets.pop(flow.id, None)
        stream = self.streams.pop(flow.id, None)
        if guard is None or not guard.responses:
            return
        counts: dict[str, int] = stream.counts if stream is not None else {}
        response = flow.response
        try:
            if stream is None and response is not None and response.status_code == 200 and not response.stream:
                fields = response.headers.fields
                names = lower_names(fields)
                if (field_value(fields, names, b"content-type") or "").startswith("application/json"):
                    body = json.loads(plain_content(response, names))
                    if isinstance(body, dict) and mask_answer(api_for_flow(flow).name, body, guard.scanner, counts):
                        replace_body(response, json_bytes(body))
        except (ValueError, RecursionError):
            pass  # not JSON: nothing of an answer's text to read
        self.finish(flow, guard, counts)

    def error(self, flow: http.HTTPFlow) -> None:
        guard = self.shared.sets.pop(flow.id, None)
        stream = self.streams.pop(flow.id, None)
        if guard is not None and guard.responses:
            self.finish(flow, guard, stream.counts if stream is not None else {})

    @staticmethod
    def finish(flow: http.HTTPFlow, guard: GuardSet, counts: dict[str, int]) -> None:
        if counts:
            note(flow, guard).answer_masked = dict(sorted(counts.items()))
            log.info("gateway: guardrails %s answer %s", guard.name, header_value(counts))
        # a recording (and mitmweb) keeps the provider's raw answer for replays: masked like the rest
        upstream = flow.metadata.get("record", {}).get("upstream")
        if upstream and upstream.get("pieces"):
            raw = b"".join(upstream["pieces"])
            api = upstream_stream_api(flow, upstream)
            if api is not None:
                # event by event, as the client's stream was: a secret the provider cut across
                # events is in no one event's text, and masking the raw text would leave its pieces
                events = StreamGuard(api, guard.scanner)
                raw = events.feed(raw) + events.end()
            text = raw.decode("utf-8", "replace")
            masked = guard.scanner.mask(text)
            if masked is not None:
                upstream["pieces"] = [masked.encode()]
            elif api is not None:
                upstream["pieces"] = [raw]


# the API a provider's event stream speaks, by the path it was sent to (the upstream request)
UPSTREAM_STREAMS = (("/chat/completions", "openai_chat"), ("/messages", "anthropic_messages"),
                    ("/responses", "openai_responses"))


def upstream_stream_api(flow: http.HTTPFlow, upstream: dict) -> str | None:
    content_type = next((v for k, v in upstream.get("headers") or () if k.lower() == "content-type"), "")
    if not content_type.startswith("text/event-stream"):
        return None
    path = flow.request.path.partition("?")[0]
    return next((api for end, api in UPSTREAM_STREAMS if path.endswith(end)), None)


def masked_stream(inner, stream: StreamGuard, api):
    """The gateway's stream (True, or its callable) with the guard's masking after it. A failure
    in the masking ends the stream with the API's error event: fail closed, never unmasked."""
    failed = False

    def masked(piece: bytes):
        nonlocal failed
        if failed:
            return b""
        try:
            data = inner(piece) if callable(inner) else piece
            if not isinstance(data, (bytes, bytearray)):
                data = b"".join(data)
            out = stream.feed(bytes(data)) if data else b""
            if not piece:  # the end: what the guard still holds
                out += stream.end()
            return out
        except Exception as e:
            failed = True
            # the type only: no traceback in the log, and the message may quote the text being masked
            log.error("gateway: guardrails could not mask a stream (%s); ended for the client", type(e).__name__)
            return b"".join(api.stream_error("the gateway could not check this answer", "gateway_error"))

    return masked
