"""Instructions per request under callgrind: a deterministic A/B of proxy cost, immune to a busy machine.

    .venv/bin/python bench/instructions.py [--requests 200] [--scenario openai|anthropic|messages_openai|...]
                                           [--stream [--events 20]] [--cache-sim] [--set OPTION=VALUE ...] [TARGET ...]

TARGET is `bare` (mitmdump without addon), `.` (the checked-out gateway), a git revision, or a
directory holding an `addon/`; the default is `bare .`. Each target runs under
`valgrind --tool=callgrind` with instrumentation off through start-up and warm-up, then on for
N sequential keep-alive requests (--stream: streamed answers of --events SSE events each, bare
mitmdump then with stream_large_bodies=1 as in the benchmark's streaming section): the count per request repeats within about 0.1% run to run (PYTHONHASHSEED=0 unless set),
where CPU time on this shared machine varies by 10%. Counts are not time (C code such as the
JSON decoder retires far more instructions per microsecond than interpreted Python), so confirm a
win with bench/ab.py. --cache-sim adds valgrind's simulated L1 cache misses (instruction, data)
and branch mispredictions per request: code that costs more in the proxy than its instruction
count says shows up there. Needs valgrind
(Debian package `valgrind`); about 20 s per target.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402


def send(port: int, spec: tuple[str, bytes, dict], n: int) -> None:
    path, body, headers = spec
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(n):
            conn.request("POST", path, body, headers)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
    finally:
        conn.close()


def addon_dir(target: str, tmp: Path) -> Path | None:
    """The addon/ directory of a target (None: bare mitmdump)."""
    if target == "bare":
        return None
    if (Path(target) / "addon").is_dir():
        return Path(target).resolve() / "addon"
    out = tmp / target.replace("/", "_")
    archive = subprocess.run(
        ["git", "-C", str(bench.ROOT), "archive", target, "addon"], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(out, filter="data")
    return out / "addon"


def instructions_per_request(stack: bench.Stack, addon: Path | None, scenario: str, n: int, tmp: Path,
                             cache_sim: bool = False, options: list[str] = (), key: str | None = None,
                             events: int = 0) -> dict[str, float]:
    """callgrind's event counts per request: Ir (instructions), and with cache_sim I1mr, D1mr
    (L1 misses), Bcm, Bim (mispredicted conditional and indirect branches). events > 0: streamed
    requests of that many SSE events."""
    port = bench.free_port()
    name = f"cg{port}"
    if addon is None:
        args = ["--mode", f"reverse:{stack.url('fake')}@127.0.0.1:{port}", *stack.common_args(name)]
        if events:  # bare mitmdump buffers a chunked body whole unless told to stream it
            args += ["--set", "stream_large_bodies=1"]
    else:
        args = [
            "--mode",
            f"reverse:http://127.0.0.1:1@127.0.0.1:{port}",
            *stack.common_args(name),
            *stack.gateway_args(addon),
        ]
        for option in options:  # gateway options, e.g. metrics_port=9464 (metrics on)
            args[-2:-2] = ["--set", option]
    out = tmp / f"callgrind.{port}"
    sim = ["--cache-sim=yes", "--branch-sim=yes"] if cache_sim else []
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", *sim, "--instr-atstart=no", f"--callgrind-out-file={out}",
                             str(bench.MITMDUMP), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # a fixed hash seed: with a random one the same revision's count moved by up to 1%
                            # between runs (dict and set layouts), more than the changes this tool is for
                            env={**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")})
    try:
        bench.wait_port(port, proc, name, Path(os.devnull), timeout=180)
        spec = bench.request_spec("bare" if addon is None else "gateway", scenario, stream=events > 0)
        if events:
            spec = (spec[0], spec[1], {**spec[2], "x-bench-events": str(events)})
        if key is not None and addon is not None:  # another of the bench's virtual keys (e.g. vk_bench_targets3)
            spec = (spec[0], spec[1], {**spec[2], "Authorization": f"Bearer {key}"})
        send(port, spec, 30)  # warm-up: caches, first-use imports, the upstream connection
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], capture_output=True, check=True)
        send(port, spec, n)
        subprocess.run(["callgrind_control", "--instr=off", str(proc.pid)], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], capture_output=True, check=True)
    finally:
        proc.terminate()
        proc.wait(120)
    best: dict[str, int] = {}
    for path in glob.glob(f"{out}*"):
        events: list[str] = []
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith("events:"):
                    events = line.split()[1:]
                elif line.startswith(("summary:", "totals:")):
                    counts = dict(zip(events, map(int, line.split()[1:])))
                    if counts.get("Ir", 0) > best.get("Ir", 0):
                        best = counts
    return {event: count / n for event, count in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", default=["bare", "."], metavar="TARGET")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--scenario", choices=bench.SCENARIOS, default="openai")
    ap.add_argument("--stream", action="store_true", help="streamed requests (SSE answers)")
    ap.add_argument("--events", type=int, default=20, help="with --stream: SSE events per answer (default 20)")
    ap.add_argument("--cache-sim", action="store_true", help="also simulated L1 misses and branch mispredictions")
    ap.add_argument(
        "--key",
        help=f"the gateway's requests with this bench key instead (e.g. {bench.TARGETS_KEY}: three targets; {bench.BUDGET_KEY}: a budget and max_parallel)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="a gateway option for the gateway targets (repeatable), e.g. metrics_port=9464")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            print(f"instructions: {tool} not found (apt-get install valgrind)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="gw-instr-"))
    stack = bench.Stack()
    try:
        stack.start()
        first = None
        for target in args.targets:
            counts = instructions_per_request(stack, addon_dir(target, tmp), args.scenario, args.requests, tmp,
                                              args.cache_sim, args.set, args.key, args.events if args.stream else 0)
            first = counts if first is None else first
            line = f"{target:32s} {counts['Ir'] / 1e3:9.1f} k instructions/request  ({(counts['Ir'] - first['Ir']) / 1e3:+7.1f} k)"
            for event, label in (("I1mr", "I1 misses"), ("D1mr", "D1 misses"), ("Bcm", "branch mispredicts")):
                if event in counts:
                    line += (
                        f"  {label} {counts[event] / 1e3:6.1f} k ({100 * (counts[event] / first[event] - 1):+5.1f}%)"
                    )
            print(line, flush=True)
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
