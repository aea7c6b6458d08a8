"""mitmweb's first view of a gateway flow: a content view picked before JSON for every flow the
gateway handled. The Request tab shows the client's request beside the one sent upstream, the
Response tab the provider's answer beside what the client got (streams event by event), and a
flow the gateway answered itself says why.

The client's request and the provider's raw answer are what recording/recorder.py's Snapshot
keeps (`replayable_flows`, which ./run.sh web sets, or while recording); without them only the
gateway's side is shown, with a note saying how to keep the rest.
"""

from __future__ import annotations

import json
from datetime import datetime

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Metadata

from addon.routing.state import FlowState, state_of
from addon.web.listing import called_url
from addon.web.sides import Message, render

NOT_KEPT = ("(the client's side is kept only with --set replayable_flows=true, which ./run.sh web sets, "
            "or while recording)")


def headers_list(headers) -> list[tuple[str, str]]:
    if isinstance(headers, http.Headers):
        return [(k, v) for k, v in headers.items(multi=True)]
    return [(k, v) for k, v in headers]


def url_of(request: http.Request) -> str:
    return f"{request.method} {request.pretty_url}"


def status_line(status: int, reason: str = "") -> str:
    return f"{status} {reason or http.status_codes.RESPONSES.get(status, '')}".strip()


