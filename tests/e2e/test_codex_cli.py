"""OpenAI's Codex CLI, a real client that speaks only the Responses API: `codex exec` through the
gateway to a fake provider (openai and azure keys), streamed response.* events back.

The test installs Codex with npm into .cache/codex (once; version CODEX_VERSION) and skips with
the reason when npm is missing or the install fails (no registry access)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_providers_e2e import rows_where
from tests.fakeprovider import Reply
from tests.fakeresponses import response_stream
from tests.npmclient import npm_client

pytestmark = [pytest.mark.e2e, pytest.mark.client]

ROOT = Path(__file__).resolve().parent.parent.parent
PREFIX = ROOT / ".cache" / "codex"
VERSION = os.environ.get("CODEX_VERSION", "0.171.0")
KEYS = {"vk_codex_openai": {"provider": "openai", "api_key": "sk-codex-openai-real-0001", "name": "codex-openai"},
        "vk_codex_azure": {"provider": "azure", "api_key": "codex-azure-real-0002", "name": "codex-azure"}}


@pytest.fixture(scope="module")
def codex() -> Path:
    return npm_client(PREFIX, "@openai/codex", VERSION, "codex")


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    return tmp_path_factory.mktemp("codex") / "usage.sqlite3"


@pytest.fixture(scope="module")
def gateway(gateway_factory, provider_server, ledger):
    url = provider_server.url
    return gateway_factory({"providers": {"openai": {"base_url": url + "/v1"}, "azure": {"endpoint": url + "/az"}},
                            "virtual_keys": KEYS}, ["--set", f"usage_db={ledger}"])


def run_codex(codex: Path, gateway, key: str, model: str, tmp_path: Path, prompt: str = "say hello") -> str:
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "gateway"\n\n[model_providers.gateway]\nname = "gateway"\n'
        f'base_url = "{gateway.url}/v1"\nenv_key = "GATEWAY_KEY"\nwire_api = "responses"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env.update(HOME=str(home), CODEX_HOME=str(home / ".codex"), GATEWAY_KEY=key)
    proc = subprocess.run([str(codex), "exec", "--skip-git-repo-check", prompt], env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + gateway.log()[-3000:]
    return proc.stdout


@pytest.mark.parametrize("key, model, path, header", [
    ("vk_codex_openai", "gpt-5-codex", "/v1/responses", ("authorization", "Bearer sk-codex-openai-real-0001")),
    ("vk_codex_azure", "codex-deployment", "/az/openai/v1/responses", ("api-key", "codex-azure-real-0002")),
])
def test_codex_exec_through_the_gateway(codex, gateway, provider, ledger, tmp_path, key, model, path, header):
    provider.reset(lambda r: Reply.sse(response_stream(r.json(), pieces=("Hello from ", "the gateway"))))
    out = run_codex(codex, gateway, key, model, tmp_path)
    assert "Hello from the gateway" in out
    sent = [r for r in provider.received if r.method == "POST"]
    assert sent and all(r.path == path for r in sent)
    body = sent[-1].json()
    assert body["model"] == model and body["stream"] is True and body["input"]
    assert sent[-1].headers[header[0]] == header[1]
    assert not any(vk in json.dumps(r.headers) for r in sent for vk in KEYS)
    name = KEYS[key]["name"]
    rows = rows_where(ledger, "key_name", {name})
    assert rows and rows[-1]["streamed"] == 1 and (rows[-1]["prompt_tokens"], rows[-1]["completion_tokens"]) == (9, 3)


def test_no_real_key_in_the_gateway_log(gateway):
    for entry in KEYS.values():
        assert entry["api_key"] not in gateway.log()
