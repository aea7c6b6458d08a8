"""The keys file's guardrail sets: what is accepted, and what is refused at load (unknown
detectors and fields, custom expressions that do not compile, match nothing, or can backtrack
catastrophically), each refusal saying where."""

from __future__ import annotations

import re
import time

import pytest

from addon.guard.config import parse_sets
from addon.guard.detectors.custom import compile_custom


def test_a_set_is_parsed_with_its_defaults():
    sets = parse_sets({
        "default": {"detect": ["secrets", "emails"]},
        "strict": {"detect": ["secrets", {"name": "ticket", "regex": "ACME-[0-9]{6}"}], "action": "block",
                   "responses": "mask"},
    })
    assert sets["default"].action == "mask" and not sets["default"].responses
    assert sets["default"].detectors == ("secrets", "emails")
    assert sets["strict"].action == "block" and sets["strict"].responses
    assert sets["strict"].scanner.mask("see ACME-123456 now") == "see [REDACTED:ticket] now"
    assert parse_sets(None) == {}


@pytest.mark.parametrize("raw, says", [
    ({"d": {"detect": ["secret"]}}, "guardrails.d.detect[0]: unknown detector 'secret'"),
    ({"d": {"detect": []}}, "guardrails.d.detect must be a non-empty list"),
    ({"d": {"detect": ["emails"], "acton": "block"}}, "unknown field(s) ['acton']"),
    ({"d": {"detect": ["emails"], "action": "drop"}}, "guardrails.d.action must be one of"),
    ({"d": {"detect": ["emails"], "responses": "block"}}, "guardrails.d.responses must be one of"),
    ({"d": {"detect": ["emails", "emails"]}}, "'emails' is listed twice"),
    ({"d": {"detect": [{"name": "emails", "regex": "x"}]}}, "not a built-in detector's name"),
    ({"d": {"detect": [{"name": "t", "regex": "ACME-[0-9"}]}}, "guardrails.d.detect[0]: regex does not compile"),
    ({"d": {"detect": [{"name": "t", "regex": "(a+)+$"}]}}, "can backtrack catastrophically"),
    ({"d": {"detect": [{"name": "t", "regex": "x*"}]}}, "matches empty text"),
    ({"D!": {"detect": ["emails"]}}, "set name 'D!'"),
    (["secrets"], "guardrails must be an object"),
])
def test_refused_at_load(raw, says):
    with pytest.raises(ValueError) as e:
        parse_sets(raw)
    assert says in str(e.value)


@pytest.mark.parametrize("source", [
    "(a+)+", "(a*)*b", r"(\w+\s?)+$", "(a|ab)+c", "(a|a)*", r"(\d+)*x", "(?:x+y?)+z", r"(.*a){12}",
    r"^(\w+|\d+)+$",
])
def test_catastrophic_expressions_are_refused(source):
    with pytest.raises(ValueError, match="backtrack catastrophically"):
        compile_custom("t", source)


@pytest.mark.parametrize("source", [
    "ACME-[0-9]{6}", r"\bINV-\d{4,8}\b", r"(?:[A-Z]{2}-){2}\d{3}", "(?:ab|cd)+e", r"emp_[a-z]+_\d+",
    r"(?i)project\s+(?:falcon|eagle)", r"(\d{3}-){2}\d{4}",
    r"(\d{1,3}\.){3}\d{1,3}",
])
def test_safe_expressions_are_accepted_and_fast(source):
    detector = compile_custom("t", source)
    hostile = "a" * 5000 + "!" + "1" * 5000 + " " * 5000
    start = time.perf_counter()
    list(detector.find(hostile))
    assert time.perf_counter() - start < 1.0  # (a generous bound: catastrophic ones take minutes)
    assert re.compile(source)


def test_the_refused_kinds_really_are_slow():
    """The refusal guards something real: (a+)+ on 26 a's and a ! already takes far longer than
    the accepted expressions on 15,000 characters."""
    start = time.perf_counter()
    re.match("(a+)+$", "a" * 22 + "!")
    slow = time.perf_counter() - start
    start = time.perf_counter()
    list(compile_custom("t", "ACME-[0-9]{6}").find("a" * 15000))
    fast = time.perf_counter() - start
    assert slow > 20 * fast
