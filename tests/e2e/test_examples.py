"""examples/test_router.py against a real gateway: one line per key, failures named."""

import hashlib
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, keys_for

pytestmark = pytest.mark.e2e


def test_router_example_reports_each_key(tmp_path, provider, gateway_factory):
    keys = keys_for(provider, {
            "vk_ok": {"provider": "openai", "api_key": "sk-example-real-key-0001", "name": "team-a"},
            "vk_down": {"provider": "deepseek", "api_key": "sk-example-real-key-0002", "base_url": "http://127.0.0.1:9"},
        })
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    gw = gateway_factory(str(path))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "test_router.py")],
        capture_output=True,
        text=True,
        env={"KEYS_FILE": str(path), "GATEWAY_URL": gw.url + "/v1", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert any(line.startswith("ok    team-a (openai, gpt-4o-mini): hello") for line in lines), lines
    unnamed = "key-" + hashlib.sha256(b"vk_down").hexdigest()[:16]
    assert any(
        line.startswith(f"FAIL  {unnamed} (deepseek, deepseek-chat)") and "HTTP 502" in line for line in lines
    ), lines
    assert len(provider.received) == 1
    assert "sk-example-real-key" not in proc.stdout
    assert "vk_down" not in proc.stdout and "vk_ok" not in proc.stdout


def test_router_example_takes_the_model_from_a_flag(tmp_path, provider, gateway_factory):
    keys = keys_for(
        provider,
        {
            "vk_a": {
                "provider": "openai",
                "api_key": "sk-example-real-key-0003",
                "name": "a",
                "models": ["gpt-4.1", "o*"],
            },
            "vk_b": {"provider": "openai", "api_key": "sk-example-real-key-0004", "name": "b"},
        },
    )
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    gw = gateway_factory(str(path))
    env = {"KEYS_FILE": str(path), "GATEWAY_URL": gw.url + "/v1", "PATH": "/usr/bin:/bin"}
    script = str(ROOT / "examples" / "test_router.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r.json()["model"] for r in provider.received] == [
        "gpt-4.1",
        "gpt-4o-mini",
    ]  # the key's first model; the default
    provider.received.clear()
    proc = subprocess.run(
        [sys.executable, script, "--model", "openai=o3"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r.json()["model"] for r in provider.received] == ["o3", "o3"]
