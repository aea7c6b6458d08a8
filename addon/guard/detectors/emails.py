"""`emails`: addresses with a dotted domain ending in letters (so `pkg@1.2.3`, `user@localhost`
and `@scope/name` do not fire), not a URL's user (`postgresql://app@db.internal`). `git@host:`
in an SSH URL is an address too: it fires.

Found from each "@" (the scanner's one pass over the text finds them with every other anchor):
the domain by an expression matched there, the local part by walking back over its characters
(an expression starting at the local part would be tried at every letter of the text)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from addon.guard.detector import Pattern, PatternDetector, Span, View

_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_DOMAIN = re.compile(r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}"
                     r"(?![A-Za-z0-9\-]|\.[A-Za-z0-9])")
# the whole address, for a stream's partial matches (detector.pending)
_WHOLE = (r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}"
          r"[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9\-]|\.[A-Za-z0-9])")


class Emails(PatternDetector):
    def find(self, text: str, view: View | None = None) -> Iterator[Span]:
        view = view or View(text)
        domain = _DOMAIN.match
        for at in view.hits(self.patterns[0].anchors[0], 0):
            m = domain(text, at)
            if m is None:
                continue
            start = at
            while start > 0 and at - start < 64 and text[start - 1] in _LOCAL:
                start -= 1
            if start > 0 and text[start - 1] in _LOCAL:
                continue  # a local part longer than 64 characters: not an address
            if text.startswith("://", start - 3):
                continue  # a URL's user (postgresql://gw@db.internal): secrets reads URLs
            while start < at and text[start] not in _ALNUM:  # it begins with a letter or digit
                start += 1
            if start < at:
                yield start, m.end()


DETECTOR = Emails("emails", [Pattern(_WHOLE, anchors=("@",), lead=64)], max_len=256)
