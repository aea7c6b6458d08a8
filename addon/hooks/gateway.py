"""The gateway's hooks on the data path, in the order a request meets them:

1. requestheaders (`screen`): /health and /v1/models answered here (hooks/local.py), unknown
   paths and methods refused, the virtual key looked up, the declared size checked, what the
   key's limits refuse whatever the body refused (hooks/gate.py; its requests whose bodies are
   being read count as admitted), the client's secrets replaced on the flow by their
   fingerprint markers (hooks/headers.py).
2. request (`take`): the key again (a reload may have removed it), its target (several
   targets: hooks/failover.py picks) and how that provider serves the API (routing/routes.py),
   the body read and prepared for the target (routing/prepare.py; a large one in a worker
   thread, one at a time: hooks/largebodies.py), a stored response's owner checked, then
   admission (policy/rules.py) last, and the request pointed at the provider
   (hooks/upstream.py).
3. responseheaders, response, error: the real key redacted, the provider's account headers
   dropped, stream translation chosen, a whole body translated, a provider's error named as
   the provider's (hooks/answers.py).

What each flow's request became is its FlowState (routing/state.py). mitmproxy fails *open*
when a hook raises, so every hook here catches and answers a JSON 500 instead. Nothing here
branches on an API or provider: the tables do.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import human

from addon.apis.base import InboundAPI
from addon.apis.registry import APIS, ENDPOINTS, resource_for
from addon.hooks.answers import (FAILED_MARK, GATEWAY_ERROR_HEADERS, PROVIDER_ERROR_MARK, answer, provider_error,
                                 row_comment, show_gateway_address)
from addon.hooks.failover import ATTEMPTS_HEADER, Failover
from addon.hooks.headers import (ACCOUNT_HEADERS, CLIENT_SECRETS, drop_hop_by_hop, hide_client_secrets, redact,
                                 response_hop_by_hop)
from addon.hooks.gate import HeadersGate
from addon.hooks.largebodies import OFF_LOOP_BYTES, LargeBodies
from addon.hooks.live import Live
from addon.hooks.local import HEALTH_PATHS, MODELS_PATHS, answer_health, answer_models
from addon.hooks.messages import Fields, field_value, lower_names, plain_content, replace_body
from addon.hooks.patches import wirekeys
from addon.hooks.patches.limits import limits, too_large
from addon.hooks.upstream import Address, address_for, point
from addon.policy import owners, rules
from addon.policy.keys import endpoint_line, load_keys_with_timeout
from addon.policy.keys_parse import KeysError
from addon.policy.virtual_keys import VirtualKey
from addon.routing.prepare import Call, Prepared, parse_body, prepare, prepare_resource
from addon.routing.routes import ROUTES, SERVED, describe_attempt
from addon.routing.state import FlowState, ParsedBody, api_for_flow, state_for, state_of
from addon.wire.bounded import TooLarge
from addon.wire.errors import ERROR_SOURCE, GatewayError
from addon.wire.keyplaces import cookie_key, header_key, hide_path, query_key, without_key_params
from addon.wire.streams import fail_closed_stream

log = logging.getLogger("gateway")


def presented_key(fields: Fields, names: list[bytes], query: str = "") -> str | None:
    """The virtual key from the first place that holds one (wire/keyplaces.py): `Authorization:
    Bearer` (an Authorization of another scheme: none), `x-api-key`, `api-key`, `x-goog-api-key`,
    the query's `key=`/`api_key=`, a `key`/`api_key` cookie (fields and their lower_names)."""
    auth = field_value(fields, names, b"authorization")
    if auth:
        return header_key("authorization", auth)
    for name in _KEY_HEADERS_AFTER_AUTHORIZATION:
        if name in names:
            found = header_key("", field_value(fields, names, name))
            if found:
                return found
    found = query_key(query) if query else None
    if found is None and b"cookie" in names:
        found = cookie_key(field_value(fields, names, b"cookie"))
    return found


_KEY_HEADERS_AFTER_AUTHORIZATION = (b"x-api-key", b"api-key", b"x-goog-api-key")
_ATTEMPTS = ATTEMPTS_HEADER.encode()


def read_body(request: http.Request, names: list[bytes], api: InboundAPI) -> tuple[bytes, dict]:
    """The request body decoded (content-encoding, bounded by max_request_mb) and parsed by its
    API: (plain bytes, object). Touches nothing shared: bodies over OFF_LOOP_BYTES run it in a thread."""
    try:
        raw = plain_content(request, names, limits.body)
    except TooLarge:  # a compressed body that decodes to more than max_request_mb: stopped there
        raise too_large(limits.body) from None
    except ValueError:
        raise GatewayError(400, "the request body's content-encoding could not be decoded", code="invalid_encoding")
    return parse_body(raw, api)


