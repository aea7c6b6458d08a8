#!/usr/bin/env python3
"""Ask every virtual key in the keys file, through the running gateway, to identify itself.

    pip install -r examples/requirements.txt
    ./run.sh &                       # the gateway on :8080
    python examples/test_router.py   # KEYS_FILE, GATEWAY_URL (http://127.0.0.1:8080/v1) as needed
    python examples/test_router.py --model anthropic=claude-sonnet-4-6 --model openai=gpt-4o

Prints one line per key, named as the gateway names it (its "name", else key-<fingerprint>; never
the virtual key): the answer, or why the provider could not be reached. The model asked: --model
(for every key, or per provider as provider=model), else the first model the key lists, else the
provider's default below.
"""

from __future__ import annotations

import argparse
import hashlib
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


def key_label(vk: str, entry: dict) -> str:
    """As the gateway's logs name a key: never the virtual key itself."""
    return entry.get("name") or f"key-{hashlib.sha256(vk.encode()).hexdigest()[:16]}"


def pick_model(provider: str, entry: dict, chosen: dict[str, str]) -> str:
    if provider in chosen or "" in chosen:
        return chosen.get(provider, chosen.get(""))
    listed = [m for m in entry.get("models") or [] if not any(c in m for c in "*?[")]
    return listed[0] if listed else DEFAULT_MODELS.get(provider, "gpt-4o-mini")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask every virtual key in the keys file to identify itself.")
    parser.add_argument("--model", action="append", default=[], metavar="[PROVIDER=]MODEL",
                        help="the model to ask: for every key, or per provider (repeatable)")
    args = parser.parse_args(argv)
    chosen: dict[str, str] = {}  # provider ("" for every key) -> model
    for text in args.model:
        provider, _, model = text.rpartition("=")
        chosen[provider] = model
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
        model = pick_model(provider, entry, chosen)
        client = openai.OpenAI(base_url=base_url, api_key=vk, max_retries=0, timeout=60)
        label = f"{key_label(vk, entry)} ({provider}, {model})"
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
