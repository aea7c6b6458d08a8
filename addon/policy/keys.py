"""The keys file: virtual key -> provider, real provider key and upstream URL.

Format (JSON, or YAML when the file ends in .yaml/.yml):

    {"providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1"}},   # optional
     "prices": {"gpt-4o*": {"input": 2.5, "output": 10}},                 # optional, USD per 1M tokens
     "virtual_keys": {"vk_user1_openai": {"provider": "openai", "api_key": "sk-...",
                                          "base_url": "..."},             # base_url optional
                      "sha256:<hex of the virtual key>": {...}}}          # hashed: file holds no secret

Each entry may carry policy fields (models, rpm, tpm, budget_tokens, budget_usd, budget_period,
expires_at, disabled); see README.md, "Virtual key policy". Unknown fields are rejected: a typo in "budget_usd"
must not silently lift a budget.

Instead of provider/api_key an entry may list `targets` (provider endpoints with weight, fallback,
model_map/model), or name a top-level `"pools": {"name": [targets]}` entry; docs/key-policy.md,
"Several targets per key". Which target serves a request: policy/targets.py.

Everything is validated and precomputed at load time so a request costs one dict lookup.
Error messages name the file and the entry, never a secret.

This module reads the file (a regular file only, within a timeout), and is the check command
(`python -m addon.policy.keys FILE`, run by run.sh before start); policy/keys_parse.py validates
what it holds, policy/virtual_keys.py has what it becomes.
"""

from __future__ import annotations

import json
import os
import stat
import threading

import yaml

from addon.policy.keys_parse import KeysError, parse_keys
from addon.policy.virtual_keys import KeyStore
from addon.wire.secrets import mask


def endpoint_line(base_url: str, reach: str) -> str:
    """The start-up line a user copies from: where to point a client, and what it can reach
    (`KeyStore.summary()`): the gateway's for one process, the fleet supervisor's for HAProxy."""
    return f"gateway: OpenAI-compatible endpoint {base_url}/v1 — {reach}"


KEYS_READ_TIMEOUT = 5.0  # seconds a read of the keys file may take (start-up and reload)


def read_regular_file(path: str) -> bytes:
    """The file's bytes, if it is a regular file. Opened without blocking: a FIFO (or a device)
    at the path is refused at once instead of waiting for a writer that never comes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeysError(
            f"keys file {path} not found (copy keys.example.json to {path} and put real keys in)"
        ) from None
    except OSError as e:
        raise KeysError(f"keys file {path} cannot be read: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KeysError(f"keys file {path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise KeysError(f"keys file {path} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)


def load_keys_with_timeout(path: str, timeout: float = KEYS_READ_TIMEOUT) -> KeyStore:
    """load_keys on a daemon thread: a stuck file system holds the caller `timeout` seconds at
    most (and the thread, if it never returns, does not keep the process from exiting)."""
    result: list = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(load_keys(path))
        except BaseException as e:  # handed to the caller
            result.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="keys file read", daemon=True).start()
    if not done.wait(timeout):
        raise KeysError(f"keys file {path} was not read within {timeout:g}s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def load_keys(path: str) -> KeyStore:
    """Read and validate a keys file; raises KeysError with one clear line."""
    raw = read_regular_file(path)
    try:
        if path.endswith((".yaml", ".yml")):
            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except (ValueError, yaml.YAMLError) as e:
        raise KeysError(
            f"keys file {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}{syntax_error(e)}"
        ) from None
    return parse_keys(data, path)


def syntax_error(e: Exception) -> str:
    """`: Expecting ',' delimiter at line 48, column 5`: the parser's reason and position, never
    the file's text (it could be a key). json's reasons are fixed phrases; a YAML reason is kept
    only when it quotes nothing."""
    if isinstance(e, json.JSONDecodeError):
        return f": {e.msg} at line {e.lineno}, column {e.colno}"
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or ""
    reason = f": {problem}" if problem and "'" not in problem and '"' not in problem else ""
    if mark is not None:
        return f"{reason} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(e, UnicodeDecodeError):
        return f": not UTF-8 text (byte {e.start})"
    return reason

if __name__ == "__main__":  # python -m addon.policy.keys FILE: check a keys file (run.sh does before start)
    import sys

    try:
        store = load_keys(sys.argv[1] if len(sys.argv) > 1 else "keys.json")
    except KeysError as e:
        print(f"gateway: {e}", file=sys.stderr)
        sys.exit(1)
    for vk in store:
        rules = vk.policy.describe()
        if not vk.failover:
            print(
                f"  {vk.name}: {vk.provider} -> {vk.upstream_url} (key {mask(vk.api_key)}){' ' + rules if rules else ''}",
                file=sys.stderr,
            )
            continue
        print(f"  {vk.name}: {len(vk.targets)} targets{' ' + rules if rules else ''}", file=sys.stderr)
        for t in vk.targets:
            role = "fallback" if t.fallback else f"weight {t.weight:g}"
            model = f", model {t.model}" if t.model else (f", model_map {dict(t.model_map)}" if t.model_map else "")
            print(
                f"    {t.display}: {t.provider} -> {t.upstream_url} (key {t.masked_key()}; {role}{model})",
                file=sys.stderr,
            )
