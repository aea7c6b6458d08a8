"""The scanner's one pass for every anchor (an Aho-Corasick search over the text lower-cased with
digits as 0): each anchor's strings, an anchor beginning inside another's string, anchors found
in any case where their expression folds case, and one that is not plain strings searched apart."""

from __future__ import annotations

import re

from addon.guard import detectors
from addon.guard.detector import Pattern, PatternDetector, literals
from addon.guard.scan import Scanner

PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n"
       "-----END RSA PRIVATE KEY-----")


def default() -> Scanner:
    return Scanner([detectors.builtin(n) for n in ("secrets", "private_keys", "credit_cards", "emails")])


def test_an_anchor_is_its_strings_in_the_searched_alphabet():
    assert literals(re.compile("A(?:KIA|SIA|BIA|CCA|3T)")) == [b"a0t", b"abia", b"acca", b"akia", b"asia"]
    assert literals(re.compile("gh[pou]_")) == [b"gho_", b"ghp_", b"ghu_"]
    assert literals(re.compile(b"0000")) == [b"0000"]
    assert literals(re.compile(r"\d+")) is None  # not a few plain strings: searched apart
    assert literals(re.compile("(?i)aws")) is None


def test_every_builtin_anchor_is_in_the_one_pass():
    scanner = Scanner([detectors.builtin(n) for n in detectors.NAMES])
    assert scanner.apart == []
    assert scanner.automaton is not None


def test_an_anchor_that_begins_inside_another_is_found():
    # "sk-" (secrets) and "-----BEGIN" (private_keys) share a "-": a search that reported only
    # non-overlapping strings would see "sk-" and miss the key
    masked = default().mask("ask" + PEM)
    assert masked == "ask[REDACTED:private_keys]"
    # "aws" and "sk-": the AWS name ends where an OpenAI key's prefix begins
    masked = default().mask("email me: aws@example.com")
    assert masked == "email me: [REDACTED:emails]"


def test_folded_anchors_in_any_case_and_cased_ones_only_as_written():
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    for name in ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "Aws_Secret_Key"):
        assert default().mask(f"{name} = {secret}") == f"{name} = [REDACTED:secrets]", name
    # AKIA is case-sensitive in its expression: the lower-cased search finds a candidate, the
    # expression refuses it
    assert default().mask("akiaiosfodnn7example") is None
    assert default().mask("AKIAIOSFODNN7EXAMPLE") == "[REDACTED:secrets]"


def test_digits_anywhere_in_a_long_run_and_after_other_text():
    card = "4111 1111 1111 1111"
    text = "0123456789" * 30 + " paid with " + card + " on 2026-12-08 " + "x" * 5000 + card
    masked = default().mask(text)
    assert masked is not None and card not in masked and masked.count("[REDACTED:credit_cards]") == 2


def test_an_anchor_not_made_of_plain_strings_is_searched_apart():
    odd = PatternDetector("odd", [Pattern(r"\bQ\d{3}-[A-Z]{4}\b", anchors=(r"Q\d{3}",))], max_len=10)
    scanner = Scanner([odd, detectors.builtin("emails")])
    assert len(scanner.apart) == 1
    assert scanner.mask("ref Q123-ABCD, mail a@b.example") == "ref [REDACTED:odd], mail [REDACTED:emails]"


def test_text_past_ascii_keeps_every_position():
    # one byte a character whatever the text holds (Latin-1, wider, a lone surrogate), so a hit's
    # place in the searched bytes is its place in the text
    for prefix in ("é" * 3, "— “quoted” ", "😀 emoji ", "\ud800 lone "):
        masked = default().mask(prefix + "mail bob@example.com and AKIAIOSFODNN7EXAMPLE")
        assert masked == prefix + "mail [REDACTED:emails] and [REDACTED:secrets]", prefix
