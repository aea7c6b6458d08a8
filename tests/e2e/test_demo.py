"""./run.sh demo: starts, prints three commands, and those commands work as printed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from urllib.parse import urlsplit

import pytest

from demo.__main__ import keys_file
from tests.gatewayproc import ROOT

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_keys_point_only_at_the_local_fake():
    keys = keys_file("http://127.0.0.1:5")
    endpoints = [t for k in keys["virtual_keys"].values() for t in k.get("targets", [k])]  # a key, or its targets
    urls = [p["base_url"] for p in keys["providers"].values()] + [t.get("base_url", "") for t in endpoints]
    assert {urlsplit(u).hostname for u in urls if u} == {"127.0.0.1"}
    assert {t["provider"] for t in endpoints} == {"openai", "anthropic", "deepseek"}


def test_run_sh_demo_prints_commands_that_work(tmp_path):
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GATEWAY_PORT": str(port)}
    demo = subprocess.Popen([str(ROOT / "run.sh"), "demo"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, commands = [], []
    try:
        deadline = time.monotonic() + 90
        for line in demo.stdout:
            output.append(line)
            if line.startswith("  curl ") or line.startswith("  .venv/bin/python "):
                commands.append(line.strip())
            if "Ctrl-C stops" in line or time.monotonic() > deadline:
                break
        text = "".join(output)
        assert len(commands) == 3, text
        assert "DEMO MODE" in text
        results = [subprocess.run(["bash", "-c", c], cwd=ROOT, capture_output=True, text=True, timeout=60) for c in commands]
        plain, sdk, stream = (r.stdout for r in results)
        assert '"content": "[demo] openai model gpt-4o-mini here' in plain, results[0]
        assert sdk.startswith("[demo] anthropic model claude-sonnet-4-6 here"), results[1]  # translated by the gateway
        events = [line for line in stream.splitlines() if line.startswith("data: ")]
        assert len(events) > 5 and events[-1] == "data: [DONE]" and '"content": "[demo]"' in stream, stream
        assert '"usage"' not in stream  # the client did not ask for usage: the gateway hid it
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        try:
            rest = demo.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            rest = demo.communicate()[0]
    log = "".join(output) + rest
    assert f"gateway: OpenAI-compatible endpoint http://127.0.0.1:{port}/v1 — 5 virtual keys" in log
    assert "gateway: 200 key=demo-deepseek provider=deepseek model=deepseek-chat tokens=" in log
    assert "not-a-real-key" not in log.replace("(key sk-...key)", "")  # the real (demo) keys never printed
    assert "sk-demo-revoked-key" not in log
