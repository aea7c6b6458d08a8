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
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import stat
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Mapping, NamedTuple
from urllib.parse import urlsplit

import yaml

from addon.providers import azure
from addon.providers.catalog import CATALOG, model_limits
from addon.policy.store import MAX_BUDGET_PERIOD, Limits
from addon.wire.secrets import fingerprint, mask
from addon.wire.tokens import Price


class KeysError(ValueError):
    """The keys file cannot be used; the message is one line meant for the operator."""


MODEL_ANSWERS_KEPT = 4096  # per cache of model-name answers (prices, allowed models)
MODEL_ANSWERS_BYTES = 1 << 20  # and at most this many bytes of model names per cache
MODEL_NAME_CACHED = 256  # longer names are answered, not remembered (4096 x 256 B bounds the glob cache)


@functools.lru_cache(maxsize=MODEL_ANSWERS_KEPT)
def _matches_any(model: str, patterns: tuple[str, ...]) -> bool:
    """Whether a model name matches one of a key's `models` (names or globs), remembered."""
    return any(fnmatchcase(model, pattern) for pattern in patterns)


HASHED_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_POOL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PERIOD = re.compile(r"([1-9][0-9]*)([hd])")
_PERIOD_SECONDS = {"h": 3600, "d": 86400}
ENDPOINT_FIELDS = frozenset({"provider", "api_key", "base_url"}) | azure.FIELDS  # where and with which real key
BASE_FIELDS = ENDPOINT_FIELDS | {"name", "targets"}
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
BOUNDS_KEPT = 256  # per key: models whose Bound is remembered (names are the client's choice)


