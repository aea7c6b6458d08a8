#!/usr/bin/env python3
"""Ask every virtual key in the keys file, through the running gateway, to identify itself.

    pip install -r examples/requirements.txt
    ./run.sh &                       # the gateway on :8080
    python examples/test_router.py   # KEYS_FILE, GATEWAY_URL (http://127.0.0.1:8080/v1) as needed

Prints one line per key: the answer, or why the provider could not be reached.
"""

from __future__ import annotations

import json
import os
import sys

import openai

DEFAULT_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest", "deepseek": "deepseek-chat"}


def load_virtual_keys(path: str) -> dict[str, dict]:
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml  # only needed for YAML keys files
            data = yaml.safe_load(f)
        else:
            data = json.load(f)
    return data.get("virtual_keys", {})


def main() -> int:
    keys_file = os.environ.get("KEYS_FILE", "keys.json")
    base_url = os.environ.get("GATEWAY_URL", f"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '8080')}/v1")
    try:
        keys = load_virtual_keys(keys_file)
    except OSError as e:
        print(f"cannot read {keys_file}: {e.strerror}")
        return 2
    failures = 0
    for vk, entry in keys.items():
        if vk.startswith("sha256:"):
            print(f"{vk[:15]}...: hashed key, the client secret is not in the file; skipped")
            continue
        provider = entry.get("provider", "?")
        model = entry.get("test_model") or DEFAULT_MODELS.get(provider, "gpt-4o-mini")
        client = openai.OpenAI(base_url=base_url, api_key=vk, max_retries=0, timeout=60)
        label = f"{entry.get('name', vk)} ({provider}, {model})"
        try:
            resp = client.chat.completions.create(
                model=model, max_tokens=60,
                messages=[{"role": "user", "content": "In one short sentence: which model and company are you?"}],
            )
            print(f"ok    {label}: {(resp.choices[0].message.content or '').strip()}")
        except openai.APIConnectionError:
            failures += 1
            print(f"FAIL  {label}: the gateway at {base_url} is not reachable (is ./run.sh running?)")
        except openai.APIStatusError as e:
            failures += 1
            print(f"FAIL  {label}: HTTP {e.status_code}: {e.message}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
