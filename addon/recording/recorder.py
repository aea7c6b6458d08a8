"""Recording flows for offline replay, and making mitmproxy's own replays safe.

A recorded flow keeps three things (see README.md, "Recording, replaying and inspecting traffic"):
- `flow.metadata["record"]["client_request"]`: the request as the client sent it, its key replaced
  by a fingerprint marker (`Bearer vkfp:<fingerprint>`);
- `flow.metadata["record"]["upstream"]`: the provider's response as it arrived (status, headers,
  raw body pieces: one piece for a whole body, the received pieces for a stream);
- `flow.request` / `flow.response`: what the gateway sent upstream (its key REDACTED) and what the
  client received (for streams: the bytes sent, stored after the stream ended).

Two addons sit around the Gateway, because their hooks run in chain order (addon/hooks/chain.py):
`Snapshot` before it (sees the client request and the provider response before the gateway
rewrites them), `Recorder` after it (sees the stream callable the gateway chose, and the final flow).
"""

from __future__ import annotations

import logging
import os

from mitmproxy import ctx, exceptions, http, io
from mitmproxy.utils import human

from addon.routing.state import KEY, api_for_flow, state_of
from addon.wire.errors import ERROR_SOURCE, GatewayError
from addon.wire.keyplaces import KEY_HEADERS, hide_header, hide_path, unmark_header, unmark_path
from addon.wire.secrets import MARKER, fingerprint

log = logging.getLogger("gateway")

