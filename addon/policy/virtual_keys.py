"""A virtual key as the gateway holds it once the keys file is read: its policy (`KeyPolicy`),
the provider endpoints it may send to (`Target`), the most a request for a model may cost over
them (`Bound`), the key itself (`VirtualKey`) and the `KeyStore` a request's key is looked up in.

Built by policy/keys_parse.py from the keys file (policy/keys.py), everything precomputed so a
request costs one dict lookup. A real provider key is only ever placed on the outgoing request:
every repr here masks it.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Mapping, NamedTuple

from addon.guard.config import GuardSet
from addon.providers import azure
from addon.providers.catalog import model_limits
from addon.policy.store import Limits
from addon.wire.secrets import mask
from addon.wire.tokens import Price

MODEL_ANSWERS_KEPT = 4096  # per cache of model-name answers (prices, allowed models)
MODEL_ANSWERS_BYTES = 1 << 20  # and at most this many bytes of model names per cache
MODEL_NAME_CACHED = 256  # longer names are answered, not remembered (4096 x 256 B bounds the glob cache)
BOUNDS_KEPT = 256  # per key: models whose Bound is remembered (names are the client's choice)


@functools.lru_cache(maxsize=MODEL_ANSWERS_KEPT)
def _matches_any(model: str, patterns: tuple[str, ...]) -> bool:
    """Whether a model name matches one of a key's `models` (names or globs), remembered."""
    return any(fnmatchcase(model, pattern) for pattern in patterns)


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
    guardrails: GuardSet | None = None  # the named guardrail set its requests (and answers) pass
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
