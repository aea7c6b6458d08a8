"""Issue #11 break 9: a FIFO at the keys path must not freeze the gateway (reload or start-up)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import openai
import pytest

from addon.policy.keys import KeysError, load_keys, load_keys_with_timeout
from tests.gatewayproc import GatewayProcess

REAL_KEY = "sk-real-provider-key-123456"


def bounded(fn, timeout: float = 5.0):
    """Run fn on a daemon thread; (finished, result or exception). A hang fails, not freezes, the test."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(_call(fn)), daemon=True)
    thread.start()
    thread.join(timeout)
    return (bool(out), out[0] if out else None)


def _call(fn):
    try:
        return fn()
    except BaseException as e:
        return e


def test_a_fifo_is_refused_at_once_not_read(tmp_path):
    fifo = tmp_path / "keys.json"
    os.mkfifo(fifo)
    finished, result = bounded(lambda: load_keys(str(fifo)))
    assert finished, "load_keys blocked on a FIFO"
    assert isinstance(result, KeysError) and "is not a regular file" in str(result)
    assert isinstance(_call(lambda: load_keys(str(tmp_path))), KeysError)  # a directory neither


def test_a_read_that_hangs_gives_up_after_the_timeout(tmp_path, monkeypatch):
    from addon.policy import keys
    release = threading.Event()
    monkeypatch.setattr(keys, "load_keys", lambda path: release.wait(30))  # a stuck file system
    started = time.monotonic()
    with pytest.raises(KeysError, match="not read within 0.2s"):
        load_keys_with_timeout("keys.json", timeout=0.2)
    assert time.monotonic() - started < 10
    release.set()


def keys(provider, vk: str) -> dict:
    return {"providers": {"openai": {"base_url": provider.url + "/v1"}},
            "virtual_keys": {vk: {"provider": "openai", "api_key": REAL_KEY}}}


def health(gw) -> int:
    with urllib.request.urlopen(gw.url + "/health", timeout=5) as r:
        return r.status


@pytest.mark.e2e
def test_a_fifo_swapped_in_at_runtime_is_refused_and_the_gateway_keeps_serving(provider, gateway_factory):
    gw = gateway_factory(keys(provider, "vk_first"), ["--set", "keys_reload_ms=100"])
    path = gw.keys_file
    os.unlink(path)
    os.mkfifo(path)
    try:
        deadline = time.monotonic() + 15
        while "is not a regular file" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "is not a regular file" in gw.log()
        time.sleep(0.5)  # several more reload polls with the FIFO in place
        assert health(gw) == 200  # not frozen
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_first", max_retries=0, timeout=10)
        assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
        assert gw.log().count("is not a regular file") == 1  # once per change, not per poll
    finally:
        os.unlink(path)
    with open(path + ".new", "w") as f:
        json.dump(keys(provider, "vk_second"), f)
    os.replace(path + ".new", path)
    deadline = time.monotonic() + 15
    while "keys file reloaded" not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="vk_second", max_retries=0, timeout=10)
    assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices


@pytest.mark.e2e
def test_a_fifo_at_start_up_is_one_clear_error_not_a_hang(tmp_path):
    fifo = tmp_path / "keys.json"
    os.mkfifo(fifo)
    gw = GatewayProcess(str(fifo))
    started = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        gw.start(timeout=20)
    assert "is not a regular file" in str(e.value)
    assert time.monotonic() - started < 20
