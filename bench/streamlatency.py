"""The benchmark's `stream_latency` section (bench/run.py --only stream_latency): what each proxy
adds to every chunk of N concurrent streams, for bare mitmdump, one gateway and the fleet.

The fake provider stamps every content event with the time it wrote it (CLOCK_MONOTONIC, one
clock for every process on the machine; bench/fakeprovider.py, x-bench-stamp); the client
subtracts the stamp from the time it read the event. Per N (run.py's Settings.latency_streams):

1. N streams are opened on kept-alive connections (reused by later rounds and counts), at most
   `RAMP_PARALLEL` waiting for their first chunk at a time. Each sends a stamped event every
   N / latency_rate seconds, so the proxies forward the same number of chunks per second at
   every N: what changes is how many streams are open, not how busy the machine is.
2. Once all N are open: for latency_window_s seconds every chunk stamped in the window counts
   (client receive time minus provider send time: p50, p99). Meanwhile probes, one at a time,
   measure the first chunk of a new stream: from the request's send to its first stamped event
   (TTFC, what a user waits for), and that event's own delay (receive minus stamp).
3. POST /bench/end to the fake provider: every stream ends at once, as a stream ends.

The targets compare the fleet with one gateway (per chunk) and with bare mitmdump (first chunk)
at 1,000 streams, measured in latency_rounds rounds there (one at the other counts), the order of
the targets alternating, each difference taken within a round: the median of the rounds in which
all N streams were open and completed. The client and the fake provider add their own delay to
every number; it is the same for each target, so the differences are what a proxy adds.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.supervisor import READY_PREFIX  # noqa: E402

STAMP = re.compile(rb'T(\d{19})"')
RAMP_PARALLEL = 32  # streams waiting for their first chunk at once
PROBE_PAUSE_S = 0.05  # between two probes
# the provider's pause after a probe's first event: a proxy that holds a chunk until more data
# comes (HAProxy without http-no-delay) holds that event this long, and TTFC shows it
PROBE_FIRST_MS = 50
AT = 1000  # the targets' stream count
WARM_UP_STREAMS = 8
END_MARGIN_S = 10
MIN_RAMP_S = 5  # what a ramp gets when the section's budget is spent


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


class Pool:
    """Kept-alive client connections to one target, as an SDK keeps them. A new connection costs
    mitmdump several ms of CPU (more than a request on one kept alive): paid once per connection
    here, not once per stream, which keeps the run short."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """(reader, writer, reused)"""
        while self.idle:
            reader, writer = self.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        return reader, writer, False

    def put(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.idle.append((reader, writer))

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class Stream:
    """One streamed request; every stamped event's delay, as it is read."""

    def __init__(self, request: bytes, cell: "Cell") -> None:
        self.request, self.cell = request, cell
        self.first = asyncio.get_running_loop().create_future()  # (ttfc ns, first event's delay ns)
        self.status, self.head, self.complete, self.error, self.received = 0, b"", False, "", 0

    async def run(self, pool: Pool) -> None:
        for attempt in range(2):
            try:
                reader, writer, reused = await pool.get()
            except OSError as e:
                return self.fail(repr(e))
            keep, error = False, ""
            try:
                await self.exchange(reader, writer)
            except (OSError, ValueError, IndexError) as e:
                error = repr(e)
            try:
                if not self.received and reused and attempt == 0:
                    continue  # a kept-alive connection the proxy closed meanwhile: once more, on a new one
                keep = self.complete and b"\r\nconnection: close" not in self.head.lower()
                if not self.complete:
                    self.fail(error or (f"status {self.status}" if self.status != 200 else "the stream ended early"))
                return
            finally:
                if keep:
                    pool.put(reader, writer)
                else:
                    writer.close()

    async def exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send the request, read the answer to its end (self.received: the bytes read)."""
        sent = time.monotonic_ns()
        writer.write(self.request)
        buf, pos = bytearray(), 0
        while True:
            data = await reader.read(1 << 16)
            now = time.monotonic_ns()
            if not data:
                return
            self.received += len(data)
            buf += data
            if not self.head and b"\r\n\r\n" in buf:
                self.head = bytes(buf[:buf.find(b"\r\n\r\n")])
                self.status = int(self.head.split(b" ", 2)[1])
            for m in STAMP.finditer(buf, pos):
                stamp = int(m.group(1))
                if not self.first.done():
                    self.first.set_result((now - sent, now - stamp))
                elif self.cell.window[0] <= stamp < self.cell.window[1]:
                    self.cell.delays.append(now - stamp)
                pos = m.end()
            if buf.endswith(b"\r\n0\r\n\r\n"):  # (answers that are not a 200 stream: no reuse, below)
                self.complete = self.status == 200
                return
            if pos > 1 << 15:
                del buf[:pos]
                pos = 0

    def fail(self, error: str) -> None:
        self.error = error
        if not self.first.done():
            self.first.set_result(None)


class Cell:
    """N streams through one target: the window's per-chunk delays."""

    def __init__(self) -> None:
        self.window = (1 << 63, 1 << 63)  # (start, end) ns: no chunk counts until the window is set
        self.delays: list[int] = []


