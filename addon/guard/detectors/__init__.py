"""The built-in detectors, by the name a keys file uses: adding one is a module here with a
`DETECTOR` (guard/detector.py's interface) and its line below."""

from __future__ import annotations

from importlib import import_module

_MODULES = ("secrets", "private_keys", "credit_cards", "iban", "phones", "emails")


def builtin(name: str):
    """The detector named `name`, its module imported on first use (phones loads libphonenumber's
    metadata: only a keys file that asks for it pays for that); None for an unknown name."""
    if name not in _MODULES:
        return None
    return import_module(f"{__name__}.{name}").DETECTOR


NAMES = _MODULES
