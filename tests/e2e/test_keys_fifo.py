"""A FIFO at the keys path does not freeze a running gateway (reload) nor its start-up.
The loader's own refusal and timeout: tests/unit/policy/test_keys_fifo.py."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import openai
import pytest

from addon.recording.process import GatewayProcess
from tests.conftest import keys_for

REAL_KEY = "sk-real-provider-key-123456"


def keys(provider, vk: str) -> dict:
    return keys_for(provider, {vk: {"provider": "openai", "api_key": REAL_KEY}})


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
