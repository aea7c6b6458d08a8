"""A table written once and read in both directions.

A `Mapping` is a list of (a, b) rows. `forward(a)` takes the first row with that `a`, `reverse(b)`
the first row with that `b`: rows that only one direction needs come after the row that names the
canonical answer for the other (OpenAI "stop" reads back as Anthropic "end_turn", not
"stop_sequence").
"""

from __future__ import annotations

from typing import Generic, TypeVar

A = TypeVar("A")
B = TypeVar("B")


class Mapping(Generic[A, B]):
    __slots__ = ("rows", "_forward", "_reverse", "default_forward", "default_reverse")

    def __init__(self, rows: list[tuple[A, B]], default_forward: B, default_reverse: A) -> None:
        self.rows = rows
        self._forward: dict[A, B] = {}
        self._reverse: dict[B, A] = {}
        for a, b in rows:
            self._forward.setdefault(a, b)
            self._reverse.setdefault(b, a)
        self.default_forward = default_forward
        self.default_reverse = default_reverse

    def forward(self, a) -> B:
        return self._forward.get(a, self.default_forward)

    def reverse(self, b) -> A:
        return self._reverse.get(b, self.default_reverse)
