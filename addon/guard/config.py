"""The keys file's named guardrail sets, checked when it is loaded:

    "guardrails": {"default": {"detect": ["secrets", "emails", {"name": "ticket", "regex": "ACME-[0-9]{6}"}],
                               "action": "mask", "responses": "mask"}}

An unknown detector or field, or a custom expression refused by detectors/custom.py, is a
ValueError naming where it is, so a typo never turns a guardrail off."""

from __future__ import annotations

from dataclasses import dataclass

from addon.guard import detectors
from addon.guard.detectors.custom import NAME, compile_custom
from addon.guard.scan import Scanner

ACTIONS = ("mask", "block")
RESPONSES = ("off", "mask")


@dataclass(frozen=True)
class GuardSet:
    name: str
    scanner: Scanner
    action: str  # mask | block: what a match in a request does
    responses: bool  # the provider's answers are masked too

    @property
    def detectors(self) -> tuple[str, ...]:
        return self.scanner.names


def parse_set(name: str, raw: object) -> GuardSet:
    where = f"guardrails.{name}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    unknown = set(raw) - {"detect", "action", "responses"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    detect = raw.get("detect")
    if not isinstance(detect, list) or not detect:
        raise ValueError(f"{where}.detect must be a non-empty list of detectors")
    found, seen = [], set()
    for i, item in enumerate(detect):
        at = f"{where}.detect[{i}]"
        if isinstance(item, str):
            detector = detectors.builtin(item)
            if detector is None:
                raise ValueError(f"{at}: unknown detector {item!r} (known: {', '.join(detectors.NAMES)}, "
                                 "or {\"name\": ..., \"regex\": ...})")
        elif isinstance(item, dict):
            if set(item) != {"name", "regex"}:
                raise ValueError(f"{at}: a custom detector is {{\"name\": ..., \"regex\": ...}}")
            dname = item["name"]
            if not isinstance(dname, str) or not NAME.fullmatch(dname) or dname in detectors.NAMES:
                raise ValueError(f"{at}.name must be lower-case letters, digits and _ (at most 32), "
                                 "and not a built-in detector's name")
            try:
                detector = compile_custom(dname, item["regex"])
            except ValueError as e:
                raise ValueError(f"{at}: {e}") from None
        else:
            raise ValueError(f"{at} must be a detector's name or a custom detector object")
        if detector.name in seen:
            raise ValueError(f"{at}: {detector.name!r} is listed twice")
        seen.add(detector.name)
        found.append(detector)
    action = raw.get("action", "mask")
    if action not in ACTIONS:
        raise ValueError(f"{where}.action must be one of {list(ACTIONS)}")
    responses = raw.get("responses", "off")
    if responses not in RESPONSES:
        raise ValueError(f"{where}.responses must be one of {list(RESPONSES)}")
    return GuardSet(name, Scanner(tuple(found)), action, responses == "mask")


def parse_sets(raw: object) -> dict[str, GuardSet]:
    """The file's top-level "guardrails" object (absent: no sets)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("guardrails must be an object of named sets")
    for name in raw:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"guardrails: set name {name!r} must be lower-case letters, digits and _")
    return {name: parse_set(name, value) for name, value in raw.items()}
