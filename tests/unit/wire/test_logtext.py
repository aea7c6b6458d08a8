"""wire/logtext.py: what a log line may hold of a client's text."""

from __future__ import annotations

import json

from addon.wire import logtext

LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_nothing_that_ends_a_line_or_drives_a_terminal_survives():
    text = "a" + LINE_BREAKS + "\x1b[2K\x07\x7f\u202e\u2066\ufeff\ud800\U000e0001" + "b"
    for out in (logtext.escape(text), logtext.value(text), logtext.word(text)):
        assert len(out.splitlines()) == 1, out
        assert out.isprintable(), out
    # a record keeps LF (tracebacks), and only LF: every other break is escaped
    lines = logtext.record(text).split("\n")
    assert len(lines) == 2 and all(line.isprintable() for line in lines)


def test_escapes_read_back_and_quotes_mark_one_field():
    assert logtext.escape("gpt-4o") == "gpt-4o"
    assert logtext.escape("a\nb\x1b\u2028") == "a\\nb\\x1b\\u2028"
    assert logtext.escape("back\\slash") == "back\\\\slash"  # an escape in the output is always the gateway's
    assert logtext.value("") == '""' and logtext.value("a=b") == '"a=b"' and logtext.word("a=b") == "a=b"
    assert logtext.value("gpt-4o key=ADMIN") == '"gpt-4o key=ADMIN"'
    assert json.loads(logtext.value('say "hi"\n')) == 'say "hi"\n'  # such a field reads back as JSON


def test_a_record_keeps_its_lines_but_none_can_pass_for_a_record():
    text = "failed\nTraceback (most recent call last):\n  File x\nValueError: bad\n[12:00:00.000] gateway: 200 key=FORGED\x1b[2K"
    lines = logtext.record(text).split("\n")
    assert lines[0] == "failed" and len(lines) == 5
    assert all(line.startswith(" ") for line in lines[1:])
    assert lines[-1] == "  [12:00:00.000] gateway: 200 key=FORGED\\x1b[2K"
    assert logtext.record("plain line") == "plain line"
