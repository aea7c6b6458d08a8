"""One gateway process (no fleet) stopped with SIGTERM: with `drain_s` (run.sh: GATEWAY_DRAIN_S)
new connections are refused, requests in flight (a stream) finish, the process exits 0 and the
ledger has a row per answered request (addon/hooks/drain.py)."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.test_fleet import complete, keys, read_stream, sigterm_under_load, stream_held_and_plain_answers

pytestmark = pytest.mark.e2e


def test_sigterm_lets_the_stream_in_flight_finish_refuses_new_connections_and_the_ledger_has_every_answer(
        provider, gateway_factory, tmp_path):
    db = tmp_path / "usage.sqlite3"
    gw = gateway_factory(keys(provider), ["--set", "drain_s=20", "--set", f"usage_db={db}"])
    release = threading.Event()
    provider.handler = stream_held_and_plain_answers(release)
    body, answered, refused = sigterm_under_load(gw.url, lambda: gw.proc.send_signal(signal.SIGTERM), release,
                                                 running=lambda: gw.proc.poll() is None)
    assert gw.proc.wait(20) == 0
    assert complete(body), body  # the stream in flight at SIGTERM finished
    assert len(refused) == 4
    assert answered and set(answered) == {200}
    log = gw.log()
    assert "stopping: no new connections" in log and "still in flight" not in log

    rows = sqlite3.connect(db).execute("SELECT status, streamed FROM usage").fetchall()
    assert sorted(rows) == sorted([(200, 0)] * len(answered) + [(200, 1)])  # every answer, and the drained stream


def test_the_drain_lasts_drain_s_at_most_then_what_is_still_in_flight_is_cut(provider, gateway_factory, tmp_path):
    gw = gateway_factory(keys(provider), ["--set", "drain_s=1", "--set", f"usage_db={tmp_path / 'usage.sqlite3'}"])
    release = threading.Event()  # set only at the end: the provider holds the stream meanwhile
    provider.handler = stream_held_and_plain_answers(release)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(read_stream, gw.url, started)
        assert started.wait(15)
        t = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(8) == 0
        took = time.monotonic() - t
        assert not complete(stream.result(timeout=10))  # cut
    release.set()  # (the provider's held stream ends: nothing of this test is in flight for the next)
    assert 0.9 < took < 8, took  # the bound (plus the stop), not the provider's 10 s hold
    assert "waiting up to 1 s for 1 request in flight" in gw.log()
    assert "1 request still in flight after 1 s is cut" in gw.log()


def test_without_drain_s_sigterm_stops_at_once(provider, gateway_factory):
    gw = gateway_factory(keys(provider))  # drain_s 0: mitmproxy's own stop
    release = threading.Event()
    provider.handler = stream_held_and_plain_answers(release)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(read_stream, gw.url, started)
        assert started.wait(15)
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(8) == 0
        assert not complete(stream.result(timeout=10))
    release.set()
    assert "stopping: no new connections" not in gw.log()
