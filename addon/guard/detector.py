"""The one interface every detector implements, and the pattern-based detector most are built on.

A detector finds spans of text to mask. For streams it also says where a match could still be
growing at the end of the text seen so far (`pending`), so that only those characters are held
back: the `regex` module's partial matching answers that for any pattern, custom ones included,
so no detector hand-writes its own "could this be the start of a match" logic."""

from __future__ import annotations

import re
from re import _constants, _parser
from collections.abc import Callable, Iterator
from typing import Protocol

import regex

Span = tuple[int, int]


class Detector(Protocol):
    name: str
    max_len: int  # the longest text one match can cover: a stream never holds back more

    def find(self, text: str, view: View | None = None) -> Iterator[Span]:
        """Spans (start, end) of text to mask, in any order; they may overlap. `view` is the
        text's shared View, when the caller has one."""

    def pending(self, text: str, start: int) -> int:
        """The earliest index >= start where a match (or the start of one) reaches the end of
        `text`: more text could complete or extend it. len(text) when there is none."""


_DIGITS = bytes.maketrans(b"0123456789", b"0000000000")
# the alphabet every anchor is found in at once (View.norm): letters lower-cased, digits as 0
_NORM = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", b"abcdefghijklmnopqrstuvwxyz0000000000")
_WIDEST = 20000


class View:
    """One text as the detectors read it: the text; where anchors are searched, the text itself
    when it is ASCII, else a copy with every other character as "?" (same length, same
    positions: re's plain-string search runs at memchr speed on one-byte strings only, and a
    single "—" in 200 KB of code made every anchor search ~30x slower); and (made once, when a
    detector first asks) that copy with every digit turned to 0, where a run of digits is found.
    A Scanner finds every anchor at once in `norm` and leaves the hits here (`hits_found`); the
    other copies are made only for an anchor searched apart, or a detector used alone."""

    __slots__ = ("text", "_ascii", "_zeros", "_lower", "_norm", "hits_found")

    def __init__(self, text: str) -> None:
        self.text = text
        self._ascii: str | None = text if text.isascii() else None
        self._zeros: bytes | None = None
        self._lower: str | None = None
        self._norm: bytes | None = None
        # where each (anchor, kind) occurs: found once per text, by hits() or all at once by a Scanner
        self.hits_found: dict = {}

    @property
    def norm(self) -> bytes:
        """The text as one byte a character (past Latin-1: "?"), ASCII letters lower-cased and
        digits as 0: where a Scanner finds every anchor in one pass (scan.py). (Latin-1, not
        ASCII: its encoder keeps a text with a few "—" in it at copying speed, ~40x faster.)"""
        if self._norm is None:
            self._norm = self.text.encode("latin-1", "replace").translate(_NORM)
        return self._norm

    @property
    def ascii(self) -> str:
        if self._ascii is None:
            raw = self.text.encode("ascii", "replace")
            self._ascii = raw.decode("ascii")
            self._zeros = raw.translate(_DIGITS)  # (while the bytes are at hand)
        return self._ascii

    def source(self, kind: int):
        """Where anchors of a kind are searched: 0 the ASCII copy, 1 its digits as 0, 2 lower-cased."""
        if kind == 0:
            return self.ascii
        if kind == 1:
            return self.zeros
        if self._lower is None:
            self._lower = self.ascii.lower()
        return self._lower

    def hits(self, anchor: re.Pattern, kind: int) -> list[int]:
        """Where `anchor` occurs, found once per text however many expressions share it."""
        found = self.hits_found.get((anchor, kind))
        if found is None:
            text = self.source(kind)
            first = anchor.search(text)  # (most anchors are in no text: one C call says so)
            found = [] if first is None else [m.start() for m in anchor.finditer(text, first.start())]
            self.hits_found[(anchor, kind)] = found
        return found

    @property
    def zeros(self) -> bytes:
        if self._zeros is None:
            self._zeros = self.ascii.encode().translate(_DIGITS)  # (bytes.translate: a table lookup per byte)
        return self._zeros


class Pattern:
    """One regular expression: `group` is the part masked (0: the whole match); `valid` checks a
    candidate the expression alone cannot (a checksum, a decodable header).

    Where it is searched: Python's engine tries an expression at every position unless it
    begins with a plain string, and most of these cannot (a \\b, a lookbehind, a class). So an
    expression names `anchors`: expressions that do begin with a plain string (which re finds at
    memchr speed), one of which every match contains at most `lead` characters after its start;
    or `digits`, a run of that many digits every match contains. The text is searched for those
    and the expression only around them. With neither, it is searched everywhere (custom
    expressions: one that begins with a plain string stays fast)."""

    __slots__ = ("source", "flags", "compiled", "partial", "group", "valid", "anchors", "lead", "digits", "width",
                 "kind")

    def __init__(self, source: str, flags: int = 0, group: int = 0, valid: Callable[[str], bool] | None = None,
                 anchors: tuple[str, ...] = (), lead: int = 0, digits: int = 0, folded: bool = False) -> None:
        self.source, self.flags = source, flags
        self.compiled = re.compile(source, flags)
        # the same expression in `regex`, for partial matches at a stream's edge (re has none)
        self.partial = regex.compile(source, flags)
        self.group = group
        self.valid = valid
        self.anchors = tuple(_anchor(a) for a in anchors) or ((_anchor(b"0" * digits),) if digits else ())
        self.lead, self.digits = lead, digits
        self.kind = 1 if digits else 2 if folded else 0  # (folded: lower-case anchors, found in any case)
        self.width = min(_parser.parse(source, flags).getwidth()[1], _WIDEST)

    def windows(self, view: View) -> list[tuple[int, int]] | None:
        """Merged (start, end) ranges holding every match; None: search the whole text."""
        if not self.anchors:
            return None
        kind = self.kind
        if len(self.anchors) == 1:
            hits = view.hits(self.anchors[0], kind)
        else:
            hits = sorted(at for a in self.anchors for at in view.hits(a, kind))
        return self.around(hits, len(view.text))

    def around(self, hits: list[int], n: int) -> list[tuple[int, int]]:
        """The merged windows around sorted anchor positions."""
        out: list[list[int]] = []
        before, after = self.lead, self.width + 2  # (+2: the character a lookahead reads after a match)
        for at in hits:
            lo, hi = max(0, at - before), min(n, at + after)
            if out and lo <= out[-1][1]:
                out[-1][1] = max(out[-1][1], hi)
            else:
                out.append([lo, hi])
        return [(lo, hi) for lo, hi in out]

    def matches(self, text: str, windows) -> Iterator[Span]:
        compiled, group, valid = self.compiled, self.group, self.valid
        for lo, hi in windows:
            for m in compiled.finditer(text, lo, hi):
                if valid is None or valid(m.group(group)):
                    if m.start(group) < m.end(group):
                        yield m.span(group)


