"""Recording, offline replay and inspection with real processes (a gateway recording, run.sh replay,
mitmweb). The pure parts: tests/unit/recording/test_recording.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mitmproxy import http, io
from mitmproxy.test import tflow

from addon.recording import replay
from addon.wire.secrets import mark
from tests import rawhttp
from tests.fakeprovider import Reply, openai_completion
from tests.flows import scenarios
from addon.recording.process import GatewayProcess
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "flows" / "corpus.mitm"


def read_flows(path) -> list[http.HTTPFlow]:
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def write_flows(path, flows) -> None:
    with open(path, "wb") as f:
        writer = io.FlowWriter(f)
        for fl in flows:
            writer.add(fl)


def by_scenario(flows, name: str) -> http.HTTPFlow:
    """The recorded flow of a scenario (flows are recorded in scenario order, after /health)."""
    routed = [f for f in flows if f.metadata.get("record", {}).get("client_request", {}).get("path") != "/health"]
    return routed[[s.name for s in scenarios.SCENARIOS].index(name)]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(scenarios.KEYS))
    return str(path)


@pytest.fixture(scope="module")
def recording(tmp_path_factory, provider_server) -> Path:
    """Every scenario recorded afresh through a gateway with recording on."""
    out = tmp_path_factory.mktemp("rec") / "fresh.mitm"
    gw = GatewayProcess(scenarios.keys_for(provider_server.url), ["--set", f"record_file={out}"]).start()
    try:
        scenarios.run(gw.url, provider_server)
    finally:
        gw.stop()
        provider_server.reset()
    return out


# --- pure helpers ----------------------------------------------------------------------------


# --- record ----------------------------------------------------------------------------------

def test_no_real_or_virtual_key_anywhere_in_recordings(recording):
    for path in (recording, CORPUS):
        raw = Path(path).read_bytes()
        assert raw, path
        for secret in scenarios.SECRETS:
            assert secret.encode() not in raw, f"{secret} in {path}"
        assert b"vk_not_in_the_keys_file" not in raw  # a wrong key a client sent is a secret too


def test_recording_keeps_client_request_raw_upstream_and_client_response(recording):
    flows = read_flows(recording)
    assert len(flows) >= len(scenarios.SCENARIOS)
    flow = by_scenario(flows, "anthropic stream")
    client_request = flow.metadata["record"]["client_request"]
    assert dict(client_request["headers"])["authorization"] == mark("Bearer vk_corpus_anthropic")
    assert json.loads(client_request["content"])["messages"][0]["content"] == "hi"  # OpenAI format, as sent
    assert flow.request.headers["x-api-key"] == "REDACTED"  # what went upstream
    pieces = flow.metadata["record"]["upstream"]["pieces"]
    assert len(pieces) > 1 and b"event: message_start" in b"".join(pieces)  # raw Anthropic events
    assert b"chat.completion.chunk" in flow.response.content and b"message_start" not in flow.response.content
    assert flow.comment == "corpus-anthropic -> anthropic claude-sonnet-4-6"

    unnamed = by_scenario(flows, "unnamed key")
    assert "vk_corpus_unnamed_secret" not in unnamed.metadata["gateway"]["key"] + unnamed.comment

    answered = by_scenario(flows, "gateway 400 invalid json")
    assert answered.response.status_code == 400 and "upstream" not in answered.metadata["record"]


# --- replay ----------------------------------------------------------------------------------

def test_record_then_replay_round_trip_for_every_provider_and_stream(recording, keys_file, capsys):
    results = replay.replay([str(recording)], keys_file)
    out = capsys.readouterr().out
    assert [r.status for r in results] == ["ok"] * len(results), out
    for route in (
        "-> openai] 200",
        "-> deepseek] 200",
        "-> anthropic] 200",
        "invalid_api_key] 401",
        "unknown_path] 404",
    ):
        assert route in out
    assert re.search(r"replayed \d+ flows: \d+ ok, 0 differ, 0 skipped", out)


def test_corpus_replays_with_run_sh():
    proc = subprocess.run(["./run.sh", "replay", str(CORPUS)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KEYS_FILE": str(ROOT / "tests" / "flows" / "corpus-keys.json")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(scenarios.SCENARIOS) + 1} ok, 0 differ" in proc.stdout  # + the gateway's startup /health


def test_replay_after_keys_route_elsewhere_differs_and_fails(recording, tmp_path, capsys):
    keys = json.loads(json.dumps(scenarios.KEYS))
    keys["virtual_keys"]["vk_corpus_openai"]["provider"] = "deepseek"
    keys["virtual_keys"]["vk_corpus_anthropic"]["provider"] = "openai"
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    assert replay.main(["--keys", str(path), str(recording)]) == 1
    out = capsys.readouterr().out
    assert "differs  " in out and "route: recorded provider openai, replay went to deepseek" in out
    assert "route: recorded provider anthropic, replay went to openai" in out
    assert re.search(
        r"ok +#\d+ POST /v1/chat/completions \[corpus-deepseek -> deepseek\]", out
    )  # unchanged keys still match


def test_corpus_replays_with_hashed_keys_and_prices(tmp_path, capsys):
    """A keys file that holds only sha256 digests of its virtual keys replays the same."""
    keys = json.loads(json.dumps(scenarios.KEYS))
    keys["virtual_keys"] = {
        f"sha256:{hashlib.sha256(vk.encode()).hexdigest()}": entry for vk, entry in keys["virtual_keys"].items()
    }
    keys["prices"] = {"gpt-4o*": {"input": 2.5, "output": 10}}
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    assert replay.main(["--keys", str(path), str(CORPUS)]) == 0, capsys.readouterr().out


def test_replayed_stream_is_translated_from_the_recorded_pieces(recording, keys_file, tmp_path, capsys):
    """Change the raw upstream stream in a recording: the replay must differ, because the gateway
    translates the served pieces (the recorded client response is not simply echoed)."""
    flow = by_scenario(read_flows(recording), "anthropic stream")
    upstream = flow.metadata["record"]["upstream"]
    upstream["pieces"] = [p.replace(b'"jour"', b'"soir"') for p in upstream["pieces"]]
    write_flows(tmp_path / "tampered.mitm", [flow])
    assert replay.main(["--keys", keys_file, str(tmp_path / "tampered.mitm")]) == 1
    assert "'jour' != 'soir'" in capsys.readouterr().out


def test_replay_detects_a_changed_client_response(recording, keys_file, tmp_path, capsys):
    flow = by_scenario(read_flows(recording), "openai plain")
    flow.response.content = flow.response.content.replace(b"hello", b"HELLO")
    write_flows(tmp_path / "changed.mitm", [flow])
    assert replay.main(["--keys", keys_file, str(tmp_path / "changed.mitm")]) == 1
    assert "'HELLO' != 'hello'" in capsys.readouterr().out


# --- mitmproxy's own replays (mitmdump -C, mitmweb's Replay button) ---------------------------

def answer_by_provider(r) -> Reply:
    if r.path.startswith("/anthropic/"):
        return scenarios.Reply.json(scenarios.anthropic_message([{"type": "text", "text": "again"}]))
    return Reply.json(openai_completion(r.json()))


def test_client_replay_routes_each_flow_once_with_the_real_key(recording, provider_server, tmp_path):
    flows = read_flows(recording)
    plain = by_scenario(flows, "openai plain")
    unresolvable = by_scenario(flows, "anthropic plain")
    snap = unresolvable.metadata["record"]["client_request"]
    snap["headers"] = [[k, "Bearer vkfp:0000000000000000" if k == "authorization" else v] for k, v in snap["headers"]]
    bare = tflow.tflow(resp=True)  # not recorded by the gateway: upstream-shaped, key REDACTED
    bare.request.url = f"{provider_server.url}/openai/chat/completions"
    bare.request.headers["authorization"] = "REDACTED"
    write_flows(tmp_path / "in.mitm", [plain, by_scenario(flows, "anthropic stream"), unresolvable, bare])

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(scenarios.keys_for(provider_server.url)))
    provider_server.reset(answer_by_provider)
    try:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "mitmdump"), "-n", "-C", str(tmp_path / "in.mitm"),
             "-s", str(ROOT / "addon" / "gateway.py"), "--set", f"keys_file={keys}", "--set", f"confdir={tmp_path}",
             "--set", f"record_file={tmp_path / 'out.mitm'}",
             "--set", f"usage_db={tmp_path / 'usage.sqlite3'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        received = list(provider_server.received)
    finally:
        provider_server.reset()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # exactly the two resolvable flows went upstream, once each, with the real key
    assert [r.path for r in received] == ["/openai/chat/completions", "/anthropic/messages"]
    assert received[0].headers["authorization"] == "Bearer sk-corpus-openai-real-0001"
    assert received[1].headers["x-api-key"] == "sk-ant-corpus-real-0003"
    assert "authorization" not in received[1].headers
    out = read_flows(tmp_path / "out.mitm")
    assert [f.is_replay for f in out] == ["request"] * 4
    assert [f.response.status_code for f in out] == [200, 200, 401, 409]
    raw = (tmp_path / "out.mitm").read_bytes()
    assert not [s for s in scenarios.SECRETS if s.encode() in raw]


# --- mitmweb ---------------------------------------------------------------------------------


def web_get(port: int, path: str, token: str | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_web(provider_server, tmp_path, *args: str):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(scenarios.keys_for(provider_server.url)))
    gw_port, web_port = free_port(), free_port()
    env = {**os.environ, "KEYS_FILE": str(keys), "GATEWAY_PORT": str(gw_port), "WEB_PORT": str(web_port),
           "USAGE_DB": str(tmp_path / "usage.sqlite3")}
    env.pop("WEB_PASSWORD", None)
    proc = subprocess.Popen(["./run.sh", "web", *args, "--set", f"confdir={tmp_path}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        password = None
        for line in proc.stdout:  # the generated password comes before mitmweb starts
            if m := re.search(r"mitmweb password \(printed once\): (\S+)", line):
                password = m.group(1)
                break
        assert password, "run.sh web printed no password"
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # mitmweb never blocks on a full pipe
        # the web UI and the proxy listen at different moments: wait for both (a recording opened
        # offline has no proxy). The proxy's port gets a bare connection, no request: an answered
        # request would be a flow in the list the tests read
        waiting = {"web UI": lambda: web_get(web_port, "/flows")[0] == 403}
        if not args:
            waiting["proxy"] = lambda: socket.create_connection(("127.0.0.1", gw_port), timeout=1).close() is None
        deadline = time.monotonic() + 60
        while waiting and time.monotonic() < deadline and proc.poll() is None:
            for name, ready in list(waiting.items()):
                try:
                    if ready():
                        del waiting[name]
                except OSError:
                    pass
            time.sleep(0.05)
        assert not waiting, f"run.sh web: {', '.join(waiting)} not listening after 60 s (exit code {proc.poll()})"
        yield f"http://127.0.0.1:{gw_port}", web_port, password
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def mitmweb(provider_server, tmp_path):
    yield from start_web(provider_server, tmp_path)


@pytest.fixture
def mitmweb_file(provider_server, tmp_path):
    yield from start_web(provider_server, tmp_path, str(CORPUS))


def test_mitmweb_requires_the_password_and_never_shows_keys(mitmweb, provider_server):
    gateway_url, web_port, password = mitmweb
    assert web_get(web_port, "/flows")[0] == 403
    assert web_get(web_port, "/flows", "wrong-password")[0] == 403
    status, body = web_get(web_port, "/flows", password)
    assert status == 200 and json.loads(body) == []

    provider_server.reset(answer_by_provider)
    try:
        resp = rawhttp.request(gateway_url, "POST", "/v1/chat/completions", json=scenarios.chat("gpt-4o"),
                               headers={"authorization": "Bearer vk_corpus_openai"})
        bad = rawhttp.request(gateway_url, "POST", "/v1/chat/completions", content=b"{",
                              headers={"authorization": "Bearer vk_corpus_openai"})
        # refused after the key lookup; Anthropic's secret header is x-api-key, so only the
        # recorder's scrubbing keeps this client's Authorization out of the UI
        refused = rawhttp.request(gateway_url, "POST", "/v1/chat/completions", json=scenarios.chat("claude-opus-4"),
                                  headers={"authorization": "Bearer vk_corpus_anthropic"})
    finally:
        provider_server.reset()
    assert (resp.status_code, bad.status_code, refused.status_code) == (200, 400, 403)
    status, body = web_get(web_port, "/flows", password)
    listed = json.loads(body)
    assert [f["comment"] for f in listed] == [
        "corpus-openai -> openai gpt-4o",
        "corpus-openai -> openai · refused 400 invalid_json",
        "corpus-anthropic -> anthropic claude-opus-4 · refused 403 model_not_allowed",
    ]
    assert listed[1]["marked"] and listed[2]["marked"]  # the gateway-answered errors stand out
    for secret in scenarios.SECRETS:
        assert secret not in body.decode()


def test_mitmweb_does_not_list_in_flight_flows(mitmweb, provider_server):
    """While the provider has not answered, the request object still carries the real key."""
    gateway_url, web_port, password = mitmweb
    release, answered = threading.Event(), []

    def slow(r):  # runs on the fake provider's loop: holds the flow in flight until released
        release.wait(30)
        return Reply.json(openai_completion(r.json()))

    provider_server.reset(slow)
    client = threading.Thread(target=lambda: answered.append(rawhttp.request(
        gateway_url, "POST", "/v1/chat/completions", json=scenarios.chat("gpt-4o"),
        headers={"authorization": "Bearer vk_corpus_openai"})))
    client.start()
    try:
        assert provider_server.wait_received(), "the request did not reach the provider"
        status, body = web_get(web_port, "/flows", password)
        assert status == 200 and json.loads(body) == []
    finally:
        release.set()
        client.join(30)
        provider_server.reset()
    assert answered[0].status_code == 200
    status, body = web_get(web_port, "/flows", password)
    assert len(json.loads(body)) == 1 and b"sk-corpus" not in body


def test_run_sh_record_refuses_an_unwritable_file(keys_file, tmp_path):
    proc = subprocess.run(
        ["./run.sh", "record", str(tmp_path / "missing-dir" / "x.mitm"), "--set", f"confdir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KEYS_FILE": keys_file, "GATEWAY_PORT": "0", "USAGE_DB": str(tmp_path / "usage.sqlite3")},
    )
    assert proc.returncode != 0
    assert "record_file" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_mitmweb_opens_a_recording_and_its_replay_button_routes_once(mitmweb_file, provider_server, tmp_path):
    _, web_port, password = mitmweb_file
    status, body = web_get(web_port, "/flows", password)
    listed = json.loads(body)
    assert status == 200 and len(listed) == len(scenarios.SCENARIOS) + 1
    assert not [s for s in scenarios.SECRETS if s in body.decode()]
    assert not (tmp_path / "usage.sqlite3").exists()  # loading did not count recorded usage again
    target = next(
        f for f in listed if f["comment"].startswith("corpus-openai -> openai ") and f["response"]["status_code"] == 200
    )

    provider_server.reset(answer_by_provider)
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{web_port}/flows/{target['id']}/replay",
            method="POST",
            data=b"",
            headers={"Authorization": f"Bearer {password}", "X-XSRFToken": "t", "Cookie": "_mitmproxy_xsrf=t"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            replayed = [f for f in json.loads(web_get(web_port, "/flows", password)[1]) if f["id"] == target["id"]]
            if replayed and replayed[0].get("response"):
                break
            time.sleep(0.05)
        received = list(provider_server.received)
    finally:
        provider_server.reset()
    assert [r.path for r in received] == ["/openai/chat/completions"]
    assert received[0].headers["authorization"] == "Bearer sk-corpus-openai-real-0001"
    assert replayed[0]["is_replay"] == "request" and replayed[0]["response"]["status_code"] == 200
    assert "sk-corpus" not in web_get(web_port, "/flows", password)[1].decode()


def test_a_flow_in_flight_at_shutdown_leaves_no_key_in_the_recording(provider_server, tmp_path):
    """mitmproxy's -w would save in-flight flows at shutdown, real key included; the recorder
    writes only finished flows (and the gateway has redacted those)."""
    out = tmp_path / "shutdown.mitm"
    release = threading.Event()

    def hold(r):
        release.wait(30)
        return Reply.json(openai_completion(r.json()))

    provider_server.reset(hold)
    gw = GatewayProcess(scenarios.keys_for(provider_server.url), ["--set", f"record_file={out}"]).start()
    def send():
        try:
            rawhttp.request(gw.url, "POST", "/v1/chat/completions", json=scenarios.chat("gpt-4o"),
                            headers={"authorization": "Bearer vk_corpus_openai"})
        except OSError:
            pass  # the gateway went away under it: expected

    client = threading.Thread(target=send, daemon=True)
    client.start()
    try:
        assert provider_server.wait_received(), "the request did not reach the provider"
        gw.stop()
    finally:
        release.set()
        gw.stop()
        provider_server.reset()
    raw = out.read_bytes() if out.exists() else b""
    assert not [s for s in scenarios.SECRETS if s.encode() in raw]