class Gateway:
    """Routes the inbound APIs' requests to providers; everything else is answered locally."""

    def __init__(self, live: Live | None = None, failover: Failover | None = None, gate: HeadersGate | None = None,
                 large: LargeBodies | None = None) -> None:
        self.live = live if live is not None else Live()  # the keys in force, the store, the flows in flight
        # a key with several targets: its first target, pinning, the retry headers (hooks/failover.py)
        self.failover = failover if failover is not None else Failover(self.live)
        # what the headers refuse before a body is read; a limited key's requests being read
        self.gate = gate if gate is not None else HeadersGate(self.live)
        self.large = large if large is not None else LargeBodies()  # the worker thread of large bodies
        self.markers: dict[bytes, bytes] = {}  # an authenticated client's key header -> its marker

    # --- the keys file, loaded at start-up (hooks/reload.py reloads it) --------------------

    def load(self, loader) -> None:
        loader.add_option(
            "keys_file", str, "keys.json",
            "Path of the gateway keys file (JSON, or YAML by extension): virtual keys -> provider keys.",
        )
        loader.add_option(
            "endpoint_line", bool, True,
            "Log the OpenAI-compatible endpoint at start-up. A fleet's supervisor turns it off in its "
            "workers (clients do not reach them at their own ports) and logs HAProxy's address once.",
        )

    def configure(self, updated) -> None:
        if "keys_file" in updated:
            try:
                keys = load_keys_with_timeout(ctx.options.keys_file)  # a FIFO must not hang it
            except KeysError as e:
                if self.live.keys is not None:  # a later change: reject it, keep the keys in force
                    raise exceptions.OptionsError(str(e)) from None
                # at start-up one clear line (mitmdump's ErrorCheck then exits), no traceback
                log.error("gateway: %s", e)
                return
            self.live.keys = keys
            log.info("gateway: %d virtual key%s loaded from %s", len(keys), "" if len(keys) == 1 else "s",
                     ctx.options.keys_file)

    def running(self) -> None:
        """The line a user copies from: where to point a client, and what it can reach."""
        proxyserver = ctx.master.addons.get("proxyserver")
        addrs = proxyserver.listen_addrs() if proxyserver is not None else []
        keys = self.live.keys
        if addrs and keys is not None and ctx.options.endpoint_line:
            log.info(endpoint_line(f"http://{human.format_address(addrs[0])}", keys.summary()))

    # --- 1. the request's headers: local answers, the key, the client's secrets hidden -------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # replays are restored from their snapshot in `request` (recording/recorder.py)
        if flow.response or flow.error or not flow.live or flow.is_replay:
            return
        try:
            self.screen(flow)
        except GatewayError as e:
            answer(flow, e)
        except Exception:
            log.exception("gateway: internal error on request headers; request not forwarded")
            answer(flow, GatewayError(500, "internal gateway error", code="gateway_error"))

    def screen(self, flow: http.HTTPFlow) -> None:
        """What can be decided on the request headers, before any body is read (requestheaders):
        local answers (/health, /v1/models), unknown paths and methods, the key, the declared
        size. The client's key is replaced on the flow by its fingerprint marker here, before
        mitmweb or any other view sees the flow."""
        request = flow.request
        fields = request.headers.fields
        names = lower_names(fields)
        # what Connection names ends on the client's hop (headers.py), before any other addon reads it
        if b"connection" in names:
            fields = drop_hop_by_hop(request, fields, names)
            names = lower_names(fields)
        known = False  # the flow's state is made only once a key is known (metrics count flows that have it)
        path, _, query = request.path.partition("?")
        shown_path = hide_path(request.path) if query else request.path  # a ?key= as its marker
        if path in HEALTH_PATHS:
            answer_health(flow, path)
            return
        try:
            model_path = path.startswith("/v1/models/") or path.startswith("/models/")
            if path in MODELS_PATHS or model_path:
                if request.method != "GET":
                    raise GatewayError(405, f"method {request.method} not allowed on {path}; use GET",
                                       code="method_not_allowed", headers={"allow": "GET"})
                model = path.partition("/models/")[2] if model_path else None
                answer_models(flow, self.authenticate(fields, names, query), model)
                return
            api, tail = ENDPOINTS.get(path), ""
            methods = api.methods if api is not None else None
            if api is None:  # a stored resource (GET /v1/responses/{id}), or nothing served
                api, tail = resource_for(path)
                methods = api.resource(tail) if api is not None else None
                if methods is None:
                    raise GatewayError(404, f"unknown path {path}: this gateway serves {SERVED}", code="unknown_path")
            if request.method not in methods:
                allowed = ", ".join(sorted(methods))
                raise GatewayError(405, f"method {request.method} not allowed on {path}; use {allowed}",
                                   code="method_not_allowed", headers={"allow": allowed})
            key = self.authenticate(fields, names, query)
            state = state_for(flow)
            # refusals are recorded with the key too; client_path: mitmweb lists the flow by it (web/listing.py)
            state.key, state.fingerprint, state.provider = key.name, key.fingerprint, key.provider
            state.client_path = shown_path
            known = True
            flow.comment = describe_attempt(state) + getattr(api, "label", "")  # "... (embeddings)"
            declared = field_value(fields, names, b"content-length")
            size = int(declared) if declared is not None and declared.isdigit() else 0
            if size > limits.body:
                raise too_large(limits.body)
            self.gate.screen(flow.id, key, size)  # what the key's limits refuse whatever the body; bytes held
        finally:
            if not CLIENT_SECRETS.isdisjoint(names):
                hide_client_secrets(request, fields, names, self.markers if known else None)
            if shown_path != request.path:
                request.path = shown_path

    def authenticate(self, fields: Fields, names: list[bytes], query: str = "") -> VirtualKey:
        presented = presented_key(fields, names, query)
        if presented is None:
            raise GatewayError(401, "missing virtual key: send 'Authorization: Bearer <virtual key>'",
                               code="missing_api_key")
        keys = self.live.keys
        if keys is None:
            raise GatewayError(503, "the gateway has no keys loaded", code="no_keys")
        key = keys.lookup(presented)
        if key is None:
            raise GatewayError(401, "invalid virtual key", code="invalid_api_key")
        rules.check_key(key, time.time())
        return key

    # --- 2. the request: its target, its body prepared, admitted, forwarded -----------------

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = state_of(flow)
        parsed = None
        if state is not None and state.parsed is not None:  # (taken once, whatever happens next)
            parsed, state.parsed = state.parsed, None
        if flow.response or flow.error or not flow.live:
            self.gate.leave(flow)
            return None
        try:
            taking = self.take(flow, parsed)  # an awaitable when the store must be asked over the network
        except Exception as e:
            self.refuse(flow, e)
            taking = None
        return self.gate.after(flow, taking)  # a limited key's request: pending until admitted or refused

    def take(self, flow: http.HTTPFlow, parsed: ParsedBody | None = None) -> Awaitable[None] | None:
        """The request, its body arrived: its key again (a reload may have removed it), the
        target and how its provider serves the API, the body read and prepared. `parsed`: the
        body as a part before read it (hooks/guardrails.py), used when it is still the request's."""
        request = flow.request
        state = state_of(flow)
        if state is None or state.fingerprint is None:  # a replay, or called without requestheaders
            self.screen(flow)
            if flow.response is not None:
                return None
            state = state_of(flow)
        fields = request.headers.fields
        names = lower_names(fields)  # once: encoding and the rewrite below both look
        path, _, query = request.path.partition("?")
        query = without_key_params(query)  # a key there (as its marker by now) goes nowhere
        api, tail = (ENDPOINTS[path], "") if path in ENDPOINTS else resource_for(path)
        keys = self.live.keys  # one KeyStore for the whole request, even if a reload swaps it meanwhile
        key = keys.by_fingerprint(state.fingerprint) if keys is not None else None
        if key is None:  # removed by a reload since its headers were screened
            raise GatewayError(401, "invalid virtual key", code="invalid_api_key")
        rules.check_key(key, time.time())

        routes = ROUTES[api.name]
        if key.failover:  # several targets: the pick (policy/targets.py), a retry may pick again
            index = self.failover.first_target(key, routes, path)
            target = key.targets[index]
        else:
            index, target = 0, key.targets[0]
        route = routes.get(target.provider)
        if route is None:
            raise GatewayError(400, f"{path} is not available for this virtual key's provider ({key.provider})",
                               code="unsupported_endpoint")

        call = Call(flow, fields, names, api, route, key, keys, state, query, tail, target)
        if key.failover:
            self.failover.track(call, index, routes)
        if tail:  # no body, no model, no usage: passed through for the key's provider key
            state.api, state.model, state.stream, state.price, state.resource = api.name, "", False, None, True
            return self.dispatch(call, prepare_resource(route), owners.refers(api, None, tail))
        if parsed is not None and not (parsed.api == api.name and parsed.content is request.raw_content
                                       and len(parsed.raw) <= limits.body):
            parsed = None
        if b"content-encoding" in names or len(request.raw_content or b"") > OFF_LOOP_BYTES:  # in a worker thread
            return self.take_off_loop(call, parsed)
        if parsed is not None:
            return self.take_parsed(call, (parsed.raw, parsed.body))
        return self.take_parsed(call, read_body(request, names, api))

    async def take_off_loop(self, call: Call, parsed: ParsedBody | None = None) -> None:
        """A large body's decoding, JSON parse and preparation (a translation: a new body as
        large) run in the worker thread (hooks/largebodies.py), one body at a time; this
        request's hook waits. What touches shared state (the target's pick, admission) stays on
        the loop."""
        flow, large = call.flow, self.large
        try:
            async with large.turn:  # (parsed one after another, each would wait with its parse for a turn to prepare)
                if flow.response is not None or flow.error is not None or not flow.live:  # the client left meanwhile
                    return
                if parsed is not None:
                    raw, body = parsed.raw, parsed.body
                    del parsed
                else:
                    raw, body = await large.run(read_body, flow.request, call.names, call.api)
                if flow.response is not None or flow.error is not None or not flow.live:
                    return
                if call.key.failover:
                    call = self.failover.with_body(call, raw, body)
                prepared = await large.run(prepare, raw, body, call)
                refers = owners.refers(call.api, body, "")
                del raw, body  # (the body as parsed: several times its bytes, not needed while the store is asked)
            if flow.response is not None or flow.error is not None or not flow.live:
                return
            pending = self.dispatch(call, prepared, refers)
            if pending is not None:
                del prepared
                await pending
        except Exception as e:
            self.refuse(flow, e)

    def take_parsed(self, call: Call, parsed: tuple[bytes, dict]) -> Awaitable[None] | None:
        raw, body = parsed
        if call.key.failover:  # kept for another target's attempt; the model may change the first pick
            call = self.failover.with_body(call, raw, body)
        return self.dispatch(call, prepare(raw, body, call), owners.refers(call.api, body, ""))

    def dispatch(self, call: Call, prepared: Prepared, refers: tuple = ()) -> Awaitable[None] | None:
        """Admit (rate limits, budgets) and forward a prepared request. `refers`: the stored
        objects it names, (id, field) pairs: only the key that created them may (policy/owners.py),
        and they go to the target holding them (pin)."""
        if refers:
            holder = owners.check(self.live.store, refers, call.key.fingerprint, time.time())  # may refuse (404)
            if inspect.isawaitable(holder):  # a store that does I/O: the rest once the owners are known
                return self.dispatch_when_owned(holder, call, prepared)
            if holder is not None:
                call, prepared = self.failover.pin(call, prepared, holder)
        address = address_for(call, prepared)
        # last: the rpm slot is taken (and the worst case reserved) only by a request that will be forwarded
        admitted = rules.admit(call.key, prepared.model, call.keys, self.live.store, time.time(), prepared.demand)
        # a ticket (str) or None at once; else a store that does I/O: this request's hook waits for it
        if admitted is not None and type(admitted) is not str and inspect.isawaitable(admitted):
            return self.forward_when_admitted(admitted, call, prepared, address)
        self.forward(admitted, call, prepared, address)
        return None

    async def dispatch_when_owned(self, holder: Awaitable[str | None], call: Call, prepared: Prepared) -> None:
        try:
            known = await holder
            if known is not None:
                call, prepared = self.failover.pin(call, prepared, known)
            pending = self.dispatch(call, prepared)
            if pending is not None:
                await pending
        except Exception as e:
            self.refuse(call.flow, e)

    async def forward_when_admitted(self, admitted: Awaitable[str | None], call: Call, prepared: Prepared,
                                    address: Address) -> None:
        flow = call.flow
        try:
            ticket = await admitted
        except GatewayError as e:
            answer(flow, e)
            return
        except Exception:
            log.exception("gateway: internal error while admitting; request not forwarded")
            answer(flow, GatewayError(500, "internal gateway error", code="gateway_error"))
            return
        try:
            self.forward(ticket, call, prepared, address)
        except Exception:
            log.exception("gateway: internal error while routing; request not forwarded")
            answer(flow, GatewayError(500, "internal gateway error", code="gateway_error"))

    def forward(self, ticket: str | None, call: Call, prepared: Prepared, address: Address) -> None:
        """Point the admitted request at its target's `address`. `ticket`: the store's
        reservation, ended by the accounting when the flow ends (released here if the request
        cannot go)."""
        flow, state = call.flow, call.state
        if ticket is not None:
            if flow.error or not flow.live:  # the client left while the store was asked
                self.live.store.release(state.fingerprint, ticket)
                return
            state.ticket = ticket  # hooks/accounting.py settles or releases it
        point(call, prepared, address)
        self.live.in_flight.add(flow.id)

    def refuse(self, flow: http.HTTPFlow, e: Exception) -> None:
        """Answer a request whose routing raised (called in the except block)."""
        if isinstance(e, GatewayError):
            answer(flow, e)
        else:
            log.exception("gateway: internal error while routing; request not forwarded")
            answer(flow, GatewayError(500, "internal gateway error", code="gateway_error"))
        if flow.response is not None:
            try:
                show_gateway_address(flow)
            except Exception:
                log.exception("gateway: could not note the gateway's address on an answered flow")

    # --- 3. the answer: the real key redacted, the stream chosen, the body translated -------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            redact(flow)
            state = state_of(flow)
            response = flow.response
            if state is None or state.exchange is None or response is None:
                if response is not None:
                    self.tell_no_attempt(flow, state, response)
                return
            wirekeys.forget(flow.id)  # sent (or never): the placeholder stays, the key goes
            fields = response.headers.fields
            names = lower_names(fields)
            if response_hop_by_hop(response, names):
                fields = response.headers.fields
                names = lower_names(fields)
            if not ACCOUNT_HEADERS.isdisjoint(names):
                response.headers.fields = tuple(f for f, n in zip(fields, names) if n not in ACCOUNT_HEADERS)
            if state.dropped:
                response.headers["x-gateway-dropped-params"] = ", ".join(state.dropped)
            if self.failover.tries:
                self.failover.tell_retry(flow, response)
            content_type = field_value(fields, names, b"content-type") or ""
            if response.status_code == 200 and content_type.startswith("text/event-stream"):
                translator = state.exchange.stream_translator()
                if translator is None:
                    response.stream = True
                else:
                    response.stream = fail_closed_stream(translator, response.headers, flow.request.http_version,
                                                         APIS[state.api].stream_error)
        except Exception:
            log.exception("gateway: internal error on response headers")
            state_for(flow).failed = True

    def tell_no_attempt(self, flow: http.HTTPFlow, state: FlowState | None, response: http.Response) -> None:
        """The gateway answered a request of a key with several targets itself (refused it,
        or found no healthy target): `x-gateway-attempts: 0`, as every answer of such a key
        says how many attempts it took."""
        fingerprint = state.fingerprint if state is not None else None
        keys = self.live.keys
        key = keys.by_fingerprint(fingerprint) if fingerprint and keys is not None else None
        if key is not None and key.failover and _ATTEMPTS not in lower_names(response.headers.fields):
            response.headers.fields += ((_ATTEMPTS, b"0"),)

    def response(self, flow: http.HTTPFlow) -> None:
        if self.gate.gated:
            self.gate.leave(flow)  # answered before its body was all read (413, too many bytes held)
        self.finish(flow)
        flow.comment = row_comment(flow)  # with the model and the answer, once both are known

    def finish(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        exchange = self.landed(flow, state)
        try:
            if state is not None and state.failed:
                raise RuntimeError("response headers could not be handled")
            if exchange is None or flow.response.stream:
                return
            status = flow.response.status_code
            if status < 400 and not exchange.translates_success:
                return
            body = exchange.translate_body(status, plain_content(flow.response))
            if body is not None:
                replace_body(flow.response, body, b"application/json")
        except Exception:
            log.exception("gateway: internal error while translating a response")
            error = GatewayError(502, "the gateway could not translate the provider response", code="gateway_error",
                                 type="server_error")
            flow.response = http.Response.make(502, api_for_flow(flow).error_body(error), GATEWAY_ERROR_HEADERS)
        if flow.response.status_code >= 400:
            flow.marked = flow.marked or PROVIDER_ERROR_MARK
            if ERROR_SOURCE not in flow.response.headers:
                provider_error(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.gate.gated:
            self.gate.leave(flow)  # the client left while its body was read
        self.landed(flow, state_of(flow))
        wirekeys.forget(flow.id)
        redact(flow)
        flow.marked = FAILED_MARK
        flow.comment = row_comment(flow)

    def landed(self, flow: http.HTTPFlow, state: FlowState | None):
        """A flow that ended: its request is no longer in flight. The Exchange that translates
        its answer, None if it was never forwarded (its real key, if one was registered, is
        forgotten)."""
        exchange = state.exchange if state is not None else None
        if exchange is None:
            wirekeys.forget(flow.id)  # registered, then refused before forwarding
            return None
        state.exchange = None  # (mitmweb keeps flows: not their translators)
        self.live.in_flight.discard(flow.id)
        return exchange
