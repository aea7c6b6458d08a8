"""A/B the gateway against an older revision of itself, in one run: proxy CPU per request.

    .venv/bin/python bench/ab.py REV [REV ...] [--rounds 4] [--duration 3] [--connections 16] [--scenario S]

Starts bare mitmdump, the gateway as checked out, and the gateway from each git revision REV (its
addon/ directory exported to a temporary directory) or directory REV (holding an addon/), all in front of the same fake provider, and runs
wrk against each in alternating order. Prints proxy CPU per request (from /proc/PID/stat) and
req/s, per scenario: the before/after numbers for a hot-path change.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revs", nargs="+", metavar="REV",
                    help="git revisions to compare against (e.g. main, HEAD~2), or directories holding an addon/")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--scenario", choices=bench.SCENARIOS, help="only this scenario (default: all)")
    args = ap.parse_args()
    if not bench.shutil.which("wrk"):
        print("ab: wrk not found (./run.sh bench installs it)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gw-ab-"))
    others: dict[str, Path] = {}  # target name -> a directory holding that version's addon/
    for i, rev in enumerate(args.revs):
        if (Path(rev) / "addon").is_dir():
            others[f"v{i}"] = Path(rev).resolve()
            continue
        others[f"v{i}"] = tmp / f"v{i}"
        archive = subprocess.run(
            ["git", "-C", str(bench.ROOT), "archive", rev, "addon"], capture_output=True, check=True
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp / f"v{i}", filter="data")
    labels = {"bare": "bare mitmdump", "gateway": "gateway (worktree)"}
    stack = bench.Stack()
    try:
        stack.start()
        for (name, root), rev in zip(others.items(), args.revs):
            port = bench.free_port()
            labels[name] = f"gateway@{rev}"
            proc = stack._spawn(name, [str(bench.MITMDUMP), "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{port}",
                                       *stack.common_args(name), *stack.gateway_args(root / "addon")])
            stack.ports[name] = port
            bench.wait_port(port, proc, labels[name], stack.tmp / f"{name}.log")
        targets = ("bare", *others, "gateway")
        for scenario in [s for s in bench.SCENARIOS if s in bench.PROVIDERS and args.scenario in (None, s)]:
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
                label = labels[t]
                extra = f"  (+{cpu - base:4.0f} us over bare)" if t != "bare" else ""
                print(f"  {label:24s} {cpu:6.0f} us CPU/request{extra}  {rps:6.0f} req/s")
    finally:
        stack.stop()
        bench.shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
