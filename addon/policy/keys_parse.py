"""Validating a keys file's data into a KeyStore: `parse_keys`, with the parsers of its parts
(the providers section's defaults, pools, each entry: its endpoint or targets, its policy fields;
prices) and the checks of each value.

The format is policy/keys.py's docstring. Unknown fields are rejected (a typo in "budget_usd"
must not silently lift a budget); an error is a KeysError of one line that names the file and
the entry, never a secret.
"""

from __future__ import annotations

import math
import os
import re
from datetime import date, datetime, timezone
from typing import Mapping
from urllib.parse import urlsplit

from addon.guard.config import GuardSet, parse_sets
from addon.providers import azure
from addon.providers.catalog import CATALOG
from addon.policy.store import MAX_BUDGET_PERIOD
from addon.policy.virtual_keys import NO_POLICY, KeyPolicy, KeyStore, Target, VirtualKey
from addon.wire.secrets import fingerprint, mask
from addon.wire.tokens import Price


class KeysError(ValueError):
    """The keys file cannot be used; the message is one line meant for the operator."""


HASHED_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_POOL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PERIOD = re.compile(r"([1-9][0-9]*)([hd])")
_PERIOD_SECONDS = {"h": 3600, "d": 86400}
ENDPOINT_FIELDS = frozenset({"provider", "api_key", "base_url"}) | azure.FIELDS  # where and with which real key
BASE_FIELDS = ENDPOINT_FIELDS | {"name", "targets", "guardrails"}
TARGET_FIELDS = ENDPOINT_FIELDS | {"weight", "fallback", "model_map", "model", "max_output_tokens"}
POLICY_FIELDS = frozenset(
    {
        "models",
        "rpm",
        "tpm",
        "budget_tokens",
        "budget_usd",
        "budget_period",
        "expires_at",
        "disabled",
        "max_parallel",
        "max_output_tokens",
    }
)


def parse_keys(data: object, source: str = "keys file") -> KeyStore:
    if not isinstance(data, dict):
        raise KeysError(f"{source}: the top level must be an object with \"virtual_keys\"")
    provider_urls = _provider_defaults(data.get("providers") or {}, source)
    entries = data.get("virtual_keys")
    if not isinstance(entries, dict) or not entries:
        raise KeysError(f"{source}: \"virtual_keys\" must be a non-empty object")
    prices = _parse_prices(data.get("prices") or {}, source)
    pools = _parse_pools(data.get("pools", {}), provider_urls, source)
    try:
        guardrails = parse_sets(data.get("guardrails"))
    except ValueError as e:
        raise KeysError(f"{source}: {e}") from None
    keys: dict[str, VirtualKey] = {}
    hashed: dict[str, VirtualKey] = {}
    for vk, entry in entries.items():
        vk = str(vk)
        if vk.startswith(HASHED_PREFIX):
            digest = vk[len(HASHED_PREFIX):].lower()
            if not _HEX64.fullmatch(digest):
                raise KeysError(f'{source}: virtual key {vk[:20]!r}...: a hashed key must be "sha256:" + 64 hex digits')
            hashed[digest] = _parse_entry(vk, entry, provider_urls, source, digest=digest, pools=pools,
                                          guardrails=guardrails)
        else:
            keys[vk] = _parse_entry(vk, entry, provider_urls, source, pools=pools, guardrails=guardrails)
    return KeyStore(keys, source, hashed, prices)


def _parse_prices(section: object, source: str) -> dict[str, Price]:
    if not isinstance(section, dict):
        raise KeysError(f"{source}: \"prices\" must be an object of model -> {{\"input\", \"output\"}}")
    prices: dict[str, Price] = {}
    for model, conf in section.items():
        where = f"{source}: prices.{model}"
        if not isinstance(conf, dict) or not {"input", "output"} <= conf.keys():
            raise KeysError(f"{where} must be an object with \"input\" and \"output\" (USD per million tokens)")
        unknown = conf.keys() - {"input", "output", "cached_input"}
        if unknown:
            raise KeysError(f"{where}: unknown field {sorted(unknown)[0]!r} (known: input, output, cached_input)")
        values = {name: _number(conf[name], f"{where}.{name}", allow_zero=True) for name in conf}
        prices[str(model)] = Price(**values)
    return prices


