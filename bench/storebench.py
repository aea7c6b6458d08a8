"""The usage store's own CPU per request, in-process: RedisStore against MemoryStore.

    .venv/bin/python bench/storebench.py [--n 20000] [--concurrency 64] [--kind rpm|budget] [--profile]

Starts a throwaway redis-server (no persistence) and runs `concurrency` tasks that each admit
requests of one key in a loop, as the gateway's hooks would: `reserve()`, then the request's
usage counted when it ends (`settle()` for a key that holds a reservation, else `add_usage()`,
queued and counted every 0.2 s as hooks/accounting.py does). Prints the gateway process's CPU
per request (what a worker pays for the store) and redis-server's (what the machine pays
besides). `--kind rpm` is the fleet benchmark's limited key (an rpm limit only); `budget` holds
a reservation (budget_tokens and max_parallel). `--profile` prints cProfile's top entries for
the RedisStore run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from addon.policy.memory_store import MemoryStore  # noqa: E402
from addon.policy.store import Demand, Limits  # noqa: E402

LIMITS = {"rpm": Limits(rpm=1_000_000_000),
          "budget": Limits(budget_tokens=10**15, max_parallel=10_000)}
FLUSH_EVERY = 0.2  # as hooks/accounting.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(store, kind: str, n: int, concurrency: int) -> None:
    limits, demand = LIMITS[kind], Demand(1000, 0.0) if kind == "budget" else Demand()
    left = [n]
    usage: list[tuple] = []

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            verdict = store.reserve("fp-bench", limits, demand, time.time())
            if not isinstance(verdict, tuple):
                verdict = await verdict
            assert verdict.refused is None, verdict
            await asyncio.sleep(0)  # the provider answers (another turn of the loop)
            if verdict.ticket is not None:
                store.settle("fp-bench", verdict.ticket, 30, 0.0, time.time())
            else:
                usage.append(time.time())

    async def accounting() -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            batch, usage[:] = list(usage), []
            for when in batch:
                store.add_usage("fp-bench", 30, 0.0, when)

    writer = asyncio.create_task(accounting())
    await asyncio.gather(*(client() for _ in range(concurrency)))
    await asyncio.sleep(FLUSH_EVERY * 1.5)
    writer.cancel()
    if hasattr(store, "_tasks") and store._tasks:
        await asyncio.wait(list(store._tasks))


def measure(
    make, kind: str, n: int, concurrency: int, redis_pid: int | None, profile: bool = False
) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        store = make()
        await drive(store, kind, min(2000, n), concurrency)  # warm-up: connections, scripts loaded
        gc.collect()
        r0 = cpu_seconds(redis_pid) if redis_pid else 0.0
        prof = cProfile.Profile() if profile else None
        t0 = time.process_time()
        if prof:
            prof.enable()
        await drive(store, kind, n, concurrency)
        if prof:
            prof.disable()
        cpu = time.process_time() - t0
        r = cpu_seconds(redis_pid) - r0 if redis_pid else 0.0
        if hasattr(store, "close"):
            await store.close()
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return cpu / n * 1e6, r / n * 1e6

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--kind", choices=sorted(LIMITS), default="rpm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        print("storebench: redis-server is not installed", file=sys.stderr)
        return 1
    from addon.policy.redis_store import RedisStore

    tmp = Path(tempfile.mkdtemp(prefix="gw-storebench-"))
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        url = f"redis://127.0.0.1:{port}/0"
        mem, red, red_server = [], [], []
        for rnd in range(args.rounds):
            mem.append(measure(MemoryStore, args.kind, args.n, args.concurrency, None)[0])
            gw, srv = measure(lambda: RedisStore(url, f"bench{rnd}:"), args.kind, args.n, args.concurrency, proc.pid,
                              args.profile and rnd == args.rounds - 1)
            red.append(gw)
            red_server.append(srv)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(f"{args.kind} key, {args.concurrency} at once, {args.n} requests, median of {args.rounds}: "
              f"MemoryStore {med(mem):.1f} us/request; RedisStore {med(red):.1f} us/request in the gateway "
              f"+ {med(red_server):.1f} us in redis-server")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
