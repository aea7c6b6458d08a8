"""Masking text with a set of detectors: every span found is replaced by `[REDACTED:<detector>]`.
Overlapping spans become one, named for the detector whose span starts first (on a tie, the one
listed first in the set). Counts are kept by detector; the matched text is never kept."""

from __future__ import annotations

from collections.abc import Sequence

from addon.guard.detector import View

MARK = "[REDACTED:{}]"
class Scanner:
    __slots__ = ("detectors", "names", "max_len", "marks")

    def __init__(self, detectors: Sequence) -> None:
        self.detectors = tuple(detectors)
        self.names = tuple(d.name for d in self.detectors)
        self.max_len = max((d.max_len for d in self.detectors), default=0)
        self.marks = {d.name: MARK.format(d.name) for d in self.detectors}

    def pending(self, text: str, start: int) -> int:
        """Where a match may still be growing at the end of `text` (at or after `start`)."""
        first = len(text)
        for d in self.detectors:
            at = d.pending(text, start)
            if at < first:
                first = at
        return first

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """Merged, ordered, non-overlapping (start, end, detector)."""
        found = []
        view = View(text)
        for rank, d in enumerate(self.detectors):
            for start, end in d.find(text, view):
                found.append((start, rank, end, d.name))
        if not found:
            return found
        found.sort()
        merged = []
        for start, _, end, name in found:
            if merged and start < merged[-1][1]:
                last = merged[-1]
                if end > last[1]:
                    merged[-1] = (last[0], end, last[2])
                continue
            merged.append((start, end, name))
        return merged

    def mask(self, text: str, counts: dict[str, int] | None = None) -> str | None:
        """`text` masked, or None when nothing was found; each match counted into `counts`."""
        spans = self.spans(text)
        if not spans:
            return None
        return self.apply(text, spans, counts)

    def apply(self, text: str, spans, counts: dict[str, int] | None) -> str:
        out = []
        pos = 0
        for start, end, name in spans:
            out.append(text[pos:start])
            out.append(self.marks.get(name) or MARK.format(name))
            pos = end
            if counts is not None:
                counts[name] = counts.get(name, 0) + 1
        out.append(text[pos:])
        return "".join(out)


def header_value(counts: dict[str, int], blocked: Sequence[str] = ()) -> str:
    """`x-gateway-guardrails`: `masked=secrets:2,emails:1` or `blocked=credit_cards`."""
    if blocked:
        return "blocked=" + ",".join(blocked)
    return "masked=" + ",".join(f"{name}:{n}" for name, n in sorted(counts.items()))


class Outcome:
    """What a guardrail set found in one body: counts by detector, and where (place, detectors)."""

    __slots__ = ("counts", "places")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.places: list[tuple[str, tuple[str, ...]]] = []

    def __bool__(self) -> bool:
        return bool(self.counts)

    @property
    def detectors(self) -> tuple[str, ...]:
        return tuple(sorted(self.counts))


def guard_body(scanner: Scanner, places, mask: bool) -> Outcome:
    """Scan each (place, holder, key) string; with `mask`, replace it masked in its holder."""
    outcome = Outcome()
    for where, holder, key in places:
        text = holder[key]
        spans = scanner.spans(text)
        if not spans:
            continue
        outcome.places.append((where, tuple(sorted({s[2] for s in spans}))))
        masked = scanner.apply(text, spans, outcome.counts)
        if mask:
            holder[key] = masked
    return outcome