@dataclass(frozen=True)
class KeyPolicy:
    """What a virtual key may do; None means no limit of that kind."""

    models: tuple[str, ...] | None = None  # allowed model names, `*` globs allowed
    rpm: int | None = None
    tpm: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: int | None = None  # seconds of the rolling budget window; None = lifetime
    expires_at: float | None = None  # unix time
    disabled: bool = False
    period_text: str | None = field(default=None, compare=False)  # budget_period as written ("30d")
    max_parallel: int | None = None  # requests in flight at once, across every gateway sharing the store
    # the most output tokens one answer may have: sent to the provider when a request names no
    # maximum, a larger maximum lowered to it (a target may set its own)
    max_output_tokens: int | None = None

    def allows_model(self, model: str) -> bool:
        if self.models is None:
            return True
        if len(model) > MODEL_NAME_CACHED:  # not remembered: the cache stays bounded in bytes
            return _matches_any.__wrapped__(model, self.models)
        return _matches_any(model, self.models)

    def describe(self) -> str:
        """One line for the operator: '[models gpt-4o,o3; rpm 60; budget $25/30d]'."""
        parts = []
        if self.disabled:
            parts.append("DISABLED")
        if self.models is not None:
            parts.append("models " + ",".join(self.models))
        parts += [
            f"{name} {value}"
            for name, value in (
                ("rpm", self.rpm),
                ("tpm", self.tpm),
                ("max_parallel", self.max_parallel),
                ("max_output_tokens", self.max_output_tokens),
            )
            if value is not None
        ]
        period = f"/{self.period_text or f'{self.budget_period // 3600}h'}" if self.budget_period else ""
        if self.budget_tokens is not None:
            parts.append(f"budget {self.budget_tokens} tokens{period}")
        if self.budget_usd is not None:
            parts.append(f"budget ${self.budget_usd:g}{period}")
        if self.expires_at is not None:
            parts.append(
                "expires " + datetime.fromtimestamp(self.expires_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            )
        return f"[{'; '.join(parts)}]" if parts else ""

    @property
    def has_budget(self) -> bool:
        return self.budget_tokens is not None or self.budget_usd is not None

    @cached_property
    def limits(self) -> Limits | None:
        """What the usage store enforces for this key; None: nothing (the store is not asked)."""
        limits = Limits(self.rpm, self.tpm, self.budget_tokens, self.budget_usd, self.budget_period, self.max_parallel)
        return None if limits == NO_LIMITS else limits

    @cached_property
    def request_limits(self) -> Limits | None:
        """What a request that names no model (a stored response's GET, DELETE, cancel) is held
        to: rpm and max_parallel, not budgets or tpm (it costs nothing)."""
        limits = Limits(rpm=self.rpm, max_parallel=self.max_parallel)
        return None if limits == NO_LIMITS else limits


NO_POLICY = KeyPolicy()
NO_LIMITS = Limits()


class Bound(NamedTuple):
    """The most a request for one model may cost, over every target its key may send it to (a
    retry may go to any): what policy/worstcase.py holds for it."""

    output: int  # output tokens per answer when the request names no maximum (what is sent, or the model's most)
    cap: int | None  # a larger maximum the request names is lowered to this; None: some target has no cap
    context: int  # the largest context window: no input is billed more
    image: int  # input tokens one image costs at most (0: no rule, its bytes count)


def target_id(provider: str, base_url: str, api_key: str) -> str:
    """A target's stable cooldown name: the same real key at the same URL has the same id,
    whichever virtual key or pool lists it (a key revoked at the provider is skipped by all)."""
    return hashlib.sha256(f"{provider}\0{base_url}\0{api_key}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Target:
    """One provider endpoint a virtual key's requests can go to, with its real key."""

    provider: str
    api_key: str  # the real provider key: only ever placed on the outgoing request
    base_url: str
    upstream_url: str  # base_url + the provider's chat endpoint path
    azure: azure.AzureTarget | None = None
    weight: float = 1.0  # share among the primaries
    fallback: bool = False  # tried in file order, only when no primary can serve
    model_map: tuple[tuple[str, str], ...] = ()  # requested model -> model served by this target
    model: str | None = None  # every request is served as this model
    label: str = "0"  # what ledger, mitmweb and logs name it by: "1" (index in the key's list) or "pool[1]"
    max_output_tokens: int | None = None  # this target's own cap (else the key's)
    id: str = ""  # cooldown name (target_id); filled in when left empty
    _map: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", target_id(self.provider, self.base_url, self.api_key))
        object.__setattr__(self, "_map", dict(self.model_map))

    def served_model(self, requested: str) -> str:
        """The model this target is asked for when the client asked for `requested`."""
        if self.model is not None:
            return self.model
        if self._map:
            return self._map.get(requested, requested)
        return requested

    def masked_key(self) -> str:
        return mask(self.api_key)

    @property
    def display(self) -> str:
        """How logs name it: 'anthropic[2]' (the key's own list) or 'openai-main[1]' (a pool's)."""
        return f"{self.provider}[{self.label}]" if self.label.isdigit() else self.label

    def __repr__(self) -> str:  # keep the real key out of tracebacks and debug logs
        return (f"Target(label={self.label!r}, provider={self.provider!r}, api_key={self.masked_key()!r}, "
                f"upstream_url={self.upstream_url!r}, weight={self.weight:g}, fallback={self.fallback})")


@dataclass(frozen=True)
class VirtualKey:
    name: str  # what logs, mitmweb and the usage ledger show: never the secret
    fingerprint: str
    provider: str  # provider ... azure: a classic key's own; with targets, the first primary's
    api_key: str  # the real provider key: only ever placed on the outgoing request
    base_url: str
    upstream_url: str  # base_url + the provider's endpoint path
    policy: KeyPolicy = field(default=NO_POLICY)
    azure: azure.AzureTarget | None = None  # provider azure: endpoint, deployments, api_version
    # where requests may go: a classic key has one target, built from the fields above
    targets: tuple[Target, ...] = ()
    failover: bool = False  # True for a key with `targets`: cooldowns and retries apply
    # precomputed for policy/targets.py's pick(): indices of the primaries with their cumulative
    # weights, and of the fallbacks in file order
    primaries: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)
    cumulative: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)
    fallbacks: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)
    # model -> Bound, remembered (bounded): what a budget or tpm holds for a request (policy/worstcase.py)
    _bounds: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        targets = self.targets
        if not targets:
            targets = (Target(self.provider, self.api_key, self.base_url, self.upstream_url, self.azure),)
            object.__setattr__(self, "targets", targets)
        primaries = tuple(i for i, t in enumerate(targets) if not t.fallback)
        total, cumulative = 0.0, []
        for i in primaries:
            total += targets[i].weight
            cumulative.append(total)
        object.__setattr__(self, "primaries", primaries)
        object.__setattr__(self, "cumulative", tuple(cumulative))
        object.__setattr__(self, "fallbacks", tuple(i for i, t in enumerate(targets) if t.fallback))

    def output_cap(self, target: Target, model: str) -> int | None:
        """The maximum output sent to `target` for a request for `model` that names none (and
        that a larger one is lowered to): its max_output_tokens, else the key's, at most the
        served model's own (a provider refuses a larger maximum). None: no cap, nothing sent."""
        cap = target.max_output_tokens or self.policy.max_output_tokens
        if cap is None:
            return None
        return min(cap, model_limits(target.provider, target.served_model(model)).max_output)

    def bound(self, model: str) -> Bound:
        """The Bound of a request for `model` over this key's targets (remembered per model)."""
        bounds = self._bounds
        found = bounds.get(model)
        if found is not None:
            return found
        output = context = image = 0
        cap: int | None = 0
        for target in self.targets:
            limits = model_limits(target.provider, target.served_model(model))
            sent = self.output_cap(target, model)
            output = max(output, limits.max_output if sent is None else sent)
            context, image = max(context, limits.context), max(image, limits.image)
            if cap is not None:
                own = target.max_output_tokens or self.policy.max_output_tokens
                cap = None if own is None else max(cap, own)
        found = Bound(output, cap, context, image)
        if len(bounds) >= BOUNDS_KEPT:
            bounds.clear()
        bounds[model] = found
        return found

    def __repr__(self) -> str:  # keep the real key out of tracebacks and debug logs
        return (
            f"VirtualKey(name={self.name!r}, provider={self.provider!r}, "
            f"api_key={mask(self.api_key)!r}, upstream_url={self.upstream_url!r}"
            + (f", targets={len(self.targets)})" if self.failover else ")")
        )


