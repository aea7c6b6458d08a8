"""Text a client chose, made safe to put in a log line.

A log line is read by people in a terminal and by programs that split the output into lines and
the lines into `key=value` fields. A client's model name, path or header holding a line break
(LF, CR, NEL, U+2028/U+2029, the C0 separators that str.splitlines() honours) would end the
gateway's line and start one of its own (`gateway: 200 key=ADMIN tokens=999999/999999`); an ANSI
escape would recolour or erase what the terminal shows; a space and `key=` would add a field to
the gateway's own line; bidi controls would reorder it on screen.

So every character that str.isprintable() rejects (controls, separators other than the space,
format characters, surrogates, unassigned code points) is written as a Python-style escape
(`\\n`, `\\x1b`, `\\u2028`), and so are the backslash and the double quote, so that an escape in the
output always means the gateway wrote it. A `key=value` field whose value has a space, an `=` or
a quote, or is empty, is double-quoted (logfmt).

Redaction of keys (hooks/logredact.py) must run before escaping: an escape glues its hex digits
to the next word, which would hide a key that follows a control character from the token lookup.
"""

from __future__ import annotations

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}


def _char(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    if c.isprintable():
        return c
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def plain(text: str) -> bool:
    """Nothing to escape (the common case, checked in C)."""
    return text.isprintable() and "\\" not in text and '"' not in text


def escape(text: str) -> str:
    """Every character a line could be broken, recoloured or reordered by, as an escape."""
    if plain(text):
        return text
    return "".join(map(_char, text))


def value(text: str) -> str:
    """A `key=value` field's value: escaped, and quoted when it could be read as more than one
    field (a space or an `=`) or has a quote or is empty."""
    escaped = escape(text)
    if escaped and " " not in escaped and "=" not in escaped and '"' not in escaped:
        return escaped
    return f'"{escaped}"'


def word(text: str) -> str:
    """A field that stands on its own (a method, a path): escaped, quoted when it has a space."""
    escaped = escape(text)
    if escaped and " " not in escaped and '"' not in escaped:
        return escaped
    return f'"{escaped}"'


def record(text: str) -> str:
    """A whole log record (already formatted, tracebacks included), for what is logged without
    escaping its fields (mitmproxy's own lines, an exception's message): every character that
    could break or recolour a line is escaped except LF, and every line after the first starts
    with whitespace, so that no line of it can pass for a record of its own. Backslashes and
    quotes stay as they are (tracebacks and reprs are full of them)."""
    if text.isprintable():
        return text
    out = "".join(c if c == "\n" or c.isprintable() else _char(c) for c in text)
    if "\n" in out:
        first, *rest = out.split("\n")
        out = "\n".join([first, *(line if line.startswith(" ") else "  " + line for line in rest)])
    return out
