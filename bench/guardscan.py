"""In-process microbench of the request guard: the CPU one guarded request's body costs, by step
(parse, walk + scan, re-encode), for a 2 KB and a 200 KB body whose text is new every time (the
cold case: nothing a scan found clean before is reused), as a chat request (one long message) and
as a Claude-Code-shaped Messages request (a system prompt, many tool results and texts).

    .venv/bin/python bench/guardscan.py [--repeats 200] [--set default|every]

Deterministic input (the project's own code and docs, as bench/guardrails.py); prints p50 and
p10 microseconds per body. Thread CPU time, so a busy machine's waiting is not counted."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from guardrails import DEFAULT, EVERY, corpus  # noqa: E402

from addon.guard import places  # noqa: E402
from addon.guard.config import parse_sets  # noqa: E402
from addon.guard.scan import guard_body  # noqa: E402


def chat(size: int, turn: int) -> bytes:
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": f"turn {turn}\n" + corpus(size)}]
    return json.dumps({"model": "gpt-4o-mini", "max_tokens": 16, "messages": messages}).encode()


def messages(size: int, turn: int) -> bytes:
    """Claude Code's shape: a system prompt, then turns of tool_use / tool_result (files, shell
    output) and short texts, about `size` characters of text in all."""
    text = corpus(size)
    system = [{"type": "text", "text": f"turn {turn}\n" + text[:min(len(text), 8000) // 4]}]
    rest = text[len(system[0]["text"]):]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "fix the failing test"}]}]
    step = max(500, len(rest) // 20)
    for i in range(0, len(rest), step):
        tool_id = f"toolu_{turn}_{i}"
        msgs.append({"role": "assistant", "content": [
            {"type": "text", "text": "Let me read the file."},
            {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"file_path": f"/repo/f{i}.py"}}]})
        msgs.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": f"{turn}:{i}\n" + rest[i:i + step]}]})
    return json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16, "system": system,
                       "messages": msgs}).encode()


def run(scanner, make, walk, size: int, repeats: int) -> dict:
    parse, guard, total = [], [], []
    for turn in range(repeats):
        raw = make(size, turn)
        t0 = time.thread_time_ns()
        body = json.loads(raw)
        t1 = time.thread_time_ns()
        guard_body(scanner, walk(body), mask=True)
        t2 = time.thread_time_ns()
        parse.append(t1 - t0)
        guard.append(t2 - t1)
        total.append(t2 - t0)

    def p(xs, q):
        xs = sorted(xs)
        return xs[int(len(xs) * q)] / 1000

    return {"parse_p50_us": p(parse, .5), "guard_p50_us": p(guard, .5), "guard_p10_us": p(guard, .1),
            "total_p50_us": p(total, .5), "guard_us_per_kb": p(guard, .5) / (len(raw) / 1000)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--set", choices=("default", "every"), default="default")
    a = ap.parse_args()
    sets = parse_sets({"default": DEFAULT, "every": {"detect": EVERY}})
    scanner = sets[a.set].scanner
    for name, make, walk in (("chat", chat, places.chat_request), ("messages", messages, places.messages_request)):
        for size in (2_000, 200_000):
            n = a.repeats if size < 10_000 else max(10, a.repeats // 10)
            r = run(scanner, make, walk, size, n)
            print(f"{a.set:8} {name:9} {size // 1000:4} KB  guard p50 {r['guard_p50_us']:8.1f} us "
                  f"(p10 {r['guard_p10_us']:8.1f}; {r['guard_us_per_kb']:5.1f} us/KB)  "
                  f"parse p50 {r['parse_p50_us']:7.1f} us  n={n}")


if __name__ == "__main__":
    main()
