"""The gateway's hooks on the data path: each inbound API's requests routed by virtual key to a
provider, and the provider's answers made the client's again.

mitmproxy fails *open* when a hook raises, so every hook here catches and answers a JSON 500
instead. Nothing here branches on an API or provider: the tables do (routing/routes.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import time
from collections.abc import Awaitable
from typing import NamedTuple

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.utils import human

from addon.apis.base import InboundAPI
from addon.apis.registry import ENDPOINTS, api_for_flow, resource_for
from addon.hooks.answers import (
    FAILED_MARK,
    GATEWAY_ERROR_HEADERS,
    PROVIDER_ERROR_MARK,
    answer,
    provider_error,
    row_comment,
    show_gateway_address,
)
from addon.hooks.failover import ATTEMPTS_HEADER, RETRY_AT_ONCE
from addon.hooks.headers import (ACCOUNT_HEADERS, CLIENT_SECRETS, drop_hop_by_hop, hide_client_secrets, redact,
                                 replaced_header_names, response_hop_by_hop)
from addon.hooks.local import HEALTH_PATHS, MODELS_PATHS, answer_health, answer_models
from addon.hooks.messages import Fields, field_value, framing_fields, lower_names, plain_content, replace_body
from addon.hooks.patches import attempts, wirekeys
from addon.hooks.patches.limits import held, limits, too_large
from addon.policy import owners, rules, targets
from addon.policy.keys import endpoint_line, load_keys_with_timeout
from addon.policy.keys_parse import KeysError
from addon.policy.virtual_keys import KeyStore, Target, VirtualKey
from addon.policy.memory_store import MemoryStore
from addon.policy.store import UsageStore
from addon.routing.prepare import parse_body, prepare
from addon.routing.routes import ROUTES, SERVED, Route, describe_route, resource_request
from addon.wire.bounded import TooLarge
from addon.wire.errors import ERROR_SOURCE, GatewayError
from addon.wire.keyplaces import cookie_key, header_key, hide_path, query_key, without_key_params
from addon.wire.sse import large_bodies
from addon.wire.streams import fail_closed_stream

log = logging.getLogger("gateway")

# request bodies above this, and any with a content-encoding (up to max_request_mb once decoded),
# are decoded, parsed and translated in a worker thread (route_off_loop)
OFF_LOOP_BYTES = 1024 * 1024
# large bodies parsed and prepared at once, each from its parse to its prepared body in one go (in
# LARGE_BODIES's thread): a burst of them must not hold a parse's worth of memory (several times
# the body) for each. One: the work holds the GIL, so a second thread would not make it faster
LARGE_AT_ONCE = 1
LARGE_BODIES = concurrent.futures.ThreadPoolExecutor(max_workers=LARGE_AT_ONCE, thread_name_prefix="gateway-large-body")

class Routing(NamedTuple):
    """A request being routed: what route() found, for prepare/dispatch/forward (and a retry)."""
    flow: http.HTTPFlow
    names: list[bytes]  # the client's header names, lowercase
    api: InboundAPI
    route: Route
    key: VirtualKey
    keys: KeyStore
    meta: dict
    query: str
    target: Target  # the key's target this attempt goes to (a classic key: its only one)


def no_healthy_target(wait: float) -> GatewayError:
    return GatewayError(503, f"every target of this virtual key is cooling down after failures; retry in {wait:.0f}s",
                        code="no_healthy_target", type="server_error", headers={"retry-after": f"{wait:.0f}"})


class FailoverRoute:
    """A request of a key with several targets, while it is in flight: what another attempt
    needs (hooks/failover.py decides on one, Gateway.reroute makes it)."""

    __slots__ = ("context", "fields", "tried", "unusable", "routes", "raw", "retry_now", "pinned", "requested")

    def __init__(self, context: Routing, fields: Fields, index: int, routes: dict) -> None:
        self.context = context
        self.fields = fields  # the client's headers, as they came (the flow's are the provider's)
        self.tried = [index]  # target indexes, in attempt order
        self.unusable: list[int] = []  # targets that cannot take this request (a model without a price)
        self.routes = routes  # provider name -> Route, for the request's API
        self.raw: bytes | None = None  # the client's body (plain); None: a body-less resource call
        self.retry_now = False  # attempts used up, a healthy target left: the client is told to retry
        self.pinned = False  # names a stored response: only the target holding it may serve it (pin())
        self.requested: str | None = None  # the client's model: a pick skips targets cooling down for it

    @property
    def key(self) -> VirtualKey:
        return self.context.key

    def serves(self, target: Target) -> bool:
        return target.provider in self.routes

    def excluded(self) -> list[int]:
        return self.tried + self.unusable if self.unusable else self.tried



class UpstreamTarget(NamedTuple):
    scheme: bytes
    host: str
    port: int
    path: str
    host_header: bytes  # host, plus :port unless it is the scheme's default


@functools.lru_cache(maxsize=1024)
def upstream_target(upstream_url: str) -> UpstreamTarget:
    """An upstream URL parsed once: the Request.url setter re-parses (urllib + IDNA) on every
    request, and the scheme/host/port setters each rewrite the Host header again."""
    scheme, host, port, path = url.parse(upstream_url)
    hostname = host.decode("idna")
    return UpstreamTarget(scheme, hostname, port, path.decode("utf-8", "surrogateescape"),
                          url.hostport(scheme, host, port))



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


async def off_loop(fn, *args):
    """fn(*args) in the LARGE_BODIES thread, where JSON is encoded in pieces (wire/sse.json_bytes)."""
    return await asyncio.get_running_loop().run_in_executor(LARGE_BODIES, _large_body_work, fn, args)


def _large_body_work(fn, args):
    large_bodies.on = True
    return fn(*args)


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

    def __init__(self, store: UsageStore | None = None) -> None:
        self.keys: KeyStore | None = None  # replaced whole on reload (hooks/reload.py), never mutated
        self.store: UsageStore = store if store is not None else MemoryStore()  # rate limits and spend
        # per in-flight flow: the pair's Exchange that translates its response, the API, and
        # the parameters the pair dropped or approximated
        self.exchanges: dict[str, tuple[object, InboundAPI, tuple[str, ...]]] = {}
        self.markers: dict[bytes, bytes] = {}  # an authenticated client's key header -> its marker
        self.failovers: dict[str, FailoverRoute] = {}  # in-flight requests of keys with several targets
        # requests of limited keys past their headers, not yet admitted or refused (bodies being
        # read): flow id -> key fingerprint, and per fingerprint how many (rules.admit_early)
        self.gated: dict[str, str] = {}
        self.pending: dict[str, int] = {}
        self.large = asyncio.Semaphore(LARGE_AT_ONCE)  # large bodies being parsed and prepared (route_off_loop)

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
                self.keys = load_keys_with_timeout(ctx.options.keys_file)  # a FIFO must not hang it
            except KeysError as e:
                if self.keys is not None:  # a later change: reject it, keep the keys in force
                    raise exceptions.OptionsError(str(e)) from None
                # at start-up one clear line (mitmdump's ErrorCheck then exits), no traceback
                log.error("gateway: %s", e)
                return
            log.info("gateway: %d virtual key%s loaded from %s", len(self.keys), "" if len(self.keys) == 1 else "s",
                     ctx.options.keys_file)

    def running(self) -> None:
        """The line a user copies from: where to point a client, and what it can reach."""
        proxyserver = ctx.master.addons.get("proxyserver")
        addrs = proxyserver.listen_addrs() if proxyserver is not None else []
        if addrs and self.keys is not None and ctx.options.endpoint_line:
            log.info(endpoint_line(f"http://{human.format_address(addrs[0])}", self.keys.summary()))

    # --- hooks -------------------------------------------------------------------------

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

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            self.ungate(flow)
            return None
        try:
            routing = self.route(flow)  # an awaitable when the store must be asked over the network
        except Exception as e:
            self.refuse(flow, e)
            routing = None
        if routing is None or flow.id not in self.gated:
            self.ungate(flow)
            return routing
        return self.ungate_after(flow, routing)

    async def ungate_after(self, flow: http.HTTPFlow, routing: Awaitable[None]) -> None:
        try:
            await routing
        finally:
            self.ungate(flow)

    def ungate(self, flow: http.HTTPFlow) -> None:
        """The request was admitted (now counted by the store) or refused, or it ended: it no
        longer counts as pending for its key (rules.admit_early)."""
        fingerprint = self.gated.pop(flow.id, None)
        if fingerprint is not None:
            left = self.pending[fingerprint] - 1
            if left:
                self.pending[fingerprint] = left
            else:
                del self.pending[fingerprint]

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

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            redact(flow)
            routed = self.exchanges.get(flow.id)
            response = flow.response
            if routed is None or response is None:
                if response is not None:
                    self.tell_no_attempt(flow, response)
                return
            wirekeys.forget(flow.id)  # sent (or never): the placeholder stays, the key goes
            fields = response.headers.fields
            names = lower_names(fields)
            if response_hop_by_hop(response, names):
                fields = response.headers.fields
                names = lower_names(fields)
            if not ACCOUNT_HEADERS.isdisjoint(names):
                response.headers.fields = tuple(f for f, n in zip(fields, names) if n not in ACCOUNT_HEADERS)
            if routed[2]:
                response.headers["x-gateway-dropped-params"] = ", ".join(routed[2])
            if self.failovers:
                self.tell_retry(flow, response)
            if response.status_code == 200 and (field_value(fields, names, b"content-type") or "").startswith(
                "text/event-stream"
            ):
                exchange, api, _ = routed
                translator = exchange.stream_translator()
                if translator is None:
                    response.stream = True
                else:
                    response.stream = fail_closed_stream(
                        translator, response.headers, flow.request.http_version, api.stream_error
                    )
        except Exception:
            log.exception("gateway: internal error on response headers")
            flow.metadata.setdefault("gateway", {})["failed"] = True

    def tell_no_attempt(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """The gateway answered a request of a key with several targets itself (refused it,
        or found no healthy target): `x-gateway-attempts: 0`, as every answer of such a key
        says how many attempts it took."""
        fingerprint = flow.metadata.get("gateway", {}).get("fingerprint")
        keys = self.keys
        key = keys.by_fingerprint(fingerprint) if fingerprint and keys is not None else None
        if key is not None and key.failover and _ATTEMPTS not in lower_names(response.headers.fields):
            response.headers.fields += ((_ATTEMPTS, b"0"),)

    def tell_retry(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """A key with several targets whose attempts are used up while a target is still
        healthy: the official SDKs retry at once on these headers, and the retry goes there."""
        failover = self.failovers.get(flow.id)
        if failover is not None:  # appended to the fields: Headers.__setitem__ rescans them all
            response.headers.fields += ((_ATTEMPTS, str(len(failover.tried)).encode()),)
            if failover.retry_now and response.status_code in attempts.RETRYABLE:  # (the provider's own replaced)
                response.headers.update(RETRY_AT_ONCE)

    def response(self, flow: http.HTTPFlow) -> None:
        if self.gated:
            self.ungate(flow)  # answered before its body was all read (413, too many bytes held)
        self.finish(flow)
        flow.comment = row_comment(flow)  # with the model and the answer, once both are known

    def finish(self, flow: http.HTTPFlow) -> None:
        self.failovers.pop(flow.id, None)
        routed = self.exchanges.pop(flow.id, None)
        if routed is None:
            wirekeys.forget(flow.id)  # registered, then refused before forwarding
        try:
            if flow.metadata.get("gateway", {}).get("failed"):
                raise RuntimeError("response headers could not be handled")
            if routed is None or flow.response.stream:
                return
            exchange = routed[0]
            status = flow.response.status_code
            if status < 400 and not exchange.translates_success:
                return
            body = exchange.translate_body(status, plain_content(flow.response))
            if body is not None:
                replace_body(flow.response, body, b"application/json")
        except Exception:
            log.exception("gateway: internal error while translating a response")
            error = GatewayError(
                502, "the gateway could not translate the provider response", code="gateway_error", type="server_error"
            )
            flow.response = http.Response.make(502, api_for_flow(flow).error_body(error), GATEWAY_ERROR_HEADERS)
        if flow.response.status_code >= 400:
            flow.marked = flow.marked or PROVIDER_ERROR_MARK
            if ERROR_SOURCE not in flow.response.headers:
                provider_error(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.gated:
            self.ungate(flow)  # the client left while its body was read
        self.failovers.pop(flow.id, None)
        self.exchanges.pop(flow.id, None)
        wirekeys.forget(flow.id)
        redact(flow)
        flow.marked = FAILED_MARK
        flow.comment = row_comment(flow)

    # --- routing -----------------------------------------------------------------------

    def screen(self, flow: http.HTTPFlow) -> None:
        """What can be decided on the request headers, before any body is read (requestheaders):
        local answers (/health, /v1/models), unknown paths and methods, the key, the declared
        size. The client's key is replaced on the flow by its fingerprint marker here, before
        mitmweb or any other view sees the flow."""
        request = flow.request
        fields = request.headers.fields
        names = lower_names(fields)
        if (
            b"connection" in names
        ):  # what it names ends on the client's hop (headers.py), before any other addon reads it
            fields = drop_hop_by_hop(request, fields, names)
            names = lower_names(fields)
        meta: dict = {}  # flow metadata only once a key is known (metrics count flows that have it)
        path, _, query = request.path.partition("?")
        shown_path = hide_path(request.path) if query else request.path  # a ?key= as its marker
        if path in HEALTH_PATHS:
            answer_health(flow, path)
            return
        try:
            model_path = path.startswith("/v1/models/") or path.startswith("/models/")
            if path in MODELS_PATHS or model_path:
                if request.method != "GET":
                    raise GatewayError(
                        405,
                        f"method {request.method} not allowed on {path}; use GET",
                        code="method_not_allowed",
                        headers={"allow": "GET"},
                    )
                answer_models(
                    flow, self.authenticate(fields, names, query), path.partition("/models/")[2] if model_path else None
                )
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
                raise GatewayError(
                    405,
                    f"method {request.method} not allowed on {path}; use {allowed}",
                    code="method_not_allowed",
                    headers={"allow": allowed},
                )
            key = self.authenticate(fields, names, query)
            meta = flow.metadata.setdefault("gateway", {})
            # refusals are recorded too; client_path: mitmweb lists the flow by it (web/listing.py)
            meta.update(key=key.name, fingerprint=key.fingerprint, provider=key.provider, client_path=shown_path)
            flow.comment = describe_route(meta) + getattr(api, "label", "")  # "... (embeddings)"
            declared = field_value(fields, names, b"content-length")
            size = int(declared) if declared is not None and declared.isdigit() else 0
            if size > limits.body:
                raise too_large(limits.body)
            if key.policy.limits is not None:  # before the body is read: what its limits refuse whatever it holds
                rules.admit_early(key, self.store, time.time(), self.pending.get(key.fingerprint, 0))
            if size and held.would_pass(size):  # the process holds too many request bytes: not this one too
                raise held.busy()
            if key.policy.limits is not None:
                self.gated[flow.id] = key.fingerprint
                self.pending[key.fingerprint] = self.pending.get(key.fingerprint, 0) + 1
        finally:
            if not CLIENT_SECRETS.isdisjoint(names):
                hide_client_secrets(request, fields, names, self.markers if "fingerprint" in meta else None)
            if shown_path != request.path:
                request.path = shown_path

    def route(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        request = flow.request
        if "fingerprint" not in flow.metadata.get("gateway", {}):  # a replay, or called without requestheaders
            self.screen(flow)
            if flow.response is not None:
                return None
        meta = flow.metadata["gateway"]
        fields = request.headers.fields
        names = lower_names(fields)  # once: encoding and the rewrite below both look
        path, _, query = request.path.partition("?")
        query = without_key_params(query)  # a key there (as its marker by now) goes nowhere
        api, tail = (ENDPOINTS[path], "") if path in ENDPOINTS else resource_for(path)
        keys = self.keys  # one KeyStore for the whole request, even if a reload swaps it meanwhile
        key = keys.by_fingerprint(meta["fingerprint"]) if keys is not None else None
        if key is None:  # removed by a reload since its headers were screened
            raise GatewayError(401, "invalid virtual key", code="invalid_api_key")
        rules.check_key(key, time.time())

        routes = ROUTES[api.name]
        if key.failover:  # several targets: the pick (policy/targets.py), a retry may pick again
            index = self.first_target(key, routes, path)
            target = key.targets[index]
        else:
            index, target = 0, key.targets[0]
        route = routes.get(target.provider)
        if route is None:
            raise GatewayError(400, f"{path} is not available for this virtual key's provider ({key.provider})",
                               code="unsupported_endpoint")

        context = Routing(flow, names, api, route, key, keys, meta, query, target)
        if key.failover:
            self.failovers[flow.id] = FailoverRoute(context, request.headers.fields, index, routes)
            attempts.arm(flow)
            self.note_target(flow, meta, key, target, 1, api)
        if tail:  # no body, no model, no usage: passed through for the key's provider key
            meta.update(api=api.name, model="", stream=False, price=None, resource=True)
            return self.dispatch(context, tail, resource_request(route), owners.refers(api, None, tail))
        if b"content-encoding" in names or len(request.raw_content or b"") > OFF_LOOP_BYTES:  # in a worker thread
            return self.route_off_loop(context)
        return self.route_parsed(context, read_body(request, names, api))

    async def route_off_loop(self, context: Routing) -> None:
        """A large body's decoding, JSON parse and preparation (a translation: a new body as
        large) run in a worker thread, so the event loop serves other clients (/health, small
        requests) meanwhile; this request's hook waits. What touches shared state (the target's
        pick, admission) stays on the loop."""
        flow = context.flow
        try:
            async with self.large:  # (parsed one after another, each would wait with its parse for a turn to prepare)
                if flow.response is not None or flow.error is not None or not flow.live:  # the client left meanwhile
                    return
                parsed = await off_loop(read_body, flow.request, context.names, context.api)
                if flow.response is not None or flow.error is not None or not flow.live:
                    return
                context = self.choose(context, parsed)
                prepared = await off_loop(prepare, parsed, context)
                refers = owners.refers(context.api, parsed[1], "")
                del parsed  # (the body as parsed: several times its bytes, not needed while the store is asked)
            if flow.response is not None or flow.error is not None or not flow.live:
                return
            pending = self.dispatch(context, "", prepared, refers)
            if pending is not None:
                del prepared
                await pending
        except Exception as e:
            self.refuse(flow, e)

    def route_parsed(self, context: Routing, parsed: tuple[bytes, dict]) -> Awaitable[None] | None:
        context = self.choose(context, parsed)
        return self.dispatch(context, "", prepare(parsed, context), owners.refers(context.api, parsed[1], ""))

    def choose(self, context: Routing, parsed: tuple[bytes, dict]) -> Routing:
        """A key with several targets: keep the client's body for a retry, and pick again when
        the first pick cools down for the model the body names."""
        failover = self.failovers.get(context.flow.id) if context.key.failover else None
        if failover is not None:
            failover.raw = parsed[0]  # a retry prepares the client's body again for its target
            model = parsed[1].get("model")
            if type(model) is str:
                failover.requested = model
                context = self.pick_for_model(context, failover, model)
        return context

    def pick_for_model(self, context: Routing, failover: FailoverRoute, model: str) -> Routing:
        """The first pick was made before the body named the model: when the picked target is
        cooling down for the model it would serve, pick again knowing it (policy/targets.py)."""
        key, now = context.key, time.time()
        if targets.healthy(key, context.target, self.store, now, model):
            return context
        index = targets.pick(key, self.store, now, (), failover.serves, model=model)
        if index is None:
            raise no_healthy_target(targets.retry_after(key, self.store, now, model))
        target = key.targets[index]
        context = context._replace(route=failover.routes[target.provider], target=target)
        failover.context, failover.tried = context, [index]
        self.note_target(context.flow, context.meta, key, target, 1, context.api)
        return context

    def dispatch(self, context: Routing, tail: str, prepared: tuple, refers: tuple = ()) -> Awaitable[None] | None:
        """Admit (rate limits, budgets) and forward a prepared request. `refers`: the stored
        objects it names, (id, field) pairs: only the key that created them may (policy/owners.py),
        and they go to the target holding them (pin)."""
        if refers:
            holder = owners.check(self.store, refers, context.key.fingerprint, time.time())  # may refuse (404)
            if inspect.isawaitable(holder):  # a store that does I/O: the rest once the owners are known
                return self.dispatch_when_owned(holder, context, tail, prepared)
            if holder is not None:
                context, prepared = self.pin(context, tail, prepared, holder)
        flow, names, api, route, key, keys, meta, query, _ = context
        model, new_body, upstream, exchange, demand = prepared
        fields = flow.request.headers.fields
        forward = self.forwarding(context, tail, prepared, fields)
        # last: the rpm slot is taken (and the worst case reserved) only by a request that will be forwarded
        admitted = rules.admit(key, model, keys, self.store, time.time(), demand)
        # a ticket (str) or None at once; else a store that does I/O: this request's hook waits for it
        if admitted is not None and type(admitted) is not str and inspect.isawaitable(admitted):
            return self.forward_when_admitted(admitted, forward)
        self.forward(admitted, *forward)
        return None

    async def dispatch_when_owned(
        self, holder: Awaitable[str | None], context: Routing, tail: str, prepared: tuple
    ) -> None:
        try:
            known = await holder
            if known is not None:
                context, prepared = self.pin(context, tail, prepared, known)
            pending = self.dispatch(context, tail, prepared)
            if pending is not None:
                await pending
        except Exception as e:
            self.refuse(context.flow, e)

    def pin(self, context: Routing, tail: str, prepared: tuple, holder: str) -> tuple[Routing, tuple]:
        """A request naming a stored response, of a key with several targets, goes to the target
        `holder` (its Target.id) that made it, and only there (no failover: no other target has
        it). While that target cools down: 503 no_healthy_target, nothing forwarded. A holder the
        key no longer lists (the keys file changed) leaves the request where it was picked."""
        key = context.key
        failover = self.failovers.get(context.flow.id) if key.failover else None
        if failover is None:
            return context, prepared
        index = next((i for i, t in enumerate(key.targets) if t.id == holder), None)
        if index is None or key.targets[index].provider not in failover.routes:
            return context, prepared
        failover.pinned = True
        target = key.targets[index]
        now = time.time()
        if not targets.healthy(key, target, self.store, now, failover.requested):
            wait = max(1.0, targets.cooling_until(target, self.store, failover.requested) - now)
            raise GatewayError(
                503,
                f"the target holding this stored response is cooling down after failures; retry in {wait:.0f}s",
                code="no_healthy_target",
                type="server_error",
                headers={"retry-after": f"{wait:.0f}"},
            )
        if index == failover.tried[0]:
            return context, prepared
        context = context._replace(route=failover.routes[target.provider], target=target)
        if tail:
            prepared = resource_request(context.route)
        else:
            prepared = prepare((failover.raw, context.api.parse_request(failover.raw)), context)
        failover.context, failover.tried = context, [index]
        self.note_target(context.flow, context.meta, key, target, 1, context.api)
        return context, prepared

    @staticmethod
    def forwarding(context: Routing, tail: str, prepared: tuple, fields: Fields) -> tuple:
        """forward()'s arguments for a prepared request (the client's header `fields`)."""
        flow, names, api, route, key, keys, meta, query, target = context
        model, new_body, upstream, exchange, demand = prepared
        upstream_path = route.path + tail + upstream.path_suffix if tail or upstream.path_suffix else route.path
        address = upstream_target(
            route.provider.upstream_url(target, upstream_path, meta.get("model") or model)
        )  # may refuse (azure)
        return (
            flow,
            target,
            query,
            route,
            address,
            upstream,
            new_body,
            (exchange, api, upstream.dropped),
            fields,
            names,
        )

    async def forward_when_admitted(self, admitted: Awaitable[str | None], forward: tuple) -> None:
        flow = forward[0]
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
            self.forward(ticket, *forward)
        except Exception:
            log.exception("gateway: internal error while routing; request not forwarded")
            answer(flow, GatewayError(500, "internal gateway error", code="gateway_error"))

    def forward(self, ticket: str | None, flow: http.HTTPFlow, key: Target, query: str, route, target, upstream,
                new_body: bytes | None, exchange: tuple, fields: Fields, names: list[bytes]) -> None:
        """Point the admitted request at the provider (`key`: the target of the virtual key it
        goes to). `ticket`: the store's reservation, ended by the accounting when the flow ends
        (released here if the request cannot go)."""
        meta = flow.metadata["gateway"]
        if ticket is not None:
            if flow.error or not flow.live:  # the client left while the store was asked
                self.store.release(meta["fingerprint"], ticket)
                return
            meta["ticket"] = ticket  # hooks/accounting.py settles or releases it
        request = flow.request
        wirekeys.register(flow.id, key.api_key, target.host, target.port)
        data = request.data  # set directly: the property setters each rewrite Host again
        data.scheme, data.host, data.port = target.scheme, target.host, target.port
        if data.authority:  # HTTP/2 :authority
            data.authority = target.host_header
        if query and upstream.keep_query:
            request.path = f"{target.path}{'&' if '?' in target.path else '?'}{query}"
        else:
            request.path = target.path
        if upstream.dropped:  # never silently: the response header and the access line name them
            meta["dropped_params"] = list(upstream.dropped)
        # Drop the client's auth headers, point Host at the provider, set the provider's headers
        # and a new body's framing in one pass over the fields: each Headers.pop / __setitem__
        # rescans them all.
        # the flow carries a placeholder where the real key goes (hooks/patches/wirekeys.py)
        # a key-optional local server without a key: no key header at all
        upstream_headers = route.provider.auth_headers(wirekeys.placeholder(flow.id) if key.api_key else "")
        if upstream.headers:
            upstream_headers.update(upstream.headers)
        if meta["stream"]:
            upstream_headers = {**upstream_headers, "accept-encoding": "identity"}  # stream callables see raw bytes
        replaced = replaced_header_names(tuple(upstream_headers), new_body is not None)
        host = target.host_header
        forwarded = [(f[0], host) if n == b"host" else f for f, n in zip(fields, names) if n not in replaced]
        forwarded += [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in upstream_headers.items()]
        if new_body is not None:  # the provider's body, or the client's with the usage request
            forwarded += framing_fields(names, new_body)
            request.data.content = new_body
        request.headers.fields = tuple(forwarded)
        self.exchanges[flow.id] = exchange

    def first_target(self, key: VirtualKey, routes: dict, path: str) -> int:
        """The target a key with several targets sends this request to first."""
        now = time.time()
        index = targets.pick(key, self.store, now, (), lambda target: target.provider in routes)
        if index is not None:
            return index
        if not any(target.provider in routes for target in key.targets):
            raise GatewayError(
                400, f"{path} is not available for this virtual key's providers", code="unsupported_endpoint"
            )
        raise no_healthy_target(targets.retry_after(key, self.store, now))

    def reroute(self, flow: http.HTTPFlow, failover: FailoverRoute, index: int) -> bool:
        """Point a failed attempt's flow at the key's target `index`, as route() would have (not
        admitted again: limits and budgets count a client request once). False: it cannot go."""
        if flow.error is not None or not flow.live or flow.id not in self.exchanges:
            return False
        if failover.raw is None:
            return False  # a stored resource (GET /v1/responses/{id}) lives at one target
        target = failover.key.targets[index]
        context = failover.context._replace(route=failover.routes[target.provider], target=target)
        try:
            prepared = prepare((failover.raw, context.api.parse_request(failover.raw)), context)
            if (
                prepared[1] is None
            ):  # the client's body as it came, not what an earlier attempt was sent (a model_map, a cap)
                prepared = (prepared[0], failover.raw, *prepared[2:])
            forward = self.forwarding(context, "", prepared, failover.fields)
        except GatewayError as e:
            log.warning(
                "gateway: target %s of %s cannot serve this request (%s)", target.display, failover.key.name, e.message
            )
            failover.unusable.append(index)
            return False
        failover.context = context
        failover.tried.append(index)
        self.note_target(flow, context.meta, context.key, target, len(failover.tried), context.api)
        self.forward(None, *forward)
        return True

    @staticmethod
    def note_target(
        flow: http.HTTPFlow, meta: dict, key: VirtualKey, target: Target, attempt: int, api: InboundAPI
    ) -> None:
        """The attempt in the flow's metadata (ledger, metrics; target_id: a stored response's
        holder, policy/owners.py; when it began: a failed one is listed with its time,
        hooks/failover.py) and comment (mitmweb)."""
        meta.update(provider=target.provider, target=target.label, target_id=target.id, attempts=attempt,
                    fallback=target.fallback, attempt_started=time.time())
        flow.comment = describe_route(meta) + ("" if "api" in meta else getattr(api, "label", ""))

    def authenticate(self, fields: Fields, names: list[bytes], query: str = "") -> VirtualKey:
        presented = presented_key(fields, names, query)
        if presented is None:
            raise GatewayError(
                401, "missing virtual key: send 'Authorization: Bearer <virtual key>'", code="missing_api_key"
            )
        if self.keys is None:
            raise GatewayError(503, "the gateway has no keys loaded", code="no_keys")
        key = self.keys.lookup(presented)
        if key is None:
            raise GatewayError(401, "invalid virtual key", code="invalid_api_key")
        rules.check_key(key, time.time())
        return key