class KeyStore:
    def __init__(
        self,
        keys: Mapping[str, VirtualKey],
        source: str = "",
        hashed: Mapping[str, VirtualKey] | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        self._keys = dict(keys)
        self._hashed = dict(hashed or {})  # sha256 hex of the virtual key -> key
        self.prices = dict(prices or {})  # model name or glob -> price
        self.source = source
        # model -> price answers: a glob walk costs ~0.3 us per pattern, per request. The store
        # is replaced whole on reload, and so is this cache.
        self._price_of: dict[str, Price | None] = {}
        self._price_bytes = 0  # model-name bytes held by _price_of
        self._by_fingerprint = {vk.fingerprint: vk for vk in (*self._keys.values(), *self._hashed.values())}

    def lookup(self, presented: str) -> VirtualKey | None:
        key = self._keys.get(presented)
        if key is None and self._hashed:
            key = self._hashed.get(hashlib.sha256(presented.encode()).hexdigest())
        return key

    def by_fingerprint(self, fp: str) -> VirtualKey | None:
        """The key whose headers were screened (the flow keeps only its fingerprint)."""
        return self._by_fingerprint.get(fp)

    def price(self, model: str) -> Price | None:
        """Exact model name first, then the first glob that matches (in file order)."""
        try:
            return self._price_of[model]
        except KeyError:
            pass
        price = self.prices.get(model)
        if price is None:
            price = next((p for pattern, p in self.prices.items() if fnmatchcase(model, pattern)), None)
        # clients choose model names: stay bounded in entries and in bytes
        if len(self._price_of) >= MODEL_ANSWERS_KEPT or self._price_bytes + len(model) > MODEL_ANSWERS_BYTES:
            self._price_of.clear()
            self._price_bytes = 0
        self._price_of[model] = price
        self._price_bytes += len(model)
        return price

    def __len__(self) -> int:
        return len(self._keys) + len(self._hashed)

    def secrets(self):
        """Every secret this store knows in clear: the virtual keys (not hashed ones) and the
        real provider keys. For the log redaction (hooks/logredact.py) only."""
        yield from self._keys
        for key in (*self._keys.values(), *self._hashed.values()):
            for target in key.targets:
                yield target.api_key

    def __iter__(self):
        yield from self._keys.values()
        yield from self._hashed.values()

    def summary(self) -> str:
        """`4 virtual keys (openai 2, anthropic 1, deepseek 1)`"""
        per_provider = Counter(vk.provider for vk in self)
        counts = ", ".join(f"{name} {n}" for name, n in per_provider.most_common())
        return f"{len(self)} virtual key{'s' if len(self) != 1 else ''} ({counts})"

    def virtual_keys_by_fingerprint(self) -> dict[str, str]:
        """fingerprint -> virtual key: how a recorded flow's marker is resolved on replay."""
        return {vk.fingerprint: presented for presented, vk in self._keys.items()}


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


def parse_keys(data: object, source: str = "keys file") -> KeyStore:
    if not isinstance(data, dict):
        raise KeysError(f"{source}: the top level must be an object with \"virtual_keys\"")
    provider_urls = _provider_defaults(data.get("providers") or {}, source)
    entries = data.get("virtual_keys")
    if not isinstance(entries, dict) or not entries:
        raise KeysError(f"{source}: \"virtual_keys\" must be a non-empty object")
    prices = _parse_prices(data.get("prices") or {}, source)
    pools = _parse_pools(data.get("pools", {}), provider_urls, source)
    keys: dict[str, VirtualKey] = {}
    hashed: dict[str, VirtualKey] = {}
    for vk, entry in entries.items():
        vk = str(vk)
        if vk.startswith(HASHED_PREFIX):
            digest = vk[len(HASHED_PREFIX):].lower()
            if not _HEX64.fullmatch(digest):
                raise KeysError(f'{source}: virtual key {vk[:20]!r}...: a hashed key must be "sha256:" + 64 hex digits')
            hashed[digest] = _parse_entry(vk, entry, provider_urls, source, digest=digest, pools=pools)
        else:
            keys[vk] = _parse_entry(vk, entry, provider_urls, source, pools=pools)
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
                 pools: Mapping[str, tuple[Target, ...]] | None = None) -> VirtualKey:
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
