"""How a secret is named where it must not appear: masked, fingerprinted, marked, or redacted.

The ground of every place that keeps or shows a request (logs, mitmweb, the ledger, recordings):
none of them may hold a virtual key or a real provider key, so they all name keys the same way
through these functions.
"""

from __future__ import annotations

import hashlib

REDACTED = "REDACTED"  # what a real key header reads once the request has been sent
MARKER = "vkfp:"  # a fingerprint stands in for a client's key in flows and recordings


def mask(secret: str) -> str:
    """sk-abc123456 -> 'sk-...456': enough to tell keys apart, never enough to use one."""
    if len(secret) < 10:
        return "***"
    return f"{secret[:3]}...{secret[-3:]}"


def fingerprint(virtual_key: str) -> str:
    """A stable, non-reversible name for a virtual key (used in logs and recorded flows)."""
    return hashlib.sha256(virtual_key.encode()).hexdigest()[:16]


def mark(value: str) -> str:
    """A key header value -> the same value with the secret replaced by its fingerprint marker."""
    scheme, sep, token = value.partition(" ")
    if sep and token.strip():
        return f"{scheme} {MARKER}{fingerprint(token.strip())}"
    return f"{MARKER}{fingerprint(value.strip())}"


def is_safe(value: str) -> bool:
    """Whether a key header value is already redacted or marked (holds no secret)."""
    return value == REDACTED or value.rpartition(" ")[2].startswith(MARKER)


def hide(value: str) -> str:
    """A secret as flows keep it: its fingerprint marker (a marker or REDACTED stays as it is)."""
    return value if is_safe(value) else mark(value)


def unmark(value: str, virtual_keys: dict[str, str]) -> str:
    """The inverse of mark() for the keys in `virtual_keys` (fingerprint -> key); an unknown
    fingerprint stays marked."""
    head, sep, token = value.rpartition(" ")
    if token.startswith(MARKER) and token[len(MARKER):] in virtual_keys:
        return f"{head}{sep}{virtual_keys[token[len(MARKER):]]}"
    return value
