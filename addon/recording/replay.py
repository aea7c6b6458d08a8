"""Replay recorded flows offline through a fresh gateway and compare what the client gets.

    python -m addon.recording.replay [--keys KEYS_FILE] FILE...      (./run.sh replay FILE does this)

For every recorded flow (see addon/recording/recorder.py) a local replay server answers with the
provider response as recorded (a stream in its recorded pieces, so the gateway's stream
translation runs), the recorded client request goes through a real gateway process (mitmdump +
addon/gateway.py) whose keys come from KEYS_FILE with every upstream pointed at the replay server,
and three things are compared with the recording:
- the route: which provider the gateway chose (the replay server sees it in the path);
- the request body the gateway sent upstream;
- what the client received: status, content type, body (JSON / SSE events compared parsed).
Only the fields in VOLATILE may differ. Exit status 0 only when every flow matches.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client as httpclient
import json
import os
import sys
import threading
from dataclasses import dataclass, field

import yaml
from mitmproxy import http, io
from mitmproxy.net import encoding

from addon.policy.keys_parse import HASHED_PREFIX, KeysError, parse_keys

from addon.wire.secrets import fingerprint
from addon.recording.process import GatewayProcess
from addon.providers.registry import PROVIDERS
from addon.recording.recorder import routed
from addon.routing.state import FlowState, state_of
from addon.wire.keyplaces import unmark_header, unmark_path
from addon.wire.sse import SSEDecoder

# JSON fields that legitimately differ between a recording and its replay: timestamps the
# gateway stamps on translated responses
VOLATILE = frozenset({"created"})
HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
REPLAY_API_KEY = "sk-replay-not-a-real-key"  # the replay never needs the real provider keys


# --- the local provider --------------------------------------------------------------------

@dataclass
class Upstream:
    """What the replay server received for one flow."""
    path: str
    body: bytes


@dataclass
class ReplayServer:
    """Serves one recorded provider response at a time, in its recorded pieces."""
    reply: dict | None = None
    received: list[Upstream] = field(default_factory=list)
    port: int = 0

    def start(self) -> "ReplayServer":
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _stop(self) -> None:
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                self.received.append(Upstream(target, await reader.readexactly(length)))
                if self.reply is None:  # nothing was recorded upstream: the gateway should not ask
                    break
                await self._send(writer, self.reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: dict) -> None:
        headers = [(k, v) for k, v in reply["headers"] if k.lower() not in HOP_HEADERS]
        pieces = reply["pieces"]
        chunked = len(pieces) != 1
        headers.append(("transfer-encoding", "chunked") if chunked else ("content-length", str(len(pieces[0]))))
        head = f"HTTP/1.1 {reply['status']} {reply['reason'] or 'X'}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        writer.write(head.encode("latin-1"))
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
            await asyncio.sleep(0)  # one write per recorded piece
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()


# --- the gateway under test ----------------------------------------------------------------

def url_field(provider: str) -> str:
    """The keys-file field that says where a provider's key sends requests (azure: endpoint)."""
    return "endpoint" if provider == "azure" else "base_url"


def replay_keys(keys_file: str, upstream: str) -> tuple[dict, dict[str, str]]:
    """The keys file in use, for the replay gateway: every base URL pointed at the replay server
    (path = provider name), placeholder provider keys, and each virtual key replaced by a
    replay-only key (so the replay never sends a real one, and hashed keys replay too); plus
    fingerprint -> replay-only key."""
    with open(keys_file, "rb") as f:
        data = yaml.safe_load(f) if keys_file.endswith((".yaml", ".yml")) else json.load(f)
    parse_keys(data, keys_file)  # the same validation the gateway does, with its messages
    out = {
        **data,
        "providers": {name: {url_field(name): f"{upstream}/{name}"} for name in PROVIDERS},
        "virtual_keys": {},
    }
    by_fingerprint = {}
    for vk, entry in data["virtual_keys"].items():
        # a hashed entry's fingerprint is the first 16 hex digits of its digest (addon/policy/keys_parse.py)
        fp = vk[len(HASHED_PREFIX):16 + len(HASHED_PREFIX)].lower() if vk.startswith(HASHED_PREFIX) else fingerprint(vk)
        stand_in = f"vk-replay-{fp}"
        out["virtual_keys"][stand_in] = {
            **entry,
            "name": entry.get("name") or f"key-{fp}",
            "api_key": REPLAY_API_KEY,
            url_field(entry["provider"]): f"{upstream}/{entry['provider']}",
        }
        by_fingerprint[fp] = stand_in
    return out, by_fingerprint


# --- comparing -----------------------------------------------------------------------------

def normalize(value):
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def parse_body(content_type: str, body: bytes):
    """A body as comparable data: SSE -> events, JSON -> object, anything else -> bytes."""
    if content_type.startswith("text/event-stream"):
        decoder = SSEDecoder()
        events = decoder.feed(body) + decoder.flush()
        return [{"event": name, "data": _json_or_text(data)} for name, data in events]
    if "json" in content_type:
        return _json_or_text(body)
    return body


def _json_or_text(data: str | bytes):
    try:
        return normalize(json.loads(data))
    except ValueError:
        return data


