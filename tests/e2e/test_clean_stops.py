"""A stop prints no traceback: Ctrl-C or SIGTERM of one gateway (`./run.sh`, drained or not) or of a
fleet (`GATEWAY_WORKERS=2 ./run.sh`), a worker's SIGTERM with HAProxy's connections open, and a
`kill -9` of the fleet's supervisor (its children get SIGTERM from the kernel), each while clients
hold idle keep-alive connections, half-sent requests, a request in flight and an open stream.

Users read a traceback as a crash. These stops printed a dozen: mitmproxy's HTTP/1 reader was
put back under open connections (`KeyError: 'read_headers'`), and mitmproxy's event loop
cancelled every connection still open after the addons' `done` (`CancelledError`, one per
connection). addon/hooks/drain.py closes them first; addon/hooks/patches/ keeps each wrapper's
original reachable."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.fakeprovider import Reply, default_reply, openai_stream
from tests.conftest import ROOT, free_port, keys_for, openai_key
from tests.services.haproxy import FleetProcess, alive, wait_healthy

pytestmark = pytest.mark.e2e

VIRTUAL_KEY = "vk_clean_stop_user_1"
REAL_KEY = "sk-real-provider-key-clean-stop-4821"


def keys(provider) -> dict:
    return keys_for(provider, {VIRTUAL_KEY: openai_key(REAL_KEY, name="stopper")})


def held(release: threading.Event):
    """Streams: the first chunk at once, the rest after `release`. A plain request marked
    `"slow": true`: answered after 5 s (in flight at the stop). Others: at once."""
    def handler(req):
        body = req.json()
        if body.get("stream"):
            return Reply.sse(openai_stream(body, pieces=("a", "b", "c")), hold_after_first=release)
        reply = default_reply(req)
        if body.get("slow"):
            reply.delay = 5
        return reply
    return handler


def request(body: dict, content_length: int | None = None) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (VIRTUAL_KEY.encode(), len(data) if content_length is None else content_length, data))


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=15)


def read_head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = s.recv(65536)
        assert piece, "the gateway closed the connection before answering"
        data += piece
    return data


def open_everything(port: int, provider) -> list[socket.socket]:
    """On the gateway at `port`: three idle keep-alive connections (one answered request each),
    a request head cut in the middle (after its Authorization line), a body cut in the middle, a
    request the provider holds, and a stream whose first chunk has arrived."""
    held_by_clients = []
    message = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        s = connect(port)
        s.sendall(request(message))
        assert read_head(s).startswith(b"HTTP/1.1 200")
        held_by_clients.append(s)
    head = connect(port)
    head.sendall(request(message).split(b"content-type")[0])
    body = connect(port)
    body.sendall(request(message, content_length=500)[:-10])
    before = len(provider.received)
    slow = connect(port)
    slow.sendall(request({**message, "slow": True}))
    stream = connect(port)
    stream.sendall(request({**message, "stream": True}))
    assert read_head(stream).startswith(b"HTTP/1.1 200")  # the stream has begun
    assert provider.wait_received(before + 2, timeout=15)  # and the slow one reached the provider
    time.sleep(0.3)
    return [*held_by_clients, head, body, slow, stream]


def assert_quiet(output: str) -> None:
    assert "Traceback" not in output, output
    assert "has crashed" not in output, output
    assert VIRTUAL_KEY not in output and REAL_KEY not in output


def closed_by_gateway(sockets: list[socket.socket]) -> bool:
    """Every client connection has been closed from the gateway's side (EOF or a reset)."""
    for s in sockets:
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        finally:
            s.close()
    return True


class Gateway:
    """`./run.sh` (one process) on a free port, its output kept."""

    def __init__(self, provider, tmp_path: Path, drain_s: str) -> None:
        (tmp_path / "keys.json").write_text(json.dumps(keys(provider)))
        self.port = free_port()
        env = {**os.environ, "KEYS_FILE": str(tmp_path / "keys.json"), "GATEWAY_PORT": str(self.port),
               "USAGE_DB": str(tmp_path / "usage.sqlite3"), "GATEWAY_DRAIN_S": drain_s, "GATEWAY_WORKERS": "1"}
        self.log = tmp_path / "output"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(ROOT / "run.sh"), "--set", f"confdir={tmp_path}"], env=env, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_healthy(self.port, self.proc, log=self.output)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("drain_s", ["1", "0"], ids=["drained", "at-once"])
def test_a_stop_of_one_gateway_prints_no_traceback(provider, tmp_path, signum, drain_s):
    release = threading.Event()
    provider.handler = held(release)
    gw = Gateway(provider, tmp_path, drain_s)
    try:
        clients = open_everything(gw.port, provider)
        gw.proc.send_signal(signum)
        assert gw.proc.wait(30) == 0
        assert closed_by_gateway(clients)
    finally:
        release.set()
        gw.kill()
    assert_quiet(gw.output())
    # the connections were closed while the gateway could still count them: the ledger has the
    # three answers, the stream it cut, and the two requests it cut (the slow one, the half body)
    db = sqlite3.connect(tmp_path / "usage.sqlite3")
    rows = db.execute("SELECT status, streamed FROM usage").fetchall()
    db.close()
    assert sorted(rows) == [(0, 0), (0, 0), (200, 0), (200, 0), (200, 0), (200, 1)]


@pytest.fixture
def fleet(provider):
    started: list[FleetProcess] = []

    def start() -> FleetProcess:
        f = FleetProcess(keys(provider), 2, env={"GATEWAY_DRAIN_S": "1"}, quiet=False)
        started.append(f)
        return f.start()

    yield start
    for f in started:
        f.stop()


def wait_gone(pids: list[int], timeout: float = 40) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.fleet
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_of_a_fleet_prints_no_traceback(provider, fleet, signum):
    release = threading.Event()
    provider.handler = held(release)
    f = fleet()
    try:
        pids = f.pids()
        clients = open_everything(f.port, provider)
        f.signal(signum)
        assert f.wait(60) == 0
        assert closed_by_gateway(clients)
        assert not wait_gone(pids), "orphan processes"
    finally:
        release.set()
    assert "fleet: stopped" in f.log()
    assert_quiet(f.log())


@pytest.mark.fleet
def test_a_workers_sigterm_with_haproxys_connections_open_prints_no_traceback(provider, fleet):
    """What each worker gets when the supervisor dies (PR_SET_PDEATHSIG), without the race: HAProxy
    stays up, holding its kept-alive connections to the worker (http-reuse) and the requests
    in flight on them."""
    release = threading.Event()
    provider.handler = held(release)
    f = fleet()
    try:
        clients = open_everything(f.port, provider)
        worker = f.state()["workers"]
        for w in worker:
            os.kill(w["pid"], signal.SIGTERM)
        assert not wait_gone([w["pid"] for w in worker], 30)
    finally:
        release.set()
        for s in clients:
            s.close()
    time.sleep(0.5)  # (the output of the workers' last lines)
    assert_quiet(f.log())


@pytest.mark.fleet
def test_a_kill_9_of_the_fleets_supervisor_prints_no_traceback(provider, fleet):
    release = threading.Event()
    provider.handler = held(release)
    f = fleet()
    try:
        pids = f.pids()
        clients = open_everything(f.port, provider)
        f.signal(signal.SIGKILL)  # the kernel sends every child SIGTERM (PR_SET_PDEATHSIG)
        assert f.wait(10) == -signal.SIGKILL
        assert not wait_gone(pids), "orphan processes"
        assert closed_by_gateway(clients)
    finally:
        release.set()
    time.sleep(0.5)
    assert_quiet(f.log())
