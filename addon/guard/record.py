"""What a key's guardrail set did to one flow, as the flow's record keeps it
(`FlowState.guardrails`): the set, its action, counts by detector of what it masked in the
request and in the answer, or blocked, and where. Names, numbers and places only: never the text.

The access line, the ledger's `guardrails` column and the metrics read it through the functions
below; a saved flow keeps it as a plain dict (`to_dict`, under the names recordings have always
used), turned back by `from_dict`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class GuardRecord:
    set_name: str  # the keys file's set ("set" when saved)
    action: str  # mask | block
    masked: dict[str, int] | None = None  # masked in the request, by detector
    where: list[str] | None = None  # the request's places that held a match (`messages[3].content`)
    blocked: list[str] | None = None  # the detectors that blocked the request
    answer_masked: dict[str, int] | None = None  # masked in the answer, by detector

    def to_dict(self) -> dict:
        out: dict = {"set": self.set_name, "action": self.action}
        if self.masked is not None:
            out["masked"] = dict(self.masked)
        if self.where is not None:
            out["where"] = list(self.where)
        if self.blocked is not None:
            out["blocked"] = list(self.blocked)
        if self.answer_masked is not None:
            out["answer_masked"] = dict(self.answer_masked)
        return out

    @classmethod
    def from_dict(cls, saved: dict) -> GuardRecord:
        return cls(str(saved.get("set", "?")), str(saved.get("action", "?")), saved.get("masked"), saved.get("where"),
                   saved.get("blocked"), saved.get("answer_masked"))


def _counts(counts: dict[str, int]) -> str:
    return ",".join(f"{name}:{n}" for name, n in sorted(counts.items()))


def log_fields(record: GuardRecord | None) -> str:
    """The access line's fields: ` guardrails=secrets:2,emails:1` (masked in the request),
    ` guardrails_answer=emails:1`, ` guardrails_blocked=credit_cards`. Names and numbers only:
    detector names are the keys file's ([a-z0-9_]), never matched text."""
    if record is None:
        return ""
    out = ""
    if record.masked:
        out += " guardrails=" + _counts(record.masked)
    if record.answer_masked:
        out += " guardrails_answer=" + _counts(record.answer_masked)
    if record.blocked:
        out += " guardrails_blocked=" + ",".join(record.blocked)
    return out


def ledger_value(record: GuardRecord | None) -> str:
    """The ledger's `guardrails` column: `masked=secrets:2,emails:1;answer=emails:1`, or ''."""
    if record is None:
        return ""
    parts = []
    if record.masked:
        parts.append("masked=" + _counts(record.masked))
    if record.answer_masked:
        parts.append("answer=" + _counts(record.answer_masked))
    if record.blocked:
        parts.append("blocked=" + ",".join(record.blocked))
    return ";".join(parts)


def metric_counts(record: GuardRecord | None):
    """(detector, action, n) for the metrics: action masked, answer_masked or blocked."""
    if record is None:
        return
    for action, counts in (("masked", record.masked), ("answer_masked", record.answer_masked)):
        for name, n in (counts or {}).items():
            yield name, action, n
    for name in record.blocked or ():
        yield name, "blocked", 1
