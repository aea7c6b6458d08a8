"""Masking text with a set of detectors: every span found is replaced by `[REDACTED:<detector>]`.
Overlapping spans become one, named for the detector whose span starts first (on a tie, the one
listed first in the set). Counts are kept by detector; the matched text is never kept."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from collections.abc import Sequence

from ahocorasick_rs import BytesAhoCorasick, Implementation

from addon.guard.detector import PatternDetector, View, literals

MARK = "[REDACTED:{}]"


class Scanner:
    __slots__ = ("detectors", "names", "max_len", "marks", "anchors", "plan", "clean", "automaton", "owner",
                 "single", "apart", "always", "by_anchor", "viewed")

    def __init__(self, detectors: Sequence) -> None:
        self.detectors = tuple(detectors)
        self.names = tuple(d.name for d in self.detectors)
        self.max_len = max((d.max_len for d in self.detectors), default=0)
        self.marks = {d.name: MARK.format(d.name) for d in self.detectors}
        # the plan of `spans`: every anchor once (several expressions share one), then each
        # expression with the indices of its anchors; a detector of another kind is asked itself
        # (one built on PatternDetector gets its anchors' hits through the View)
        anchors: dict = {}
        self.plan: list = []
        for rank, d in enumerate(self.detectors):
            if type(d) is not PatternDetector:
                self.plan.append((rank, d, None, ()))
                for p in d.patterns if isinstance(d, PatternDetector) else ():
                    for a in p.anchors:
                        anchors.setdefault((a, p.kind), len(anchors))
                continue
            for p in d.patterns:
                ids = tuple(anchors.setdefault((a, p.kind), len(anchors)) for a in p.anchors)
                self.plan.append((rank, d, p, ids))
        self.anchors = tuple(anchors)
        # what `spans` visits: the entries asked whatever the text, and those an anchor's hit wakes
        # (most texts wake none); and the anchors whose hits a detector reads from the View
        self.always = tuple(e for e in self.plan if e[2] is None or not e[3])
        self.by_anchor: dict[int, tuple] = {}
        for j, e in enumerate(self.plan):
            for i in e[3]:
                self.by_anchor[i] = (*self.by_anchor.get(i, ()), j)
        used = {i for e in self.plan for i in e[3]}
        self.viewed = tuple((i, key) for i, key in enumerate(self.anchors) if i not in used)
        # Every anchor found in one pass: an Aho-Corasick automaton (Rust's aho-corasick, a DFA)
        # over View.norm, of each anchor's strings in that alphabet (a superset of its places: the
        # expression decides). One search per anchor cost a pass over the text each, and ~14 of
        # them were most of a scan. An anchor that is not a few plain strings is searched apart.
        strings, owner, self.apart = [], [], []
        count = [0] * len(self.anchors)
        for i, (anchor, _) in enumerate(self.anchors):
            found = literals(anchor)
            if found is None:
                self.apart.append(i)
                continue
            strings += found
            owner += [i] * len(found)
            count[i] = len(found)
        self.owner = tuple(owner)
        # anchors of one string: a hit overlapping the one before is skipped (re's finditer
        # does the same), so a run of digits is not a hit at every digit
        self.single = tuple(n == 1 for n in count)
        self.automaton = BytesAhoCorasick(strings, implementation=Implementation.DFA) if strings else None
        # texts this scanner found nothing in, by (hash, length): an agent resends its whole
        # conversation every turn, and only the new part needs scanning. str's hash is keyed
        # SipHash with a per-process random key, so a client cannot make a text collide with one
        # known clean; the texts themselves are not kept.
        self.clean: dict[tuple[int, int], None] = {}

    def pending(self, text: str, start: int) -> tuple[int, bool]:
        """Where a match may still be growing at the end of `text` (at or after `start`), and
        whether text[start:] may hold a whole match (False: no span needs finding before it).
        Detectors whose search did not cover all of text[start:] (longer than their max_len),
        or that are not made of expressions, always say it may."""
        first, whole = len(text), False
        for d in self.detectors:
            if type(d) is PatternDetector or hasattr(d, "pending_and_whole"):
                at, seen = d.pending_and_whole(text, start)
                whole = whole or seen or len(text) - start > d.max_len
            else:
                at, whole = d.pending(text, start), True
            if at < first:
                first = at
        return first, whole

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """Merged, ordered, non-overlapping (start, end, detector)."""
        found = []
        view = View(text)
        hits: dict[int, list[int]] = {}  # anchor -> where it occurs (only those that do)
        if self.automaton is not None:
            owner, single, last = self.owner, self.single, {}
            # (overlapping: one anchor's string may begin inside another's)
            for which, start, end in self.automaton.find_matches_as_indexes(view.norm, overlapping=True):
                i = owner[which]
                got = hits.get(i)
                if got is None:
                    hits[i] = [start]
                    last[i] = end
                elif start >= last[i] or not single[i]:
                    got.append(start)
                    last[i] = end
            for i, got in hits.items():
                if not single[i] and len(got) > 1:
                    got.sort()
        for i in self.apart:
            anchor, kind = self.anchors[i]
            src = view.source(kind)
            m = anchor.search(src)
            if m is not None:
                hits[i] = [x.start() for x in anchor.finditer(src, m.start())]
        found_at = view.hits_found
        for i, key in self.viewed:
            found_at[key] = hits.get(i, [])
        entries = self.always
        if hits:
            plan = self.plan
            woken = sorted({j for i in hits for j in self.by_anchor.get(i, ())})
            entries = (*entries, *(plan[j] for j in woken))
        n = len(text)
        for rank, d, p, ids in entries:
            if p is None:
                spans = d.find(text, view)
            elif not ids:
                spans = p.matches(text, ((0, n),))
            else:
                at = hits[ids[0]] if len(ids) == 1 else sorted(x for i in ids for x in hits.get(i, ()))
                spans = p.matches(text, p.around(at, n))
            for start, end in spans:
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


SEPARATOR = "\n\x00\n"  # between the texts of one body, scanned as one: no detector matches across it


CLEAN_MIN = 512  # shorter texts are scanned each time (a hash and a lookup cost about what they save)
CLEAN_KEPT = 100_000  # clean texts remembered per scanner (about 10 MB), the oldest forgotten first


def guard_body(scanner: Scanner, places, mask: bool) -> Outcome:
    """Scan each (place, holder, key) string; with `mask`, replace it masked in its holder.

    The strings are joined and scanned once: each scan has a fixed cost (an anchor search per
    expression), which the many short texts of a conversation would otherwise pay each. A long
    text this scanner already found clean is not scanned again (Scanner.clean)."""
    outcome = Outcome()
    found = list(places)
    texts = [holder[key] for _, holder, key in found]
    clean = scanner.clean
    fresh = []  # (index, (hash, length)) of the long texts not known clean
    if any(len(text) >= CLEAN_MIN for text in texts):
        kept = []
        for i, text in enumerate(texts):
            if len(text) >= CLEAN_MIN:
                known = (hash(text), len(text))
                if known in clean:
                    continue
                fresh.append((len(kept), known))
            kept.append(i)
        if len(kept) < len(texts):
            found, texts = [found[i] for i in kept], [texts[i] for i in kept]
    if not found:
        return outcome
    spans = scanner.spans(SEPARATOR.join(texts))
    if not spans:
        for _, known in fresh:
            remember(clean, known)
        return outcome
    starts = list(accumulate([len(text) + len(SEPARATOR) for text in texts[:-1]], initial=0))
    own: dict[int, list] = {}
    for start, end, name in spans:
        i = bisect_right(starts, start) - 1
        while i < len(texts) and end > starts[i]:  # (one that crossed a separator is cut at it)
            lo, hi = max(start, starts[i]) - starts[i], min(end, starts[i] + len(texts[i])) - starts[i]
            if hi > lo:
                own.setdefault(i, []).append((lo, hi, name))
            i += 1
    for i, known in fresh:
        if i not in own:
            remember(clean, known)
    for i, piece in own.items():  # (in order: spans come sorted by where they start)
        where, holder, key = found[i]
        outcome.places.append((where, tuple(sorted({s[2] for s in piece}))))
        masked = scanner.apply(texts[i], piece, outcome.counts)
        if mask:
            holder[key] = masked
    return outcome


def remember(clean: dict, known: tuple[int, int]) -> None:
    clean[known] = None
    if len(clean) > CLEAN_KEPT:
        try:  # (a large body is scanned in a thread: another may be changing the dict meanwhile)
            del clean[next(iter(clean))]
        except (KeyError, RuntimeError, StopIteration):
            pass