def request(port: int, spec: tuple[str, bytes, dict], extra: dict[str, str]) -> bytes:
    path, body, headers = spec
    head = [f"POST {path} HTTP/1.1", f"host: 127.0.0.1:{port}", "content-type: application/json",
            f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in {**headers, **extra}.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def measure(pools: tuple[Pool, Pool], spec, fake_port: int, n: int, gap_ms: int, window_s: float,
                  deadline: float) -> dict:
    """N open-ended streams through the target of `pools` (streams, probes), then the window. The
    window begins when all are open, or at `deadline` (time.monotonic()) with those open then
    (at least MIN_RAMP_S after the start)."""
    pool, probe_pool = pools
    cell = Cell()
    long_req = request(pool.port, spec, {"x-bench-stamp": "1", "x-bench-open": "1", "x-bench-gap-ms": str(gap_ms)})
    probe_req = request(pool.port, spec,
                        {"x-bench-stamp": "1", "x-bench-events": "3", "x-bench-first-ms": str(PROBE_FIRST_MS)})
    gate = asyncio.Semaphore(RAMP_PARALLEL)

    stopping = False

    async def opened(stream: Stream) -> None:
        task = None
        try:
            async with gate:
                if stopping:  # not opened before the window ended (a machine too busy)
                    return stream.fail("not opened in time")
                task = asyncio.create_task(stream.run(pool))
                await asyncio.wait([stream.first, task], return_when=asyncio.FIRST_COMPLETED)
            await task
        finally:
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    t0 = time.monotonic()
    streams = [Stream(long_req, cell) for _ in range(n)]
    tasks = [asyncio.create_task(opened(s)) for s in streams]
    probes: list[tuple[int, int]] = []
    probe_errors: list[str] = []
    try:
        # (a machine too busy to open them all in time: the window starts with those open)
        await asyncio.wait([s.first for s in streams], timeout=max(MIN_RAMP_S, deadline - time.monotonic()))
        ramp_s = time.monotonic() - t0
        open_at_window = sum(1 for s in streams if s.first.done() and s.first.result() is not None)
        start = time.monotonic_ns() + min(gap_ms // 2, 200) * 1_000_000  # (the last opened have settled)
        cell.window = (start, start + int(window_s * 1e9))
        while time.monotonic_ns() < cell.window[1]:
            probe = Stream(probe_req, Cell())
            await asyncio.wait_for(probe.run(probe_pool), 30)
            if probe.first.result() is not None and probe.complete:
                if time.monotonic_ns() > start:
                    probes.append(probe.first.result())
            else:
                probe_errors.append(probe.error)
            await asyncio.sleep(PROBE_PAUSE_S)
    finally:
        stopping = True
        await end_streams(fake_port)
        # every stream ends at once; those still open after a margin are cut (not completed)
        _, late = await asyncio.wait(tasks, timeout=END_MARGIN_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ms = lambda ns: ns / 1e6 if ns is not None else None  # noqa: E731
    failed = [s.error or "still open at the end" for s in streams if not s.complete]
    return {
        "streams": n, "gap_ms": gap_ms, "ramp_s": ramp_s, "window_s": window_s, "open_at_window": open_at_window,
        "completed": n - len(failed), "errors": sorted(set(failed + probe_errors))[:5], "chunks": len(cell.delays),
        "chunk_p50_ms": ms(percentile(cell.delays, 0.5)), "chunk_p99_ms": ms(percentile(cell.delays, 0.99)),
        "probes": len(probes),
        "first_chunk_p50_ms": ms(percentile([p[0] for p in probes], 0.5)),
        "first_chunk_p99_ms": ms(percentile([p[0] for p in probes], 0.99)),
        "first_chunk_delay_p50_ms": ms(percentile([p[1] for p in probes], 0.5)),
    }


async def end_streams(fake_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_port)
    writer.write(b"POST /bench/end HTTP/1.1\r\nhost: fake\r\ncontent-length: 0\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


class Fleet:
    """GATEWAY_WORKERS=N as run.sh starts it (fleet/supervisor.py: HAProxy, a local redis-server),
    its workers the stack's gateway."""

    def __init__(self, stack, workers: int) -> None:
        from run import MITMDUMP, free_port
        self.tmp = stack.tmp / "stream-latency-fleet"
        self.tmp.mkdir(exist_ok=True)
        self.port = free_port()
        args = [a.replace("usage-", "usage-fleet-") if a.startswith("usage_db=") else a
                for a in stack.gateway_args(ROOT / "addon")]
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.log = self.tmp / "fleet.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.supervisor", "--workers", str(workers), "--port", str(self.port),
             "--drain-s", "1", "--state-dir", str(self.tmp / "state"), "--mitmdump", str(MITMDUMP),
             "--", "--set", "connection_strategy=lazy", "--set", f"confdir={self.tmp / 'confdir'}", *args],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
        deadline = time.monotonic() + 90
        while READY_PREFIX.encode() not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fleet did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)  # the second: no drain
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def section(stack, s, with_fleet: bool = True) -> dict:
    from run import request_spec
    out: dict = {"rate_per_s": s.latency_rate, "window_s": s.latency_window_s, "at": AT}
    missing = [tool for tool in ("haproxy", "redis-server") if shutil.which(tool) is None]
    fleet = None
    if not with_fleet:
        out["fleet"] = {"available": False,
                        "reason": "--quick alone skips the fleet (--only stream_latency --quick runs it)"}
    elif missing:
        out["fleet"] = {"available": False, "reason": f"not installed: {', '.join(missing)}"}
    else:
        workers = max(2, os.cpu_count() or 2)
        fleet = Fleet(stack, workers)
        out["fleet"] = {"available": True, "workers": workers}
    ports = {"bare": stack.ports["bare_stream"], "gateway": stack.ports["gateway"]}
    if fleet:
        ports["fleet"] = fleet.port
    specs = {"bare": request_spec("bare", "openai", stream=True),
             "gateway": request_spec("gateway", "openai", stream=True)}
    specs["fleet"] = specs["gateway"]
    try:
        out["cells"], skipped = asyncio.run(cells(s, ports, specs, stack.ports["fake"]))
        if skipped:
            out["skipped"] = skipped
    finally:
        if fleet:
            fleet.stop()
    return out


async def cells(s, ports: dict[str, int], specs: dict, fake_port: int) -> tuple[dict, list[int]]:
    pools = {name: (Pool(port), Pool(port)) for name, port in ports.items()}
    out: dict = {}
    skipped: list[int] = []
    try:
        deadline = time.monotonic() + s.latency_budget_s
        for name in ports:  # warm-up (imports, first connections; the fleet's workers are new)
            await measure(pools[name], specs[name], fake_port, WARM_UP_STREAMS, 50, 0.1, deadline)
        for i, n in enumerate(s.latency_streams):
            if time.monotonic() > deadline:
                skipped.append(n)
                print(f"  {n} streams: skipped, the section ran past its budget of {s.latency_budget_s:g} s "
                      "(the machine is too busy for these numbers to mean much)", flush=True)
                continue
            gap_ms = max(1, round(n * 1000 / s.latency_rate))
            # bare mitmdump up to s.latency_bare_max streams: opening a stream costs it about as much
            # CPU as the gateway (5 ms here), 30 s and more for 5,000, and the targets need it at 1,000
            names = [name for name in ports if name != "bare" or n <= s.latency_bare_max]
            rounds: dict[str, list] = {name: [] for name in names}
            n_rounds = s.latency_rounds if n == AT else 1
            # what is left of the budget, shared by this cell's ramps alike (each at least MIN_RAMP_S)
            allowance = max(MIN_RAMP_S, (deadline - time.monotonic()) / (n_rounds * len(names)))
            for rnd in range(n_rounds):
                if rnd and time.monotonic() > deadline:
                    break  # (a cell measured once at least)
                # each round alternates the order, so a slow stretch of the machine falls on each side
                for name in names if (i + rnd) % 2 == 0 else names[::-1]:
                    r = await measure(pools[name], specs[name], fake_port, n, gap_ms, s.latency_window_s,
                                      time.monotonic() + allowance)
                    rounds[name].append(r)
                    print(f"  {n:5d} streams {name:8s} ramp {r['ramp_s']:5.1f} s  "
                          f"per chunk p50 {fmt_ms(r['chunk_p50_ms'])} p99 {fmt_ms(r['chunk_p99_ms'])} "
                          f"({r['chunks']} chunks)  first chunk p50 {fmt_ms(r['first_chunk_p50_ms'])} "
                          f"({r['probes']} probes)  completed {r['completed']}/{n}", flush=True)
                    if not whole(r):
                        print(f"  ({r['open_at_window']} of {n} open when the window began, "
                              f"{r['completed']} completed: the machine is too busy; this round is left out "
                              "of the differences)", flush=True)
                    if n == s.latency_streams[-1]:
                        pools[name][0].close()  # its last cell: free the connections (file descriptors)
            row = out[str(n)] = {name: summary(rs) for name, rs in rounds.items()}
            # what a proxy adds over the one before it: per round (the two measured back to back), median
            bare = rounds.get("bare", [])
            if bare:
                row["gateway_added"] = added(rounds["gateway"], bare, bare)
            if "fleet" in rounds:
                row["fleet_added"] = added(rounds["fleet"], rounds["gateway"], bare)
    finally:
        for stream_pool, probe_pool in pools.values():
            stream_pool.close()
            probe_pool.close()
    return out, skipped


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summary(rs: list[dict]) -> dict:
    """One target's rounds at one N: medians of the rounds (one round: its numbers)."""
    out = {k: median([r[k] for r in rs]) for k in rs[0] if k.endswith("_ms") or k in ("ramp_s", "gap_ms", "window_s")}
    out.update(streams=rs[0]["streams"], open_at_window=min(r["open_at_window"] for r in rs),
               completed=min(r["completed"] for r in rs), chunks=sum(r["chunks"] for r in rs),
               probes=sum(r["probes"] for r in rs), errors=sorted({e for r in rs for e in r["errors"]})[:5])
    if len(rs) > 1:
        out["rounds"] = rs
    return out


def whole(r: dict) -> bool:
    """All N streams were open when the window began, and all completed: else the machine was
    too busy to open them in time, and the numbers say more about it than about the proxy."""
    return r["open_at_window"] == r["streams"] == r["completed"]


def added(rs: list[dict], base: list[dict], bare: list[dict]) -> dict:
    """What `rs` adds over `base` (per chunk) and over `bare` (first chunk), round by round (rounds
    where both sides were whole): median; None when no round was."""
    def minus(key: str, a: list[dict], b: list[dict]) -> float | None:  # (b empty: None)
        return median([x[key] - y[key] for x, y in zip(a, b) if whole(x) and whole(y)
                       and x[key] is not None and y[key] is not None])
    return {"chunk_p50_ms": minus("chunk_p50_ms", rs, base), "chunk_p99_ms": minus("chunk_p99_ms", rs, base),
            "first_chunk_over_bare_ms": minus("first_chunk_p50_ms", rs, bare)}


def fmt_ms(v) -> str:
    return f"{v:6.2f} ms" if v is not None else "     - ms"


def targets(res: dict, add) -> None:
    sl = res.get("stream_latency")
    if not sl:
        return
    for n, row in sl["cells"].items():
        for name in ("bare", "gateway", "fleet"):
            if name in row:
                add(f"stream latency {n} streams: {name} streams all complete", row[name]["completed"], f"== {n}",
                    row[name]["completed"] == int(n))
    if not sl["fleet"]["available"]:
        return
    a = sl["cells"].get(str(AT), {}).get("fleet_added") or {}  # (none: skipped, or not in this run's counts)
    p50, p99, first = a.get("chunk_p50_ms"), a.get("chunk_p99_ms"), a.get("first_chunk_over_bare_ms")
    name = f"stream latency {AT} streams: fleet"
    add(f"{name} over one gateway, per chunk p50 (ms)", p50, "<= 1", p50 is not None and p50 <= 1)
    add(f"{name} over one gateway, per chunk p99 (ms)", p99, "<= 10", p99 is not None and p99 <= 10)
    add(f"{name} first chunk over bare, p50 (ms)", first, "<= 1", first is not None and first <= 1)


def rows(res: dict) -> list[tuple[str, str, str, str]]:
    from run import fmt
    sl = res.get("stream_latency")
    if not sl:
        return []
    out = []
    for n, row in sl["cells"].items():
        fa = row.get("fleet_added")
        for key, label, over in (("chunk_p50_ms", "per chunk p50", "chunk_p50_ms"),
                                 ("chunk_p99_ms", "per chunk p99", "chunk_p99_ms"),
                                 ("first_chunk_p50_ms", "first chunk (TTFC) p50", "first_chunk_over_bare_ms")):
            fleet = (f"fleet {fmt(row['fleet'][key])} ({'+' if (fa[over] or 0) >= 0 else ''}{fmt(fa[over])} "
                     f"over {'bare' if over.endswith('bare_ms') else 'gw'})") if fa else ""
            bare = fmt(row["bare"][key]) if "bare" in row else "n/a"
            out.append((f"{n} streams, added latency {label} ms", bare, fmt(row["gateway"][key]), fleet))
    if not sl["fleet"]["available"]:
        out.append(("stream latency: fleet", "", "", f"n/a: {sl['fleet']['reason']}"))
    if sl.get("skipped"):
        out.append(("stream latency: skipped (past the time budget)", "", "",
                    f"{', '.join(map(str, sl['skipped']))} streams"))
    return out
