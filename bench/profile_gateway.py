"""Profile the gateway process under load with py-spy: where does its CPU go?

    .venv/bin/python bench/profile_gateway.py [--scenario openai|anthropic] [--stream] [--seconds 15]
                                      [--connections 16] [--target gateway|bare] [--raw FILE]

Starts the same stack as bench/run.py, drives one target with wrk (or a loop of streams with
--stream), samples that process with py-spy and prints: the share of samples inside the addon,
the addon's functions (inclusive), and the top functions by self time. py-spy is installed into
the venv on first use (it is a tool, not a dependency of the gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"
ADDON_FRAME = re.compile(r"\((?:.*/)?addon/")  # py-spy prints paths relative to the cwd when it can
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def ensure_py_spy() -> None:
    if not PY_SPY.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m["file"]
    for marker in ("site-packages/", "/addon/", "/lib/python3"):
        if marker in f:
            f = f.split(marker, 1)[1] if marker != "/addon/" else "addon/" + f.split(marker, 1)[1]
            break
    return f"{m['func']} ({f})"


def summarize(raw: str, top: int = 30) -> str:
    total = 0
    in_addon = 0
    self_time: collections.Counter = collections.Counter()
    addon_incl: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        self_time[short(frames[-1])] += n
        seen = set()
        for fr in frames:
            if ADDON_FRAME.search(fr):
                key = short(fr)
                if key not in seen:
                    addon_incl[key] += n
                    seen.add(key)
        if seen:
            in_addon += n
    out = [f"samples: {total}; inside addon/: {in_addon} ({100 * in_addon / max(total, 1):.1f}%)", "",
           "addon functions (inclusive % of all samples):"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in addon_incl.most_common(top)]
    out += ["", "top functions by self time:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in self_time.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="openai", choices=bench.SCENARIOS)
    ap.add_argument("--target", default="gateway", choices=("gateway", "bare"))
    ap.add_argument("--stream", action="store_true", help="200-event streams instead of plain requests")
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--raw", help="also keep py-spy's collapsed stacks here")
    args = ap.parse_args()
    if args.scenario not in bench.PROVIDERS:
        print(f"profile: no {args.scenario!r} provider yet", file=sys.stderr)
        return 2
    ensure_py_spy()
    stack = bench.Stack()
    try:
        stack.start()
        target = "bare_stream" if args.stream and args.target == "bare" else args.target
        spec = bench.request_spec(target, args.scenario, stream=args.stream)
        bench.wrk(stack.url(target), bench.request_spec(target, args.scenario), 4, 2, stack.tmp)  # warm-up
        stop = threading.Event()
        counted = [0]

        def load():
            if not args.stream:
                r = bench.wrk(stack.url(target), spec, args.connections, args.seconds + 2, stack.tmp)
                counted[0] = r["requests"]
                return

            async def worker():
                while not stop.is_set():
                    await bench.http_stream(stack.ports[target], spec, {"x-bench-events": "200"})
                    counted[0] += 1

            async def go():
                await asyncio.gather(*(worker() for _ in range(args.connections)))
            asyncio.run(go())

        t = threading.Thread(target=load, daemon=True)
        t.start()
        time.sleep(1)
        raw_file = Path(args.raw) if args.raw else stack.tmp / "pyspy.txt"
        subprocess.run([str(PY_SPY), "record", "--pid", str(stack.pid(target)), "--duration", str(args.seconds),
                        "--rate", str(args.rate), "--format", "raw", "-o", str(raw_file)],
                       check=True, capture_output=True)
        stop.set()
        t.join()
        print(f"{target} {args.scenario} {'stream' if args.stream else 'plain'}: {counted[0]} "
              f"{'streams' if args.stream else 'requests'} during the run")
        print(summarize(raw_file.read_text()))
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