_FLAGS = ((re.IGNORECASE, "i"), (re.DOTALL, "s"), (re.MULTILINE, "m"), (re.VERBOSE, "x"))
_LEADING_FLAGS = re.compile(r"^\(\?([imsx]+)\)")


def _scoped(source: str, flags: int) -> str:
    """An expression as one alternative of a larger one: its flags scoped to it."""
    letters = "".join(ch for flag, ch in _FLAGS if flags & flag)
    lead = _LEADING_FLAGS.match(source)
    if lead:
        letters += lead.group(1)
        source = source[lead.end():]
    return f"(?{letters}:{source})" if letters else f"(?:{source})"


_ANCHORS: dict[str | bytes, re.Pattern] = {}
_MOST_LITERALS = 64


def literals(anchor: re.Pattern) -> list[bytes] | None:
    """Every string `anchor` matches, in View.norm's alphabet (lower case, digits as 0): a
    superset of where it occurs in any kind of source, so one multi-string search over View.norm
    finds every anchor of a scanner. None when the anchor is not a small set of plain strings."""
    source = anchor.pattern
    if anchor.flags & ~re.UNICODE:
        return None
    try:
        text = source.decode("ascii") if isinstance(source, bytes) else source
        found = _strings(list(_parser.parse(text)))
    except (re.error, UnicodeDecodeError):
        return None
    if not found or "" in found or not all(s.isascii() and "?" not in s for s in found):
        return None
    return sorted({s.encode().translate(_NORM) for s in found})


def _strings(items) -> list[str] | None:
    out = [""]
    for op, av in items:
        if op is _constants.LITERAL:
            choices = [chr(av)]
        elif op is _constants.IN and all(o is _constants.LITERAL for o, _ in av):
            choices = [chr(a) for _, a in av]
        elif op is _constants.SUBPATTERN and not av[1] and not av[2]:
            choices = _strings(list(av[3]))
        elif op is _constants.BRANCH:
            choices = []
            for branch in av[1]:
                more = _strings(list(branch))
                if more is None:
                    return None
                choices += more
        else:
            return None
        if choices is None:
            return None
        out = [a + b for a in out for b in choices]
        if len(out) > _MOST_LITERALS:
            return None
    return out


def _anchor(source: str | bytes) -> re.Pattern:
    """One compiled anchor per source, so a View finds each once for every expression using it."""
    compiled = _ANCHORS.get(source)
    if compiled is None:
        compiled = _ANCHORS[source] = re.compile(source)
    return compiled


class PatternDetector:
    """A detector made of expressions (Pattern), each searched around its anchors."""

    def __init__(self, name: str, patterns: list[Pattern], max_len: int) -> None:
        self.name = name
        self.patterns = patterns
        self.max_len = max_len
        # every expression as one, for a stream's partial matches: one search per chunk, not one
        # per expression (a call into `regex` costs a few microseconds however short the text)
        self.partial = regex.compile("|".join(_scoped(p.source, p.flags) for p in patterns))

    def find(self, text: str, view: View | None = None) -> Iterator[Span]:
        view = view or View(text)
        for p in self.patterns:
            windows = p.windows(view)
            yield from p.matches(text, ((0, len(text)),) if windows is None else windows)

    def pending(self, text: str, start: int) -> int:
        return self.pending_and_whole(text, start)[0]

    def pending_and_whole(self, text: str, start: int) -> tuple[int, bool]:
        """pending(), and whether a whole match was passed on the way (else nothing of
        text[start:first] can need masking: the stream skips finding spans)."""
        end = len(text)
        first = end
        whole = False
        window = max(start, end - self.max_len)
        # partial=True also returns a match cut off by the end of the text. A whole match that
        # ends at the end may still grow (or stop matching: a \b, a checksum), and one that ends
        # earlier may be the short reading of a longer match still coming (`\d{4}( ?\d{2,7}){2,4}`
        # reads "4111 1111 " as "4111 11 11"): fullmatch(partial=True) says whether the rest of the
        # text could still belong to a match from the same start. Either way it waits.
        partial = self.partial
        m = partial.search(text, window, partial=True)
        while m is not None and m.start() < first:
            whole = whole or not m.partial
            if m.end() == end or partial.fullmatch(text, m.start(), partial=True) is not None:
                first = m.start()
                break
            m = partial.search(text, m.end() if m.end() > m.start() else m.start() + 1, partial=True)
        return first, whole
