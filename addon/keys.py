"""The keys file: virtual key -> provider, real provider key and upstream URL.

Format (JSON, or YAML when the file ends in .yaml/.yml):

    {"providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1"}},   # optional
     "virtual_keys": {"vk_user1_openai": {"provider": "openai", "api_key": "sk-...",
                                          "base_url": "..."}}}            # base_url optional

Everything is validated and precomputed at load time so a request costs one dict lookup.
Error messages name the file and the entry, never a secret.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

import yaml

from addon.providers import PROVIDERS


class KeysError(ValueError):
    """The keys file cannot be used; the message is one line meant for the operator."""


def mask(secret: str) -> str:
    """sk-abc123456 -> 'sk-...456': enough to tell keys apart, never enough to use one."""
    if len(secret) < 10:
        return "***"
    return f"{secret[:3]}...{secret[-3:]}"


def fingerprint(virtual_key: str) -> str:
    """A stable, non-reversible name for a virtual key (used in logs and recorded flows)."""
    return hashlib.sha256(virtual_key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class VirtualKey:
    name: str  # what logs, mitmweb and the usage ledger show: never the secret
    fingerprint: str
    provider: str
    api_key: str  # the real provider key: only ever placed on the outgoing request
    base_url: str
    upstream_url: str  # base_url + the provider's endpoint path

    def __repr__(self) -> str:  # keep the real key out of tracebacks and debug logs
        return (
            f"VirtualKey(name={self.name!r}, provider={self.provider!r}, "
            f"api_key={mask(self.api_key)!r}, upstream_url={self.upstream_url!r})"
        )


class KeyStore:
    def __init__(self, keys: Mapping[str, VirtualKey], source: str = "") -> None:
        self._keys = dict(keys)
        self.source = source

    def lookup(self, presented: str) -> VirtualKey | None:
        return self._keys.get(presented)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys.values())

    def virtual_keys_by_fingerprint(self) -> dict[str, str]:
        """fingerprint -> virtual key: how a recorded flow's marker is resolved on replay."""
        return {vk.fingerprint: presented for presented, vk in self._keys.items()}


def load_keys(path: str) -> KeyStore:
    """Read and validate a keys file; raises KeysError with one clear line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise KeysError(
            f"keys file {path} not found (copy keys.example.json to {path} and put real keys in)"
        ) from None
    except OSError as e:
        raise KeysError(f"keys file {path} cannot be read: {e.strerror}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except (ValueError, yaml.YAMLError) as e:
        # parser messages can quote file content (a key); keep only the position
        where = getattr(e, "lineno", None) or getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" near line {where}" if where else ""
        raise KeysError(f"keys file {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}{at}") from None
    return parse_keys(data, path)


def parse_keys(data: object, source: str = "keys file") -> KeyStore:
    if not isinstance(data, dict):
        raise KeysError(f"{source}: the top level must be an object with \"virtual_keys\"")
    provider_urls = _provider_base_urls(data.get("providers") or {}, source)
    entries = data.get("virtual_keys")
    if not isinstance(entries, dict) or not entries:
        raise KeysError(f"{source}: \"virtual_keys\" must be a non-empty object")
    keys: dict[str, VirtualKey] = {}
    for vk, entry in entries.items():
        keys[vk] = _parse_entry(str(vk), entry, provider_urls, source)
    return KeyStore(keys, source)


def _provider_base_urls(section: object, source: str) -> dict[str, str]:
    if not isinstance(section, dict):
        raise KeysError(f"{source}: \"providers\" must be an object")
    urls = {name: p.default_base_url for name, p in PROVIDERS.items()}
    for name, conf in section.items():
        if name not in PROVIDERS:
            raise KeysError(
                f"{source}: providers.{name}: unknown provider (known: {', '.join(PROVIDERS)})"
            )
        if not isinstance(conf, dict):
            raise KeysError(f"{source}: providers.{name} must be an object")
        if "base_url" in conf:
            urls[name] = _check_url(conf["base_url"], f"{source}: providers.{name}.base_url")
    return urls


def _parse_entry(vk: str, entry: object, provider_urls: dict[str, str], source: str) -> VirtualKey:
    where = f"{source}: virtual key {vk!r}"
    if not isinstance(entry, dict):
        raise KeysError(f"{where} must be an object with \"provider\" and \"api_key\"")
    provider = entry.get("provider")
    if provider not in PROVIDERS:
        raise KeysError(
            f"{where}: unknown provider {provider!r} (known: {', '.join(PROVIDERS)})"
        )
    api_key = entry.get("api_key")
    if not isinstance(api_key, str) or not api_key.strip():
        raise KeysError(f"{where} has no \"api_key\"")
    if api_key.startswith("env:"):
        # keep real keys out of the file: "env:OPENAI_API_KEY" reads the environment
        var = api_key[4:]
        api_key = os.environ.get(var, "")
        if not api_key:
            raise KeysError(f"{where}: api_key names environment variable {var}, which is not set")
    if "base_url" in entry:
        base_url = _check_url(entry["base_url"], f"{where}: base_url")
    else:
        base_url = provider_urls[provider]
    name = entry.get("name") or vk
    return VirtualKey(
        name=str(name),
        fingerprint=fingerprint(vk),
        provider=provider,
        api_key=api_key,
        base_url=base_url,
        upstream_url=base_url + PROVIDERS[provider].endpoint_path,
    )


def _check_url(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise KeysError(f"{where} must be a string URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise KeysError(f"{where}: {value!r} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise KeysError(f"{where}: {value!r} must not have a query or fragment")
    return value.rstrip("/")


if __name__ == "__main__":  # python -m addon.keys FILE: check a keys file (run.sh does before start)
    import sys

    try:
        store = load_keys(sys.argv[1] if len(sys.argv) > 1 else "keys.json")
    except KeysError as e:
        print(f"gateway: {e}", file=sys.stderr)
        sys.exit(1)
    for vk in store:
        print(f"  {vk.name}: {vk.provider} -> {vk.upstream_url} (key {mask(vk.api_key)})", file=sys.stderr)