def _provider_defaults(section: object, source: str) -> dict[str, dict]:
    """providers.<name> entries: defaults (base_url; azure's endpoint, deployment(s),
    api_version) for every key of that provider that does not set its own."""
    if not isinstance(section, dict):
        raise KeysError(f"{source}: \"providers\" must be an object")
    defaults: dict[str, dict] = {name: {} for name in CATALOG}
    for name, conf in section.items():
        if name not in CATALOG:
            raise KeysError(
                f"{source}: providers.{name}: unknown provider (known: {', '.join(CATALOG)})"
            )
        if not isinstance(conf, dict):
            raise KeysError(f"{source}: providers.{name} must be an object")
        allowed = azure.FIELDS if name == "azure" else {"base_url"}
        unknown = conf.keys() - allowed
        if unknown:
            raise KeysError(
                f"{source}: providers.{name}: unknown field {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(allowed))})"
            )
        if "base_url" in conf:
            _check_url(conf["base_url"], f"{source}: providers.{name}.base_url")
        defaults[name] = dict(conf)
    return defaults


def _parse_entry(vk: str, entry: object, defaults: dict[str, dict], source: str, digest: str | None = None,
                 pools: Mapping[str, tuple[Target, ...]] | None = None,
                 guardrails: Mapping[str, GuardSet] | None = None) -> VirtualKey:
    # a hashed entry's fingerprint is the same as the plain key's would be, so spend carries over
    # when a key is moved from plain to hashed
    key_fingerprint = digest[:16] if digest else fingerprint(vk)
    # messages name the entry by its "name", else masked: the virtual key itself is a client's secret
    label = entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else None
    where = f"{source}: virtual key {label or (vk[:15] + '...' if digest else mask(vk))!r}"
    if not isinstance(entry, dict):
        raise KeysError(f"{where} must be an object with \"provider\" and \"api_key\"")
    unknown = entry.keys() - BASE_FIELDS - POLICY_FIELDS
    if unknown:
        raise KeysError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    # the virtual key is the client's secret: without a "name" the key is known by its fingerprint
    name = entry.get("name") or f"key-{key_fingerprint}"
    if "targets" in entry:
        both = entry.keys() & ENDPOINT_FIELDS
        if both:
            raise KeysError(f"{where}: \"targets\" and \"{sorted(both)[0]}\" exclude each other "
                            f"(provider, api_key, base_url and azure fields go on each target)")
        targets = _key_targets(entry["targets"], defaults, where, pools or {})
        first = targets[next(i for i, t in enumerate(targets) if not t.fallback)]
    else:
        first = _parse_endpoint(entry, defaults, where)
        targets = (first,)
    guard = None
    if "guardrails" in entry:
        named = entry["guardrails"]
        guard = (guardrails or {}).get(named) if isinstance(named, str) else None
        if guard is None:
            known = ", ".join(sorted(guardrails or {})) or "none defined"
            raise KeysError(f"{where}: guardrails must name a set of the top-level \"guardrails\" ({known})")
    return VirtualKey(
        name=str(name),
        fingerprint=key_fingerprint,
        provider=first.provider,
        api_key=first.api_key,
        base_url=first.base_url,
        upstream_url=first.upstream_url,
        policy=_parse_policy(entry, where),
        azure=first.azure,
        targets=targets,
        failover="targets" in entry,
        guardrails=guard,
    )


