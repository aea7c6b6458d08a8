"""Replacing a function of a class or module (mitmproxy's) for a while, and putting it back: the
one way every patch of mitmproxy internals does it (hooks/patches/, web/). Pure Python: it knows
nothing of what it patches."""

from __future__ import annotations


class Patches:
    """Attributes of mitmproxy (functions of a class or module) replaced by wrappers for the life
    of an addon: `install()` at its `load`, `undo()` at its `done`.

    A wrapper reaches what it wraps through `original[name]`, which `undo()` leaves in place:
    connections still open when the patches are taken out (a script reload; the last events of
    a stop) may hold a bound wrapper, e.g. an HTTP/1 connection's current reader
    (`Http1Server.state`), and go on through it to mitmproxy's own code. Taking the original
    away from them (as a popped dict once did) crashed each such connection with a KeyError."""

    def __init__(self, owner, **wrappers) -> None:
        self.owner = owner
        self.wrappers = wrappers
        self.original: dict = {}

    def install(self) -> None:
        for name, wrapper in self.wrappers.items():
            current = getattr(self.owner, name)
            if current is not wrapper:  # (installed twice: the first original stays)
                self.original[name] = current
                setattr(self.owner, name, wrapper)

    def undo(self) -> None:
        for name, original in self.original.items():
            if getattr(self.owner, name) is self.wrappers[name]:  # not replaced again by someone else since
                setattr(self.owner, name, original)

    def installed(self) -> bool:
        return all(getattr(self.owner, name) is wrapper for name, wrapper in self.wrappers.items())