def first_diff(recorded, replayed, path: str = "") -> str | None:
    if type(recorded) is not type(replayed):
        return f"{path or 'body'}: {_short(recorded)} != {_short(replayed)}"
    if isinstance(recorded, dict):
        for k in list(recorded) + [k for k in replayed if k not in recorded]:
            if k not in recorded or k not in replayed:
                return f"{path}.{k}: {'missing' if k not in replayed else 'unexpected'} in replay"
            if d := first_diff(recorded[k], replayed[k], f"{path}.{k}"):
                return d
        return None
    if isinstance(recorded, list):
        for i, (a, b) in enumerate(zip(recorded, replayed)):
            if d := first_diff(a, b, f"{path}[{i}]"):
                return d
        if len(recorded) != len(replayed):
            return f"{path or 'body'}: {len(recorded)} items recorded, {len(replayed)} replayed"
        return None
    if recorded != replayed:
        return f"{path or 'body'}: {_short(recorded)} != {_short(replayed)}"
    return None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def media_type(headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def decoded(headers, body: bytes) -> bytes:
    enc = headers.get("content-encoding", "")
    return encoding.decode(body, enc) if enc and enc != "identity" else body


# --- one flow ------------------------------------------------------------------------------

@dataclass
class Result:
    label: str
    status: str  # ok | differs | skipped
    detail: str = ""

    def line(self) -> str:
        return f"{self.status:8} {self.label}" + (f": {self.detail}" if self.detail else "")


def label(n: int, flow: http.HTTPFlow) -> str:
    state = state_of(flow) or FlowState()
    route = f"{state.key} -> {state.provider}" if routed(flow) else state.answered or "answered"
    snap = flow.metadata["record"]["client_request"]
    status = flow.response.status_code if flow.response else "error"
    return f"#{n} {snap['method']} {snap['path']} [{route}] {status}"


def unreachable(flow: http.HTTPFlow) -> bool:
    """Routed, and the provider never answered (not a timeout: that would take upstream_timeout)."""
    state = state_of(flow)
    return bool(flow.error) and routed(flow) and "upstream" not in flow.metadata["record"] and not state.timeout


def replay_flow(flow: http.HTTPFlow, server: ReplayServer, gateway: GatewayProcess, vks: dict[str, str]) -> str | None:
    """Send one recorded client request; return None if it matches, else a short diff."""
    record = flow.metadata["record"]
    upstream = record.get("upstream")
    server.reply = upstream
    server.received.clear()
    snap = record["client_request"]
    headers = {}
    for k, v in snap["headers"]:
        if k.lower() not in HOP_HEADERS:
            headers[k] = unmark_header(k, v, vks)
    conn = httpclient.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.request(snap["method"], unmark_path(snap["path"], vks), body=snap["content"], headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    resp_headers = http.Headers([(k.encode(), v.encode()) for k, v in resp.getheaders()])

    # the route: which provider the gateway asked (the replay server path starts with it)
    recorded_provider = state_of(flow).provider if routed(flow) else None
    sent = server.received[0] if server.received else None
    replayed_provider = sent.path.split("/")[1] if sent else None
    if recorded_provider != replayed_provider:
        return f"route: recorded provider {recorded_provider or 'none (answered by the gateway)'}, replay went to {replayed_provider or 'none (answered by the gateway)'}"
    if sent is not None:
        expected = parse_body(media_type(flow.request.headers), flow.request.content or b"")
        if d := first_diff(expected, parse_body(media_type(flow.request.headers), sent.body)):
            return f"upstream request {d}"

    if flow.response is None:
        # the provider could not be reached: the replay server hangs up the same way, and the
        # client must get the gateway's 502 (the recorded flow holds only the error)
        return None if resp.status == 502 else f"status: 502 expected for a provider failure, got {resp.status}"
    if flow.response.status_code != resp.status:
        return f"status: {flow.response.status_code} != {resp.status}"
    recorded_type, replayed_type = media_type(flow.response.headers), media_type(resp_headers)
    if recorded_type != replayed_type:
        return f"content-type: {recorded_type} != {replayed_type}"
    if (
        upstream
        and upstream["status"] == 200
        and recorded_type == "text/event-stream"
        and "content-length" in resp_headers
    ):
        return "stream: the client got one block (content-length) instead of a stream"
    recorded_body = parse_body(recorded_type, flow.response.content or b"")
    return first_diff(recorded_body, parse_body(replayed_type, decoded(resp_headers, body)))


def replay(paths: list[str], keys_file: str, out=None) -> list[Result]:
    out = out or sys.stdout
    flows = []
    for path in paths:
        with open(path, "rb") as f:
            flows += [fl for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    server = ReplayServer().start()
    keys, vks = replay_keys(keys_file, server.url)
    gateway = GatewayProcess(keys, extra_args=["--set", "flow_detail=0"]).start()
    results = []
    try:
        for n, flow in enumerate(flows, 1):
            if "client_request" not in flow.metadata.get("record", {}):
                result = Result(
                    f"#{n} {flow.request.method} {flow.request.path}",
                    "skipped",
                    "not recorded by the gateway's recorder",
                )
            elif flow.response is None and not unreachable(flow):
                # a timeout or a stream cut after it started cannot be served again faithfully
                result = Result(
                    label(n, flow),
                    "skipped",
                    f"no response was recorded ({flow.error.msg if flow.error else 'unknown'})",
                )
            else:
                diff = replay_flow(flow, server, gateway, vks)
                result = Result(label(n, flow), "differs" if diff else "ok", diff or "")
            results.append(result)
            print(result.line(), file=out)
    finally:
        gateway.stop()
        server.stop()
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "differs", "skipped")}
    print(
        f"replayed {len(results)} flows: {counts['ok']} ok, {counts['differs']} differ, {counts['skipped']} skipped",
        file=out,
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m addon.recording.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="recorded flow files (./run.sh record FILE)")
    parser.add_argument(
        "--keys", default=os.environ.get("KEYS_FILE", "keys.json"), help="keys file (default: $KEYS_FILE or keys.json)"
    )
    args = parser.parse_args(argv)
    try:
        results = replay(args.files, args.keys)
    except (OSError, KeysError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a corrupt flow file, a gateway that would not start
        print(f"replay: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0 if results and not any(r.status == "differs" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