def _parse_endpoint(fields: dict, defaults: dict[str, dict], where: str, **extra) -> Target:
    """provider, api_key (or env:VAR), base_url / azure fields, with the `providers` section's
    defaults: the one parser of a provider endpoint, for a classic key and for each target."""
    provider = fields.get("provider")
    if provider not in CATALOG:
        raise KeysError(
            f"{where}: unknown provider {provider!r} (known: {', '.join(CATALOG)})"
        )
    info = CATALOG[provider]
    api_key = fields.get("api_key")
    if api_key is None and info.key_optional:
        api_key = ""  # a local server (ollama): no key header is sent
    elif not isinstance(api_key, str) or not api_key.strip():
        raise KeysError(f"{where} has no \"api_key\"")
    if api_key.startswith("env:"):
        # keep real keys out of the file: "env:OPENAI_API_KEY" reads the environment
        var = api_key[4:]
        api_key = os.environ.get(var, "")
        if not api_key:
            raise KeysError(f"{where}: api_key names environment variable {var}, which is not set")
    target = None
    if provider == "azure":
        if "base_url" in fields:
            raise KeysError(f"{where}: provider azure takes \"endpoint\" (the resource URL), not base_url")
        target = azure.parse_target({**defaults["azure"], **fields}, where, KeysError)
        base_url, upstream_url = target.endpoint, target.display_url(info.endpoint_path)
    else:
        azure_only = fields.keys() & azure.FIELDS
        if azure_only:
            raise KeysError(f"{where}: {sorted(azure_only)[0]} is for provider azure only")
        if "base_url" in fields:
            base_url = _check_url(fields["base_url"], f"{where}: base_url")
        else:
            base_url = defaults[provider].get("base_url", info.default_base_url).rstrip("/")
        if not base_url:
            raise KeysError(f"{where}: provider {provider} has no default URL: set \"base_url\" "
                            f"(on the key, or in providers.{provider})")
        upstream_url = base_url + info.endpoint_path
    return Target(provider, api_key, base_url, upstream_url, target, **extra)


def _key_targets(value: object, defaults: dict[str, dict], where: str,
                 pools: Mapping[str, tuple[Target, ...]]) -> tuple[Target, ...]:
    """A key's `targets`: its own list, or the name of a pool (whose Target objects it shares)."""
    if isinstance(value, str):
        if value not in pools:
            known = f" (pools: {', '.join(pools)})" if pools else " (the file has no \"pools\")"
            raise KeysError(f"{where}: targets names pool {value!r}, which does not exist{known}")
        return pools[value]
    return _parse_targets(value, defaults, f"{where}: targets", "{}")


def _parse_targets(value: object, defaults: dict[str, dict], where: str, labels: str) -> tuple[Target, ...]:
    """A non-empty list of target objects with at least one primary; `labels` formats the index."""
    if not isinstance(value, list) or not value:
        raise KeysError(f"{where} must be a non-empty list of targets (objects with \"provider\" and \"api_key\"), "
                        f"or the name of a pool")
    targets = tuple(_parse_target(conf, defaults, f"{where}[{i}]", labels.format(i)) for i, conf in enumerate(value))
    if all(t.fallback for t in targets):
        raise KeysError(f"{where}: every target is a fallback; at least one must be a primary (no \"fallback\": true)")
    return targets


def _parse_target(conf: object, defaults: dict[str, dict], where: str, label: str) -> Target:
    if not isinstance(conf, dict):
        raise KeysError(f"{where} must be an object with \"provider\" and \"api_key\"")
    unknown = conf.keys() - TARGET_FIELDS
    if unknown:
        raise KeysError(f"{where}: unknown field {sorted(unknown)[0]!r} "
                        f"(a target takes {', '.join(sorted(TARGET_FIELDS - azure.FIELDS))} and azure's fields; "
                        f"policy fields go on the key)")
    fallback = conf.get("fallback", False)
    if not isinstance(fallback, bool):
        raise KeysError(f"{where}: fallback must be true or false")
    weight = 1.0
    if "weight" in conf:
        if fallback:
            raise KeysError(f"{where}: a fallback has no weight (fallbacks are tried in file order)")
        weight = _number(conf["weight"], f"{where}: weight")
        if not math.isfinite(weight):
            raise KeysError(f"{where}: weight must be a positive number")
    if "model" in conf and "model_map" in conf:
        raise KeysError(f"{where}: model and model_map exclude each other (model: every request; "
                        f"model_map: requested model -> served model)")
    model = conf.get("model")
    if model is not None and not (isinstance(model, str) and model):
        raise KeysError(f"{where}: model must be a model name")
    model_map = conf.get("model_map", {})
    if not isinstance(model_map, dict) or not all(isinstance(a, str) and a and isinstance(b, str) and b
                                                  for a, b in model_map.items()):
        raise KeysError(f"{where}: model_map must map requested model names to served model names")
    return _parse_endpoint(conf, defaults, where, weight=weight, fallback=fallback,
                           model_map=tuple(model_map.items()), model=model, label=label,
                           max_output_tokens=_optional_int(conf, "max_output_tokens", where))


