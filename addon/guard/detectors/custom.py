"""Named custom regular expressions from the keys file. One that cannot be compiled, can match
empty text, or can backtrack catastrophically is refused when the file is loaded: a repeat inside
a repeat (`(a+)+`, `(\\w+\\s?)*`), or a repeat of alternatives that can start alike (`(a|ab)+`).
Python's engine backtracks, and these turn one long request into seconds of CPU for every key."""

from __future__ import annotations

import re
from re import _constants as C  # noqa: N812  (the node kinds of re's own parser)
from re import _parser

from addon.guard.detector import Pattern, PatternDetector

NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_REPEATS = {C.MAX_REPEAT, C.MIN_REPEAT}
_UNBOUNDED_CAP = 256  # the longest text an unbounded custom match is held back for, in a stream


def _first(items) -> set | None:
    """The characters an item sequence can start with; None when that is not simply known."""
    if not items:
        return None
    op, av = items[0]
    if op is C.LITERAL:
        return {av}
    if op is C.IN and all(o is C.LITERAL for o, _ in av):
        return {a for _, a in av}
    if op is C.SUBPATTERN:
        return _first(list(av[3]))
    return None


def _hazard(items, outer: int) -> str | None:
    """Why `items` can backtrack catastrophically inside repeats that allow up to `outer`
    passes (1: none), or None. A repeat of variable length inside another is the danger (the
    text splits between their passes in exponentially many ways) unless both are bounded small,
    like `(\\d{1,3}\\.){3}`; a fixed one (`([A-Z]{2}-){2}`) is not."""
    for op, av in items:
        if op in _REPEATS:
            lo, hi, body = av
            if outer > 1 and hi > lo and (hi == C.MAXREPEAT or outer == C.MAXREPEAT or outer * hi > 100):
                return "a repeat inside a repeat"
            inner = outer if hi <= 1 else (C.MAXREPEAT if C.MAXREPEAT in (hi, outer) else min(outer * hi, C.MAXREPEAT))
            found = _hazard(list(body), inner)
            if found:
                return found
        elif op in (C.POSSESSIVE_REPEAT, C.ATOMIC_GROUP):
            continue  # never gives back what it took
        elif op is C.SUBPATTERN:
            found = _hazard(list(av[3]), outer)
            if found:
                return found
        elif op is C.BRANCH:
            branches = av[1]
            if outer > 1:
                seen: set = set()
                for b in branches:
                    first = _first(list(b))
                    if first is None or first & seen:
                        return "a repeat of alternatives that can start alike"
                    seen |= first
            for b in branches:
                found = _hazard(list(b), outer)
                if found:
                    return found
        elif op in (C.ASSERT, C.ASSERT_NOT):
            found = _hazard(list(av[1]), outer)
            if found:
                return found
        elif op is C.GROUPREF_EXISTS:
            return "a conditional group"
    return None


def compile_custom(name: str, source: str) -> PatternDetector:
    """The detector for a custom expression, or ValueError saying why it is refused."""
    if not isinstance(source, str) or not source or len(source) > 1000:
        raise ValueError("regex must be a non-empty string of at most 1000 characters")
    try:
        parsed = _parser.parse(source)
        compiled = re.compile(source)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"regex does not compile: {e}") from None
    if compiled.groups and any(ch == "\\" for ch in source) and re.search(r"\\[1-9]", source):
        raise ValueError("regex may not refer back to a group")
    hazard = _hazard(list(parsed), 1)
    if hazard:
        raise ValueError(f"regex can backtrack catastrophically ({hazard}): bound or flatten it")
    if compiled.search("") is not None:
        raise ValueError("regex matches empty text")
    width = parsed.getwidth()[1]
    return PatternDetector(name, [Pattern(source)], max_len=min(width, _UNBOUNDED_CAP) or 1)
