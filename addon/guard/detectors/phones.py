"""`phones`: telephone numbers that Google's libphonenumber (the `phonenumbers` package) says are
valid: in international form (`+44 20 7946 0958`) for any country, or a US/Canada number written
the usual way (`(415) 555-2671`, `415-555-2671`). Bare digit runs are left alone: they are order
numbers, timestamps and ids far more often than phones."""

from __future__ import annotations

import re

import phonenumbers

from addon.guard.detector import Pattern, PatternDetector

_NATIONAL = re.compile(r"^(?:\(\d{3}\) ?|\d{3}[\-. ])\d{3}[\-. ]\d{4}$")


def _phone(candidate: str) -> bool:
    plus = candidate.startswith("+")
    if not plus and not _NATIONAL.match(candidate):
        return False
    try:
        number = phonenumbers.parse(candidate, None if plus else "US")
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number(number)


_END = r"(?![\w\-]|\.\d)"

DETECTOR = PatternDetector(
    "phones",
    [
        Pattern(r"(?<![\w+.\-/])\+\d{1,3}[ \-.]?(?:\(\d{1,4}\)[ \-.]?)?\d{1,5}(?:[ \-.]\d{1,6}){0,5}" + _END,
                valid=_phone, anchors=(r"\+",)),
        Pattern(r"(?<![\w+.\-/])(?:\(\d{3}\) ?\d{3}[\-. ]\d{4}|\d{3}[\-. ]\d{3}[\-. ]\d{4})" + _END,
                valid=_phone, digits=3, lead=6),
    ],
    max_len=32,
)