def _parse_pools(section: object, defaults: dict[str, dict], source: str) -> dict[str, tuple[Target, ...]]:
    """Top-level `pools`: name -> targets, shared by every key that names it. Validated whether
    or not a key uses it."""
    if not isinstance(section, dict):
        raise KeysError(f"{source}: \"pools\" must be an object of pool name -> list of targets")
    pools = {}
    for name, targets in section.items():
        if not isinstance(name, str) or not _POOL_NAME.fullmatch(name):
            raise KeysError(f"{source}: pool name {str(name)[:40]!r} must be 1 to 64 letters, digits or . _ -")
        pools[name] = _parse_targets(targets, defaults, f"{source}: pools.{name}", name + "[{}]")
    return pools


def _parse_policy(entry: dict, where: str) -> KeyPolicy:
    if not POLICY_FIELDS & entry.keys():
        return NO_POLICY
    models = entry.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise KeysError(f"{where}: models must be a list of model names (\"*\" globs allowed)")
        models = tuple(models)
    period = period_text = entry.get("budget_period")
    if period is not None:
        m = _PERIOD.fullmatch(period) if isinstance(period, str) else None
        if m is None:
            raise KeysError(f"{where}: budget_period must look like \"12h\", \"1d\" or \"30d\" (absent = lifetime)")
        period = int(m.group(1)) * _PERIOD_SECONDS[m.group(2)]
        if period > MAX_BUDGET_PERIOD:
            raise KeysError(f"{where}: budget_period can be at most 366d (absent = lifetime)")
        if "budget_tokens" not in entry and "budget_usd" not in entry:
            raise KeysError(f"{where}: budget_period needs budget_tokens or budget_usd")
    disabled = entry.get("disabled", False)
    if not isinstance(disabled, bool):
        raise KeysError(f"{where}: disabled must be true or false")
    return KeyPolicy(
        models=models,
        rpm=_optional_int(entry, "rpm", where),
        tpm=_optional_int(entry, "tpm", where),
        budget_tokens=_optional_int(entry, "budget_tokens", where),
        budget_usd=_number(entry["budget_usd"], f"{where}: budget_usd") if "budget_usd" in entry else None,
        budget_period=period,
        period_text=period_text,
        expires_at=_timestamp(entry["expires_at"], f"{where}: expires_at") if "expires_at" in entry else None,
        disabled=disabled,
        max_parallel=_optional_int(entry, "max_parallel", where),
        max_output_tokens=_optional_int(entry, "max_output_tokens", where),
    )


def _optional_int(entry: dict, name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KeysError(f"{where}: {name} must be a positive whole number")
    return value


def _number(value: object, where: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise KeysError(f"{where} must be a {'non-negative' if allow_zero else 'positive'} number")
    return float(value)


def _timestamp(value: object, where: str) -> float:
    """ISO 8601; a time without a zone is UTC, a date is its first second (UTC). YAML reads an
    unquoted `2027-01-01` as a date and `2027-01-01T00:00:00Z` as a datetime, not strings."""
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    try:
        when = (
            value if isinstance(value, datetime) else datetime.fromisoformat(value) if isinstance(value, str) else None
        )
    except ValueError:
        when = None
    if when is None:
        raise KeysError(f"{where} must be an ISO 8601 time such as \"2026-12-31T23:59:59Z\"")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _check_url(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise KeysError(f"{where} must be a string URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise KeysError(f"{where}: {value!r} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise KeysError(f"{where}: {value!r} must not have a query or fragment")
    return value.rstrip("/")