def refusal(flow: http.HTTPFlow) -> str:
    """The message of an error the gateway answered itself."""
    try:
        return json.loads(flow.response.get_content(strict=False) or b"{}")["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""


def state(flow: http.HTTPFlow) -> FlowState:
    return state_of(flow) or FlowState()


def answered(state: FlowState) -> bool:
    """Nothing went upstream: the gateway answered the request itself."""
    return state.answered is not None or state.provider is None


def summary(flow: http.HTTPFlow) -> str:
    noted = state(flow)
    if noted.answered is not None:
        return (f"Answered by the gateway, never forwarded: {flow.response.status_code} {noted.answered}"
                f" — {refusal(flow)}" + guardrails(noted))
    if noted.provider is None:
        return "Answered by the gateway, never forwarded." + guardrails(noted)
    parts = [f"key {noted.key if noted.key is not None else '?'} → {noted.provider}"]
    if noted.model:
        parts.append(f"model {noted.model}")
    if noted.stream:
        parts.append("streamed")
    return "Routed by the gateway: " + ", ".join(parts) + attempts(flow, noted) + guardrails(noted)


def guardrails(state: FlowState) -> str:
    """Where the key's guardrails masked or blocked (hooks/guardrails.py): detectors and places,
    one line each; both sides shown here hold only the masked text."""
    info = state.guardrails
    if info is None:
        return ""
    lines = [f"\nGuardrails ({info.set_name}):"]
    if info.blocked:
        lines.append(f"  blocked: {', '.join(info.blocked)}")
    if info.masked:
        lines.append("  masked in the request: " + ", ".join(f"{n} {d}" for d, n in sorted(info.masked.items())))
    for where in info.where or ():
        lines.append(f"    at {where}")
    if info.answer_masked:
        lines.append("  masked in the answer: "
                     + ", ".join(f"{n} {d}" for d, n in sorted(info.answer_masked.items())))
    return "\n".join(lines)


def attempts(flow: http.HTTPFlow, state: FlowState) -> str:
    """A failover's attempts, one line each: the failed ones (hooks/failover.py keeps them) with
    their status or error and time, then the one this flow is."""
    failed = state.failed_attempts
    if not failed:
        return ""
    lines = [f"\n{len(failed) + 1} attempts:"]
    for a in failed:
        outcome = f"{a['status']}" if a.get("status") is not None else (a.get("error") or "failed")
        name = target_name(a.get("provider"), a.get("target"), a.get("fallback"))
        lines.append(f"  {a['attempt']}. {name}: {outcome} after {a['ms']:g} ms, at {clock(a['started'])}"
                     " — failed, the next target was tried")
    started = state.attempt_started
    if flow.response is not None:
        took = (
            f" after {(flow.response.timestamp_start - started) * 1000:.1f} ms"
            if started and flow.response.timestamp_start
            else ""
        )
        outcome = f"answered {flow.response.status_code}{took}"
    else:
        outcome = f"failed: {flow.error.msg}" if flow.error else "in flight"
    at = f", at {clock(started)}" if started else ""
    attempt = state.attempts if state.attempts is not None else len(failed) + 1
    lines.append(f"  {attempt}. {target_name(state.provider, state.target, state.fallback)}: {outcome}{at} — this flow")
    return "\n".join(lines)


def target_name(provider: str | None, target: str | None, fallback: bool | None) -> str:
    """ "openai (target 0)", "anthropic (target 1, fallback)" """
    notes = ", ".join(n for n in (f"target {target}", "fallback" if fallback else "") if n)
    return f"{provider} ({notes})"


def clock(when: float) -> str:
    """A time of day as mitmweb's list shows its times (local), to the millisecond."""
    return datetime.fromtimestamp(when).strftime("%H:%M:%S.%f")[:-3]


def request_sides(flow: http.HTTPFlow) -> str:
    noted = state(flow)
    snap = flow.metadata.get("record", {}).get("client_request")
    upstream = flow.request
    if answered(noted):
        # nothing went upstream: flow.request is the client's request (its key marked)
        client = Message("CLIENT → GATEWAY", f"{upstream.method} {called_url(flow)}", headers_list(upstream.headers),
                         upstream.raw_content, "not forwarded: the gateway answered it itself")
        return render([client], summary(flow))
    messages = []
    client_headers = None
    if snap is not None:
        client_headers = headers_list(snap["headers"])
        messages.append(Message("CLIENT → GATEWAY", f"{snap['method']} {snap['path']}", client_headers,
                                snap["content"], "as the client sent it (its key as a fingerprint)"))
    else:
        messages.append(Message("CLIENT → GATEWAY", "(not kept)", [], None, NOT_KEPT))
    messages.append(Message(f"GATEWAY → PROVIDER ({noted.provider})", url_of(upstream), headers_list(upstream.headers),
                            upstream.raw_content, "as sent upstream (the provider key redacted once sent)",
                            client_headers))
    return render(messages, summary(flow))


def response_sides(flow: http.HTTPFlow, client_body: bytes) -> str:
    noted = state(flow)
    response = flow.response
    client_line = status_line(response.status_code, response.reason)
    if answered(noted):
        return render([Message("GATEWAY → CLIENT", client_line, headers_list(response.headers), client_body,
                               "the gateway's own answer")], summary(flow))
    upstream = flow.metadata.get("record", {}).get("upstream")
    if upstream is None:
        provider = Message(f"PROVIDER ({noted.provider}) → GATEWAY", "(not kept)", [], None, NOT_KEPT)
        client = Message("GATEWAY → CLIENT", client_line, headers_list(response.headers), client_body,
                         "what the client received")
    else:
        provider_headers = headers_list(upstream["headers"])
        provider = Message(f"PROVIDER ({noted.provider}) → GATEWAY",
                           status_line(upstream["status"], upstream.get("reason", "")), provider_headers,
                           b"".join(upstream["pieces"]), "as the provider answered")
        client = Message("GATEWAY → CLIENT", client_line, headers_list(response.headers), client_body,
                         "what the client received", provider_headers)
    return render([provider, client], summary(flow))


class GatewayView(contentviews.Contentview):
    """Picked first (priority above JSON's) for flows the gateway handled."""

    name = "LLM gateway"

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        flow = metadata.flow
        if isinstance(flow, http.HTTPFlow) and "gateway" in flow.metadata and metadata.http_message is not None:
            return 10
        return -1

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        flow = metadata.flow
        if metadata.http_message is flow.request:
            return request_sides(flow)
        return response_sides(flow, data)


class WebViews:
    """Registers the view when the addon loads (mitmweb; in mitmdump it serves flow_detail >= 3).
    mitmproxy 12 has no way to unregister one; a reloaded script replaces it by name."""

    def load(self, loader) -> None:
        contentviews.add(GatewayView())