PLACEHOLDER = ("127.0.0.1", 1)  # run.sh's reverse target, never reachable
def scrub(headers: http.Headers) -> None:
    """Replace every key-carrying value (any place of a key: wire/keyplaces.py, and every cookie)
    that is not already redacted or marked."""
    fields = headers.fields
    hidden = tuple(
        (k, hide_header(k.decode("latin-1"), v.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape"))
        if k.lower() in SCRUBBED
        else (k, v)
        for k, v in fields
    )
    if hidden != fields:
        headers.fields = hidden


SCRUBBED = frozenset({*(name.encode() for name in KEY_HEADERS), b"proxy-authorization", b"cookie"})


def headers_state(headers: http.Headers) -> list[list[str]]:
    return [[k, v] for k, v in headers.items(multi=True)]


def routed(flow: http.HTTPFlow) -> bool:
    """Sent to a provider: the gateway knows the provider and did not answer itself (refusals
    after the key lookup carry a provider too)."""
    state = state_of(flow)
    return state is not None and state.provider is not None and state.answered is None


def hide_unnamed_key(flow: http.HTTPFlow) -> None:
    """A key without a "name" in the keys file is named by the virtual key itself: keep that
    name out of recordings (the fingerprint still identifies it)."""
    state = state_of(flow)
    name = state.key if state is not None else None
    if name and fingerprint(name) == state.fingerprint:
        state.key = MARKER + state.fingerprint
        flow.comment = flow.comment.replace(name, state.key)


class Snapshot:
    """Runs before the Gateway: keeps the client's request (key marked) and the provider's
    response before they are rewritten; on `is_replay == "request"` restores the client's request
    so the gateway routes the replay once, re-resolving the key through the keys file in use.

    Keeping costs a copy per request, so it happens only while recording or when asked for
    (`replayable_flows`, which ./run.sh web sets for mitmweb's Replay button)."""

    def __init__(self, live=None) -> None:
        self.live = live  # its `keys`, the KeyStore in force: replays re-resolve keys there
        self.keeping = False

    def load(self, loader) -> None:
        loader.add_option(
            "replayable_flows", bool, False,
            "Keep each client's request on its flow (the key as a fingerprint), so mitmweb's Replay "
            "can re-send it through the gateway. Always on while record_file is set.",
        )

    def configure(self, updated) -> None:
        if "replayable_flows" in updated or "record_file" in updated:
            self.keeping = ctx.options.replayable_flows or bool(ctx.options.record_file)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.error:
            return
        if flow.is_replay == "request":
            if flow.response is None:
                self.restore(flow)
        elif flow.live and self.keeping:  # also a request the gateway answered on its headers (body dropped)
            headers = flow.request.headers.copy()
            scrub(headers)
            if flow.client_conn.sockname and "host" in headers:
                # reverse mode has pointed Host at its placeholder: as sent, it named the gateway
                headers["host"] = human.format_address(flow.client_conn.sockname)
            flow.metadata["record"] = {"client_request": {
                "method": flow.request.method,
                "path": hide_path(flow.request.path),  # (the gateway's screen did it already)
                "http_version": flow.request.http_version,
                "headers": headers_state(headers),
                "content": flow.request.raw_content or b"",
            }}

    def restore(self, flow: http.HTTPFlow) -> None:
        snap = flow.metadata.get("record", {}).get("client_request")
        if snap is None:
            # an upstream-shaped request with a REDACTED key: never send it anywhere
            # in the shape of the API the client had used (the flow's path is the provider's now)
            error = GatewayError(409, "this flow has no recorded client request to replay", code="not_replayable",
                                 type="invalid_request_error")
            body = api_for_flow(flow).error_body(error)
            flow.response = http.Response.make(409, body, {"content-type": "application/json", ERROR_SOURCE: "gateway"})
            flow.marked = ":heavy_multiplication_x:"
            return
        flow.metadata.pop(KEY, None)  # the replay is routed afresh
        flow.metadata["record"] = {"client_request": snap}
        known = self.virtual_keys()
        req = flow.request
        # back to the unreachable placeholder: a replay the gateway fails to route goes nowhere
        # (an answered flow shows the gateway's own address, see hooks/answers.show_gateway_address)
        req.scheme, req.host, req.port = "http", *PLACEHOLDER
        req.method = snap["method"]
        req.path = unmark_path(snap["path"], known)
        req.headers = http.Headers([(k.encode(), unmark_header(k, v, known).encode()) for k, v in snap["headers"]])
        req.raw_content = snap["content"]

    def virtual_keys(self) -> dict[str, str]:
        store = getattr(self.live, "keys", None)
        return store.virtual_keys_by_fingerprint() if store is not None else {}

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live:  # flows loaded from a file (mitmweb -r) pass through the hooks too
            return
        if not routed(flow):
            scrub(flow.request.headers)  # answered by the gateway: the client's key is still there
            return
        record = flow.metadata.get("record")
        if record is None:  # not keeping
            return
        record["upstream"] = {
            "status": flow.response.status_code,
            "reason": flow.response.reason,
            "headers": headers_state(flow.response.headers),
            "pieces": [],
        }

    def response(self, flow: http.HTTPFlow) -> None:
        upstream = flow.metadata.get("record", {}).get("upstream")
        if flow.live and upstream is not None and not flow.response.stream:
            upstream["pieces"] = [flow.response.raw_content or b""]

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.live and not routed(flow):
            scrub(flow.request.headers)


class Recorder:
    """Runs after the Gateway: taps streams and appends every finished flow to `record_file`.

    Written with FlowWriter on response/error only, not with mitmproxy's `-w`: that also saves
    in-flight flows at shutdown, whose request still carries the real provider key."""

    def __init__(self) -> None:
        self.file = None
        self.writer: io.FlowWriter | None = None
        self.sent: dict[str, list[bytes]] = {}  # flow id -> stream pieces the client received
        self.started = False
        self.keep_streams = False  # tap streams without recording (replayable_flows: mitmweb)

    def load(self, loader) -> None:
        loader.add_option(
            "record_file", str, "",
            "Append every flow the gateway handles to this file (mitmproxy flow format), with "
            "the raw provider response for replay. Keys are stored as fingerprints only.",
        )

    def configure(self, updated) -> None:
        if "replayable_flows" in updated:  # Snapshot's option: mitmweb shows the streams kept
            self.keep_streams = ctx.options.replayable_flows
        if "record_file" not in updated:
            return
        self.close()
        path = ctx.options.record_file
        if not path:
            return
        path = os.path.expanduser(path)
        try:
            self.file = open(path, "ab")
        except OSError as e:
            message = f"record_file {path}: {e.strerror}"
            if self.started:
                raise exceptions.OptionsError(message) from None
            log.error("gateway: %s", message)  # at start-up: one line, and mitmdump exits
            return
        self.writer = io.FlowWriter(self.file)
        log.info("gateway: recording flows to %s", path)

    @property
    def active(self) -> bool:  # without a record_file or replayable_flows the chain leaves this part out
        return self.writer is not None or self.keep_streams

    def running(self) -> None:
        self.started = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        upstream = flow.metadata.get("record", {}).get("upstream")
        if upstream is None or not flow.live or not flow.response.stream:  # upstream: Snapshot is keeping
            return
        self.sent[flow.id] = sent = []
        flow.response.stream = tap(flow.response.stream, upstream["pieces"], sent)

    def response(self, flow: http.HTTPFlow) -> None:
        sent = self.sent.pop(flow.id, None)
        if sent is not None:
            # the body the client got, stored after the stream ended (nothing more is sent)
            flow.response.raw_content = b"".join(sent)
        self.write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.sent.pop(flow.id, None)
        self.write(flow)

    def write(self, flow: http.HTTPFlow) -> None:
        if self.writer is None or not flow.live:
            return
        try:
            copy = flow.copy()
            scrub(copy.request.headers)  # belt and braces: Snapshot and hooks/headers.redact did this
            copy.request.path = hide_path(copy.request.path)
            hide_unnamed_key(copy)
            self.writer.add(copy)
            self.file.flush()
        except Exception:  # a full disk must not look like a gateway failure to the client
            log.exception("gateway: could not record a flow to %s", ctx.options.record_file)

    def done(self) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.writer = None
        if not self.keep_streams:
            self.sent.clear()  # inactive now: the chain calls no response hook to pop these


def tap(stream, received: list[bytes], sent: list[bytes]):
    """Wrap a response stream (True or a callable) to keep the raw pieces and what was sent."""
    def tapped(piece: bytes):
        if piece:
            received.append(piece)
        out = stream(piece) if callable(stream) else piece
        if isinstance(out, (bytes, bytearray)):
            sent.append(bytes(out))
            return out
        out = [bytes(p) for p in out]  # a generator can only be consumed once
        sent.extend(out)
        return out
    return tapped
