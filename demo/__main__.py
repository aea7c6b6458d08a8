"""./run.sh demo [web]: a fake provider on 127.0.0.1, a demo keys file pointing at it, and the
gateway (./run.sh, or ./run.sh web) in front; prints three commands to try. Ctrl-C stops all.

Nothing leaves the machine: every provider base_url in the demo keys file is the fake provider's,
and the gateway routes only to those.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from demo import provider as fake

ROOT = Path(__file__).resolve().parent.parent


def keys_file(provider_url: str) -> dict:
    return {
        "providers": {"openai": {"base_url": f"{provider_url}/openai/v1"},
                      "anthropic": {"base_url": f"{provider_url}/anthropic/v1"},
                      "deepseek": {"base_url": f"{provider_url}/deepseek"}},
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
        "virtual_keys": {
            "vk_demo_openai": {"provider": "openai", "api_key": fake.KEYS["openai"], "name": "demo-openai"},
            "vk_demo_anthropic": {"provider": "anthropic", "api_key": fake.KEYS["anthropic"], "name": "demo-anthropic"},
            "vk_demo_deepseek": {"provider": "deepseek", "api_key": fake.KEYS["deepseek"], "name": "demo-deepseek"},
            "vk_demo_limited": {"provider": "openai", "api_key": fake.KEYS["openai"], "name": "demo-limited",
                                "models": ["gpt-4o-mini"], "rpm": 3, "budget_usd": 0.01},
            # an OpenAI key the (fake) provider has revoked, then Claude: the first request fails
            # over inside the gateway, later ones skip the bad key (docs/failover.md)
            "vk_demo_failover": {"name": "demo-failover", "targets": [
                {"provider": "openai", "api_key": "sk-demo-revoked-key"},
                {"provider": "anthropic", "api_key": fake.KEYS["anthropic"], "fallback": True,
                 "model_map": {"gpt-4o-mini": "claude-haiku-4-5"}}]},
        },
    }


def commands(endpoint: str) -> list[str]:
    """The three commands the demo prints (tests/e2e/test_demo.py runs them as printed)."""
    def body(model: str, stream: bool = False) -> str:
        request = {"model": model, **({"stream": True} if stream else {}),
                   "messages": [{"role": "user", "content": "Hello, gateway"}]}
        return shlex.quote(json.dumps(request))
    sdk = ("from openai import OpenAI; "
           f'c = OpenAI(base_url="{endpoint}", api_key="vk_demo_anthropic"); '
           'print(c.chat.completions.create(model="claude-sonnet-4-6", '
           'messages=[{"role": "user", "content": "Hello, gateway"}]).choices[0].message.content)')
    python = sys.executable
    if python.startswith(str(ROOT) + os.sep):  # the repository's .venv: run from the repository
        python = os.path.relpath(python, ROOT)
    return [
        f"curl -s {endpoint}/chat/completions -H 'Authorization: Bearer vk_demo_openai' "
        f"-H 'content-type: application/json' -d {body('gpt-4o-mini')}",
        f"{shlex.quote(python)} -c {shlex.quote(sdk)}",
        f"curl -sN {endpoint}/chat/completions -H 'Authorization: Bearer vk_demo_deepseek' "
        f"-H 'content-type: application/json' -d {body('deepseek-chat', stream=True)}",
    ]


def wait_healthy(url: str, gateway: subprocess.Popen, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and gateway.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            time.sleep(0.1)
    return False


def main(argv: list[str]) -> int:
    web = argv[:1] == ["web"]
    server = fake.start(int(os.environ.get("DEMO_PROVIDER_PORT", "0")))
    provider_url = f"http://127.0.0.1:{server.server_address[1]}"
    tmp = tempfile.TemporaryDirectory(prefix="gateway-demo-")
    keys = Path(tmp.name) / "keys.json"
    keys.write_text(json.dumps(keys_file(provider_url), indent=2))
    host = os.environ.get("GATEWAY_HOST", "127.0.0.1")
    port = os.environ.get("GATEWAY_PORT", "8080")
    # the demo's own ledger: demo traffic never lands in your usage.sqlite3
    env = {**os.environ, "KEYS_FILE": str(keys), "USAGE_DB": str(Path(tmp.name) / "usage.sqlite3")}
    gateway = subprocess.Popen([str(ROOT / "run.sh"), *(["web"] if web else []), *argv[1 if web else 0:]], env=env)
    try:
        connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        if not wait_healthy(f"http://{connect}:{port}", gateway):
            print("demo: the gateway did not start (is the port in use? GATEWAY_PORT=9090 ./run.sh demo)", file=sys.stderr)
            return gateway.wait() if gateway.poll() is not None else 1
        endpoint = f"http://{connect}:{port}/v1"
        lines = ["", "demo: " + "=" * 66,
                 f"demo: DEMO MODE: the providers are a local fake on {provider_url}; nothing leaves this",
                 "demo: machine, and every answer starts with [demo]. Keys: vk_demo_openai, vk_demo_anthropic,",
                 "demo: vk_demo_deepseek, vk_demo_limited (only gpt-4o-mini, 3 requests a minute),",
                 "demo: vk_demo_failover (a revoked OpenAI key, then Claude as its fallback).",
                 "demo: Try these in another terminal (plain OpenAI, Claude through the openai SDK, a stream):", ""]
        lines += [f"  {command}\n" for command in commands(endpoint)]
        if web:
            lines.append("demo: mitmweb shows each flow's two sides: http://127.0.0.1:"
                         f"{os.environ.get('WEB_PORT', '8081')} (the password is printed above)")
        lines.append("demo: Ctrl-C stops the gateway and the fake provider.")
        print("\n".join(lines), flush=True)
        return gateway.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGINT)
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
        server.shutdown()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
