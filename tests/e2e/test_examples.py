"""examples/test_router.py against a real gateway: one line per key, failures named."""

import json
import subprocess
import sys

import pytest

from tests.gatewayproc import ROOT

pytestmark = pytest.mark.e2e


def test_router_example_reports_each_key(tmp_path, provider, gateway_factory):
    keys = {
        "providers": {"openai": {"base_url": provider.url + "/v1"}},
        "virtual_keys": {
            "vk_ok": {"provider": "openai", "api_key": "sk-example-real-key-0001", "name": "team-a"},
            "vk_down": {"provider": "deepseek", "api_key": "sk-example-real-key-0002", "base_url": "http://127.0.0.1:9"},
        },
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    gw = gateway_factory(str(path))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "test_router.py")], capture_output=True, text=True,
                          env={"KEYS_FILE": str(path), "GATEWAY_URL": gw.url + "/v1", "PATH": "/usr/bin:/bin"}, timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert any(line.startswith("ok    team-a (openai, gpt-4o-mini): hello") for line in lines), lines
    assert any(line.startswith("FAIL  vk_down (deepseek") and "HTTP 502" in line for line in lines), lines
    assert len(provider.received) == 1
    assert "sk-example-real-key" not in proc.stdout
