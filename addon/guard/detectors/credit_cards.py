"""`credit_cards`: 13 to 19 digits, in groups of one separator kind at most, whose issuer prefix
is a card network's and whose Luhn check digit is right."""

from __future__ import annotations

import re

from addon.guard.detector import Pattern, PatternDetector

# Visa, Mastercard (51-55, 2221-2720), Amex, Discover, Diners, JCB, UnionPay, Maestro
_ISSUER = re.compile(r"4|5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6(?:011|5|4[4-9]|2)|"
                     r"3(?:0[0-5]|[68])|35(?:2[89]|[3-8]\d)|5[06-8]|6\d")


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(candidate: str) -> bool:
    seps = {ch for ch in candidate if not ch.isdigit()}
    if len(seps) > 1:
        return False
    digits = candidate.replace(" ", "").replace("-", "")
    if not 13 <= len(digits) <= 19 or not _ISSUER.match(digits) or len(set(digits)) < 2:
        return False
    return luhn(digits)


DETECTOR = PatternDetector(
    "credit_cards",
    [Pattern(r"(?<![\d.\-])\d{4}(?:[ \-]?\d{2,7}){2,4}(?![\d\-]|\.\d)", valid=_card, digits=4, lead=24)],
    max_len=24,
)
