"""Keys never reach mitmweb, and a mitmweb user cannot redirect the real key.

A real mitmweb runs the gateway; the test talks to its JSON API and /updates websocket as a
logged-in user would (the web engineer's browser tests cover what the UI displays).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import pytest
import tornado.httpclient
import tornado.websocket

from addon.recording.process import terminate
from tests import rawhttp
from tests.fakeprovider import FakeProvider, Reply, openai_completion
from tests.conftest import free_port, keys_for, openai_key

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MITMWEB = Path(sys.executable).parent / "mitmweb"
REAL = "sk-webreal-secret-key-777777"
VIRTUAL = "vk_web_client_secret_4242"
PASSWORD = "web-test-password-1"
LISTENING = re.compile(rb"listening at (?:\S+?):(\d+)")


class Mitmweb:
    def __init__(self, provider_url: str, *extra: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="web-")
        keys = Path(self.tmp.name) / "keys.json"
        keys.write_text(json.dumps(keys_for(provider_url, {VIRTUAL: openai_key(REAL, name="web")})))
        self.web_port = free_port()
        self.proc = subprocess.Popen(
            [str(MITMWEB), "--mode", "reverse:http://127.0.0.1:1@127.0.0.1:0", "--set", "connection_strategy=lazy",
             "--set", f"keys_file={keys}", "--set", f"confdir={self.tmp.name}",
             "--set", f"usage_db={Path(self.tmp.name) / 'usage.sqlite3'}",
             "--set", f"web_port={self.web_port}", "--set", "web_open_browser=false",
             "--set", f"web_password={PASSWORD}", "-s", str(ROOT / "addon" / "gateway.py"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        self.output = bytearray()
        deadline = time.monotonic() + 30
        self.port = 0
        while time.monotonic() < deadline and not self.port:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output += line
            if m := LISTENING.search(line):
                self.port = int(m.group(1))
        if not self.port:
            self.stop()
            raise RuntimeError("mitmweb did not start:\n" + self.output.decode(errors="replace"))
        threading.Thread(target=self._drain, daemon=True).start()
        self.api = WebApi(self.web_port)

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output += line

    def stop(self) -> None:
        terminate(self.proc)
        self.tmp.cleanup()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=VIRTUAL, max_retries=0, timeout=30)


class WebApi:
    """mitmweb's JSON API as a logged-in user: Bearer password, plus the XSRF cookie for writes."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"authorization": f"Bearer {PASSWORD}"}
        for _ in range(100):
            try:
                self.request("GET", "/flows")
                break
            except OSError:
                time.sleep(0.1)
        # tornado's double-submit check: the same (unsigned) token as cookie and header
        self.headers.update({"cookie": "_mitmproxy_xsrf=harden0123456789", "x-xsrftoken": "harden0123456789"})

    def request(self, method: str, path: str, json_body=None) -> rawhttp.RawResponse:
        return rawhttp.request(self.base, method, path, json=json_body, headers=self.headers, timeout=10)

    def get(self, path: str) -> rawhttp.RawResponse:
        return self.request("GET", path)

    def put(self, path: str, json=None) -> rawhttp.RawResponse:
        return self.request("PUT", path, json)

    def post(self, path: str) -> rawhttp.RawResponse:
        return self.request("POST", path)


def no_secret(text: str) -> bool:
    return REAL not in text and VIRTUAL not in text


@pytest.fixture
def slow_provider():
    """Answers after a pause, so a request is in flight while the test looks at mitmweb."""
    server = FakeProvider(lambda req: Reply.json(openai_completion(req.json()), delay=2.0)).start()
    yield server
    server.stop()


def test_updates_and_flows_never_carry_a_key_and_guarded_options_are_refused(slow_provider):
    web = Mitmweb(slow_provider.url, "--set", "view_filter=")  # worst case: every flow listed
    messages: list[str] = []
    stop = threading.Event()

    def listen():
        async def run():
            req = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{web.web_port}/updates",
                                                 headers={"Authorization": f"Bearer {PASSWORD}"})
            ws = await tornado.websocket.websocket_connect(req)
            while not stop.is_set():
                try:
                    msg = await asyncio.wait_for(ws.read_message(), 0.2)
                except asyncio.TimeoutError:
                    continue
                if msg is None:
                    break
                messages.append(msg)
            ws.close()
        asyncio.run(run())

    listener = threading.Thread(target=listen, daemon=True)
    try:
        listener.start()
        time.sleep(0.5)
        client = web.client()
        # answered by the gateway itself: /v1/models, 401, 404
        assert [m.id for m in client.models.list()] == []
        with pytest.raises(openai.NotFoundError):
            client.files.list()  # a path the gateway does not serve
        # routed, and in flight while mitmweb is read
        done = threading.Thread(target=lambda: client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]))
        done.start()
        assert slow_provider.wait_received(1)
        in_flight = web.api.get("/flows").content.decode()
        assert no_secret(in_flight), in_flight
        for flow in json.loads(in_flight):
            assert no_secret(web.api.get(f"/flows/{flow['id']}/request/content.data").content.decode())
        done.join(30)
        [got] = slow_provider.received
        assert got.headers["authorization"] == f"Bearer {REAL}"  # the provider did get the key

        # a logged-in user may not lift the guards at run time (only view options change:
        # tests/e2e/test_mitmweb_guard.py tries every option)
        for change in (
            {"view_filter": "~q"},
            {"intercept": "~q"},
            {"save_stream_file": "/tmp/x.mitm"},
            {"ssl_insecure": True},
        ):
            resp = web.api.put("/options", json=change)
            assert resp.status_code == 403, (change, resp.content.decode())
            assert f"refused: options {next(iter(change))}" in resp.content.decode()
        assert not web.api.get("/options").json()["intercept"]["value"]  # rolled back
        time.sleep(0.5)
    finally:
        stop.set()
        listener.join(5)
        log = web.output.decode(errors="replace")
        web.stop()
    assert len(messages) >= 6  # flows/add and flows/update for each request were seen
    for msg in messages:
        assert no_secret(msg), msg
    assert no_secret(log)


def test_an_intercepted_request_cannot_be_redirected_in_mitmweb(provider):
    """With intercept on at start-up, a paused request's host cannot be edited (403; mitmweb's
    flow edits are refused but for mark and comment); resumed, it goes where the gateway routed
    it. (Were the host changed anyway, the real key is only written on the connection to the
    routed host: hooks/patches/wirekeys.py, tests/unit/hooks/test_patches.py.)"""
    evil = FakeProvider().start()  # where a mitmweb user would point the paused request
    web = Mitmweb(provider.url, "--set", "intercept=~q")
    try:
        result: dict = {}

        def call():
            try:
                result["resp"] = web.client().chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.APIError as e:
                result["error"] = e
        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 20
        flows = []
        while time.monotonic() < deadline:
            flows = [f for f in web.api.get("/flows").json() if f.get("intercepted")]
            if flows:
                break
            time.sleep(0.1)
        [flow] = flows
        assert no_secret(json.dumps(flow))
        edit = web.api.put(f"/flows/{flow['id']}", json={"request": {"host": "127.0.0.1", "port": evil.port}})
        assert edit.status_code == 403, edit.content.decode()
        assert web.api.post(f"/flows/{flow['id']}/resume").status_code == 200
        t.join(30)
        assert "resp" in result, result
        assert evil.received == []
        [got] = provider.received
        assert got.headers["authorization"] == f"Bearer {REAL}"
    finally:
        web.stop()
        evil.stop()
