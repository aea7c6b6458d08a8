"""A/B the gateway against an older revision of itself, in one run: proxy CPU per request.

    .venv/bin/python bench/ab.py REV [--rounds 4] [--duration 3] [--connections 16]

Starts bare mitmdump, the gateway as checked out, and the gateway from git revision REV (its addon/
directory exported to a temporary directory), all in front of the same fake provider, and runs
wrk against each in alternating order. Prints proxy CPU per request (from /proc/PID/stat) and
req/s, per scenario: the before/after numbers for a hot-path change.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="git revision to compare against (e.g. main, HEAD~2)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    if not bench.shutil.which("wrk"):
        print("ab: wrk not found (./run.sh bench installs it)", file=sys.stderr)
        return 2
    old = Path(tempfile.mkdtemp(prefix="gw-ab-"))
    archive = subprocess.run(["git", "-C", str(bench.ROOT), "archive", args.rev, "addon"], capture_output=True, check=True)
    with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
        tar.extractall(old, filter="data")
    stack = bench.Stack()
    try:
        stack.start()
        port = bench.free_port()
        name = f"gateway@{args.rev}"
        proc = stack._spawn("old", [str(bench.MITMDUMP), "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{port}",
                                    *stack.common_args("old"), *stack.gateway_args(old / "addon")])
        stack.ports["old"] = port
        bench.wait_port(port, proc, name, stack.tmp / "old.log")
        targets = ("bare", "old", "gateway")
        for scenario in [s for s in bench.SCENARIOS if s in bench.PROVIDERS]:
            def spec(t):
                return bench.request_spec("bare" if t == "bare" else "gateway", scenario)
            runs: dict[str, list] = {t: [] for t in targets}
            for t in targets:
                bench.wrk(stack.url(t), spec(t), 4, 1, stack.tmp)  # warm-up
            for rnd in range(args.rounds):
                for t in (targets if rnd % 2 == 0 else targets[::-1]):
                    r = bench.wrk(stack.url(t), spec(t), args.connections, args.duration, stack.tmp, stack.pid(t))
                    if r["error_count"]:
                        raise RuntimeError(f"{t}: {r['errors']}")
                    runs[t].append(r)
            base = bench.median([r["cpu_us_per_request"] for r in runs["bare"]])
            print(f"{scenario} (c={args.connections}, {args.rounds} rounds, medians):")
            for t in targets:
                cpu = bench.median([r["cpu_us_per_request"] for r in runs[t]])
                rps = bench.median([r["rps"] for r in runs[t]])
                label = {"bare": "bare mitmdump", "old": name, "gateway": "gateway (worktree)"}[t]
                extra = f"  (+{cpu - base:4.0f} us over bare)" if t != "bare" else ""
                print(f"  {label:24s} {cpu:6.0f} us CPU/request{extra}  {rps:6.0f} req/s")
    finally:
        stack.stop()
        bench.shutil.rmtree(old, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
