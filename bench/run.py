"""The gateway benchmark: gateway vs bare mitmdump, in one run, alternating so noise hits both.

    ./run.sh bench [--quick] [--out FILE] [--rounds N] [--duration S]

Starts bench/fakeprovider.py (fast fixed answers), bare mitmdump in reverse mode (no addon) in front
of it, a second bare mitmdump with stream_large_bodies=1 (bare mitmdump buffers chunked bodies, so
streams need it to be passed through at all), and the gateway (addon/gateway.py, a generated keys
file pointing at the fake). Measures throughput/latency with wrk (bench/post.lua), streaming
time-to-first-chunk with an asyncio client, 1,000 concurrent streams, memory over many requests, and
the stream translator's CPU per event in-process. Prints a table, writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from addon.providers.registry import PROVIDERS  # noqa: E402
from addon.translate.registry import PAIRS  # noqa: E402
from fakeprovider import anthropic_events, openai_events  # noqa: E402
import fleetbench as fleet_bench  # noqa: E402  (bench/fleetbench.py: the fleet section)
import guardrails as guard_bench  # noqa: E402  (bench/guardrails.py: the guardrails section)
import largebody as large_body  # noqa: E402  (bench/largebody.py: the large_body section)
import streamlatency as stream_latency  # noqa: E402  (bench/streamlatency.py: per-chunk latency, fleet included)

MITMDUMP = Path(sys.executable).parent / "mitmdump"
SCENARIOS = ("openai", "anthropic", "messages_openai", "messages_anthropic")
# scenario -> the key's provider; messages_*: clients speak Anthropic's Messages API to the
# gateway (translated to an OpenAI provider, or passed through to Anthropic), while bare
# mitmdump carries the provider's own API
SCENARIO_PROVIDER = {
    "openai": "openai",
    "anthropic": "anthropic",
    "messages_openai": "openai",
    "messages_anthropic": "anthropic",
}
SECTIONS = (
    "translator",
    "direct",
    "throughput",
    "memory",
    "streaming",
    "concurrent_streams",
    "metrics",
    "failover",
    "large_body",
    "guardrails",
    "stream_latency",
    "fleet",
)
ANTHROPIC_MODEL = "claude-3-5-haiku-20241022"
# what the official SDKs send besides auth (openai-python 1.x): real header counts matter, since
# every mitmproxy Headers lookup scans all fields
SDK_HEADERS = {"accept": "application/json", "user-agent": "OpenAI/Python 1.54.0", "x-stainless-lang": "python",
               "x-stainless-package-version": "1.54.0", "x-stainless-os": "Linux", "x-stainless-arch": "x64",
               "x-stainless-runtime": "CPython", "x-stainless-runtime-version": "3.12.1",
               "x-stainless-async": "false", "x-stainless-retry-count": "0", "x-stainless-read-timeout": "600"}
MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Settings:
    rounds: int = 5  # alternating bare/gateway rounds per (scenario, connections)
    duration: float = 3.0  # seconds per wrk round
    connections: tuple[int, ...] = (1, 16, 64)
    stream_iterations: int = 40  # sequential 200-event streams per target
    stream_events: int = 200
    stream_first_ms: int = 5  # provider pause after the first event: TTFC is not masked by the burst
    concurrent_streams: int = 1000
    concurrent_events: int = 20
    concurrent_gap_ms: int = 250  # 20 events x 250 ms: every stream stays open ~5 s
    memory_requests: int = 50_000  # per target
    translator_repeats: int = 200  # in-process 200-event streams
    latency_streams: tuple[int, ...] = (100, 1000, 5000)  # stream_latency: concurrent streams per cell
    latency_rate: int = 1000  # stamped chunks per second over all the streams (each: one every N/rate s)
    latency_window_s: float = 2.0  # chunks counted once all N are open
    latency_rounds: int = 3  # rounds at 1,000 streams (the targets' cell); one at the other counts
    latency_budget_s: float = 150  # shared by the ramps; then no count begins (a machine too busy)
    latency_bare_max: int = 1000  # bare mitmdump is measured up to this many streams (opening them costs)
    large_burst: int = 24  # large_body: ~31 MB requests sent at once by one rpm-5 key


QUICK = Settings(rounds=1, duration=1.0, connections=(1, 16), stream_iterations=5, concurrent_streams=50,
                 concurrent_events=6, concurrent_gap_ms=50, memory_requests=2000, translator_repeats=20,
                 latency_streams=(30,), latency_rate=1000, latency_window_s=0.3, latency_rounds=1,
                 latency_budget_s=60, large_burst=8)


# --- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start-up:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout}s")


def rss_mb(pid: int) -> float:
    """Resident memory from /proc (psutil is not a dependency)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class RssSampler:
    """Peak resident memory of a process while a block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mb(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


class Stack:
    """fake provider + bare mitmdump + bare streaming mitmdump + gateway, torn down on exit."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                                stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def start(self) -> "Stack":
        fake = subprocess.Popen([sys.executable, str(BENCH / "fakeprovider.py")], stdout=subprocess.PIPE,
                                stderr=open(self.tmp / "fake.log", "wb"), cwd=ROOT)
        self.procs["fake"] = fake
        line = fake.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"fake provider did not start: {(self.tmp / 'fake.log').read_text()}")
        self.ports["fake"] = int(line.split()[1])
        fake_url = self.url("fake")

        keys = {"virtual_keys": {}}
        for scenario in available_scenarios():
            provider = SCENARIO_PROVIDER[scenario]
            # keep the provider's own base path (/v1 or none) so the upstream path is the real one
            base_path = urlsplit(PROVIDERS[provider].default_base_url).path
            keys["virtual_keys"][f"vk_bench_{scenario}"] = {
                "provider": provider, "api_key": f"sk-bench-{provider}-0000000000", "base_url": fake_url + base_path}
        # the large_body section's burst: a key limited to a few requests a minute
        keys["virtual_keys"][large_body.BURST_KEY] = {"provider": "openai", "api_key": "sk-bench-rpm-0000000000",
                                                      "base_url": fake_url + "/v1", "rpm": large_body.BURST_RPM}
        # a key that reserves (budget and max_parallel, never reached): instructions.py --key vk_bench_budget
        keys["virtual_keys"][BUDGET_KEY] = {
            "provider": "openai",
            "api_key": "sk-bench-budget-0000000000",
            "base_url": fake_url + "/v1",
            "budget_tokens": 10**15,
            "max_parallel": 10**6,
        }
        (self.tmp / "keys.json").write_text(json.dumps(keys))
        # the failover section: a key with three healthy targets at the same fake provider, in a
        # file of its own for the gateways whose keys file takes `targets` (older revisions: not)
        keys["virtual_keys"][TARGETS_KEY] = {
            "targets": [
                {"provider": "openai", "api_key": f"sk-bench-target{i}-0000000000", "base_url": fake_url + "/v1"}
                for i in range(3)
            ]
        }
        (self.tmp / "keys-targets.json").write_text(json.dumps(keys))

        self.restart("bare", "bare_stream", "gateway")
        return self

    def restart(self, *names: str) -> None:
        """(Re)start these proxies, each on a new port, and wait until they listen."""
        fake_url = self.url("fake")
        for name in names:
            old = self.procs.get(name)
            if old is not None and old.poll() is None:
                old.terminate()
                old.wait(10)
            self.ports[name] = port = free_port()
            # the same options as ./run.sh, the addon being the only difference
            cmd = {
                "bare": ["--mode", f"reverse:{fake_url}@127.0.0.1:{port}"],
                "bare_stream": ["--mode", f"reverse:{fake_url}@127.0.0.1:{port}", "--set", "stream_large_bodies=1"],
                "gateway": [
                    "--mode",
                    f"reverse:http://127.0.0.1:1@127.0.0.1:{port}",
                    *self.gateway_args(ROOT / "addon"),
                ],
                # the metrics section: the same gateway with its Prometheus listener on
                "gateway_metrics": [
                    "--mode",
                    f"reverse:http://127.0.0.1:1@127.0.0.1:{port}",
                    *self.gateway_args(ROOT / "addon"),
                    "--set",
                    f"metrics_port={free_port()}",
                ],
            }[name]
            self._spawn(name, [str(MITMDUMP), *cmd, *self.common_args(name)])
        for name in names:
            wait_port(self.ports[name], self.procs[name], name, self.tmp / f"{name}.log")

    def common_args(self, name: str) -> list[str]:
        # a confdir each: mitmdumps starting at once would race writing the same new CA files
        return ["--set", "connection_strategy=lazy", "--set", f"confdir={self.tmp / ('confdir-' + name)}"]

    def gateway_args(self, addon_dir: Path) -> list[str]:
        """Options for a gateway whose code is in addon_dir: the bench's keys, and a throwaway
        usage ledger (never the user's usage.sqlite3), when that version has one."""
        # flow_detail=0 as run.sh: the gateway's access line replaces mitmdump's per-flow line
        keys_file = "keys-targets.json" if has_targets(addon_dir) else "keys.json"
        args = ["--set", f"keys_file={self.tmp / keys_file}", "--set", "flow_detail=0"]
        # the accounting module has moved between revisions (addon/, usage/, hooks/): look for it
        if any('"usage_db"' in f.read_text() for f in addon_dir.rglob("accounting.py")):
            args += ["--set", f"usage_db={self.tmp / ('usage-' + addon_dir.parent.name + '.sqlite3')}"]
        return args + ["-s", str(addon_dir / "gateway.py")]

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- requests --------------------------------------------------------------------------------

def available_scenarios() -> list[str]:
    """The scenarios this checkout can serve (older revisions: no Messages API, no Anthropic)."""
    from addon.apis.registry import ENDPOINTS  # noqa: E402 (absent before the inbound-API seam)
    return [sc for sc in SCENARIOS if SCENARIO_PROVIDER[sc] in PROVIDERS
            and (not sc.startswith("messages_") or "/v1/messages" in ENDPOINTS)]


def request_spec(target: str, scenario: str, stream: bool = False) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of the same logical request as the client of `target` sends it."""
    if scenario.startswith("messages_"):
        if target == "gateway":  # an anthropic-SDK client: Messages API, x-api-key
            body = {"model": ANTHROPIC_MODEL if scenario == "messages_anthropic" else "gpt-4o-mini", "max_tokens": 64,
                    "system": MESSAGES[0]["content"], "messages": MESSAGES[1:]}
            if stream:
                body["stream"] = True
            return "/v1/messages", json.dumps(body).encode(), {**SDK_HEADERS, "x-api-key": f"vk_bench_{scenario}",
                                                               "anthropic-version": "2023-06-01"}
        scenario = SCENARIO_PROVIDER[scenario]  # bare: the provider's own API, as below
    if target == "gateway" or scenario == "openai":
        model = "gpt-4o-mini" if scenario == "openai" else ANTHROPIC_MODEL
        body: dict = {"model": model, "messages": MESSAGES, "max_tokens": 64}
        if stream:
            body["stream"] = True
        key = f"vk_bench_{scenario}" if target == "gateway" else "sk-bench-openai-0000000000"
        return "/v1/chat/completions", json.dumps(body).encode(), {**SDK_HEADERS, "Authorization": f"Bearer {key}"}
    # bare mitmdump in front of Anthropic: the client speaks Anthropic's API itself
    body = {"model": ANTHROPIC_MODEL, "max_tokens": 64, "system": MESSAGES[0]["content"], "messages": MESSAGES[1:]}
    if stream:
        body["stream"] = True
    return "/v1/messages", json.dumps(body).encode(), {**SDK_HEADERS, "x-api-key": "sk-bench-anthropic-0000000000",
                                                       "anthropic-version": "2023-06-01"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


CLK_TCK = os.sysconf("SC_CLK_TCK")


def wrk(url: str, spec: tuple[str, bytes, dict], connections: int, duration: float, tmp: Path,
        pid: int | None = None) -> dict:
    path, body, headers = spec
    body_file = tmp / "body.json"
    body_file.write_bytes(body)
    env = {**os.environ, "BENCH_PATH": path, "BENCH_BODY": str(body_file),
           "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in headers.items())}
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
           "-s", str(BENCH / "post.lua"), url]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
    cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            r = json.loads(line[len("BENCHJSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
            r["error_count"] = sum(r["errors"].values())
            # the proxy's own CPU per request: far steadier than req/s on a shared machine
            r["cpu_us_per_request"] = cpu / r["requests"] * 1e6 if pid and r["requests"] else None
            return r
    raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")


async def http_stream(port: int, spec: tuple[str, bytes, dict], extra: dict[str, str] | None = None,
                      opened: list | None = None) -> dict:
    """One POST; reads a chunked (or content-length) body. Times to first body byte and to the end."""
    path, body, headers = spec
    head = [f"POST {path} HTTP/1.1", f"host: 127.0.0.1:{port}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    head += [f"{k}: {v}" for k, v in {**headers, **(extra or {})}.items()]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        t0 = time.perf_counter()
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        resp_head = await reader.readuntil(b"\r\n\r\n")
        if opened is not None:
            opened[0] += 1
            opened[1] = max(opened[1], opened[0])
        status = int(resp_head.split(b" ", 2)[1])
        lower = resp_head.lower()
        first = None
        data = bytearray()
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunk = await reader.readexactly(size + 2)
                if first is None:
                    first = time.perf_counter()
                data += chunk[:-2]
        else:
            i = lower.find(b"content-length:")
            n = int(lower[i + 15:lower.find(b"\r\n", i)]) if i >= 0 else -1
            data += await (reader.readexactly(n) if n >= 0 else reader.read())
            first = time.perf_counter()
        end = time.perf_counter()
        if opened is not None:
            opened[0] -= 1
        return {"status": status, "ttfc": (first or end) - t0, "total": end - t0, "bytes": len(data),
                "events": data.count(b"data:"), "done": data.rstrip().endswith(b"[DONE]") or b"message_stop" in data}
    finally:
        writer.close()


# --- measurements ----------------------------------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]  # (a wrk window that completed no request has no CPU per request)
    return statistics.median(xs) if xs else 0.0


def throughput(stack: Stack, s: Settings) -> dict:
    out: dict = {}
    scenarios = available_scenarios()
    for scenario in scenarios:
        out[scenario] = {str(c): {"bare": [], "gateway": []} for c in s.connections}
    for rnd in range(s.rounds):
        if rnd:
            # fresh processes each round: one process can run the same code a few percent
            # faster or slower than another for its whole life (memory layout, the core it
            # lands on; bench/ab.py A/A runs of identical gateways differed by up to 3.5%)
            stack.restart("bare", "gateway")
        for scenario in scenarios:  # warm up both (imports, connection setup, caches)
            for target in ("bare", "gateway"):
                wrk(stack.url(target), request_spec(target, scenario), 4, 1, stack.tmp)
        order = ("bare", "gateway") if rnd % 2 == 0 else ("gateway", "bare")
        for scenario in scenarios:
            for c in s.connections:
                for target in order:
                    r = wrk(stack.url(target), request_spec(target, scenario), c, s.duration, stack.tmp,
                            stack.pid(target))
                    out[scenario][str(c)][target].append(r)
                    print(
                        f"  round {rnd + 1}/{s.rounds} {scenario:9s} c={c:<3d} {target:8s} "
                        f"{r['rps']:8.0f} req/s  p50 {r['latency_us']['p50'] / 1000:6.2f} ms  "
                        f"p99 {r['latency_us']['p99'] / 1000:6.2f} ms  cpu {fmt(r['cpu_us_per_request'], 0):>5s} us/req  "
                        f"errors {r['error_count']}",
                        flush=True,
                    )
    summary: dict = {}
    for scenario, per_c in out.items():
        summary[scenario] = {}
        for c, runs in per_c.items():
            row = {}
            for target, rs in runs.items():
                row[target] = {"rps": median([r["rps"] for r in rs]),
                               "p50_ms": median([r["latency_us"]["p50"] for r in rs]) / 1000,
                               "p99_ms": median([r["latency_us"]["p99"] for r in rs]) / 1000,
                               "requests": sum(r["requests"] for r in rs),
                               "errors": sum(r["error_count"] for r in rs),
                               "cpu_us_per_request": median([r["cpu_us_per_request"] for r in rs]),
                               "rounds": [{"rps": r["rps"], "p50_ms": r["latency_us"]["p50"] / 1000,
                                           "p99_ms": r["latency_us"]["p99"] / 1000,
                                           "cpu_us_per_request": r["cpu_us_per_request"]} for r in rs]}
            # each round measures bare and gateway back to back: compare within rounds (paired),
            # then take the median, so a slow stretch of the machine falls on both sides of a pair
            pairs = list(zip(runs["bare"], runs["gateway"]))

            def paired(f):
                return median([v for v in (f(b, g) for b, g in pairs) if v is not None]) if pairs else None

            row["ratio"] = {
                "rps": paired(lambda b, g: ratio(g["rps"], b["rps"])),
                "p50": paired(lambda b, g: ratio(g["latency_us"]["p50"], b["latency_us"]["p50"])),
                "p99": paired(lambda b, g: ratio(g["latency_us"]["p99"], b["latency_us"]["p99"])),
                "cpu_per_request": paired(lambda b, g: ratio(g["cpu_us_per_request"], b["cpu_us_per_request"])),
            }
            row["added_p50_ms"] = paired(lambda b, g: (g["latency_us"]["p50"] - b["latency_us"]["p50"]) / 1000)
            row["added_cpu_us_per_request"] = paired(lambda b, g: g["cpu_us_per_request"] - b["cpu_us_per_request"])
            summary[scenario][c] = row
    return summary


def metrics_cost(stack: Stack, s: Settings) -> dict:
    """The gateway with metrics on against off (openai passthrough), alternating in paired rounds
    like throughput(); one scrape per round, as a Prometheus server would make every few seconds."""
    stack.restart("gateway_metrics")
    spec = request_spec("gateway", "openai")
    return alternate(stack, s, "metrics", {"off": ("gateway", spec), "on": ("gateway_metrics", spec)},
                     ("gateway", "gateway_metrics"), lambda: scrape_metrics(stack))


TARGETS_KEY = "vk_bench_targets3"
BUDGET_KEY = "vk_bench_budget"


def has_targets(addon_dir: Path = ROOT / "addon") -> bool:
    """Whether the keys file of the gateway in addon_dir takes `targets` (older revisions: not)."""
    # (the records moved from policy/keys.py to policy/virtual_keys.py)
    found = (addon_dir / "policy" / name for name in ("keys.py", "virtual_keys.py"))
    return any(path.exists() and "class Target" in path.read_text() for path in found)


def failover_cost(stack: Stack, s: Settings) -> dict:
    """A key with three healthy targets (a weighted pick per request) against a single-target
    key, on the same gateway, alternating in paired rounds."""
    path, body, headers = request_spec("gateway", "openai")
    three = (path, body, {**headers, "Authorization": f"Bearer {TARGETS_KEY}"})
    return alternate(
        stack, s, "failover", {"off": ("gateway", (path, body, headers)), "on": ("gateway", three)}, ("gateway",)
    )


def alternate(stack: Stack, s: Settings, label: str, sides: dict, restart: tuple[str, ...], after_round=None) -> dict:
    """wrk against two sides ("off", "on": a proxy name and a request spec each), alternating
    which goes first, for s.rounds rounds on fresh processes: "on" over "off" per connection count."""
    runs: dict = {str(c): {"off": [], "on": []} for c in s.connections}
    for rnd in range(s.rounds):
        if rnd:
            stack.restart(*restart)
        for name, spec in sides.values():
            wrk(stack.url(name), spec, 4, 1, stack.tmp)
        order = ("off", "on") if rnd % 2 == 0 else ("on", "off")
        for c in s.connections:
            for side in order:
                name, spec = sides[side]
                r = wrk(stack.url(name), spec, c, s.duration, stack.tmp, stack.pid(name))
                runs[str(c)][side].append(r)
                print(f"  round {rnd + 1}/{s.rounds} c={c:<3d} {label} {side:3s} {r['rps']:8.0f} req/s  "
                      f"cpu {fmt(r['cpu_us_per_request'], 0):>5s} us/req", flush=True)
        if after_round is not None:
            after_round()
    out: dict = {}
    for c, by_side in runs.items():
        pairs = list(zip(by_side["off"], by_side["on"]))
        out[c] = {
            side: {
                "rps": median([r["rps"] for r in rs]),
                "cpu_us_per_request": median([r["cpu_us_per_request"] for r in rs]),
            }
            for side, rs in by_side.items()
        }
        out[c]["ratio_rps"] = median([ratio(on["rps"], off["rps"]) for off, on in pairs])
        out[c]["added_cpu_us_per_request"] = median(
            [
                on["cpu_us_per_request"] - off["cpu_us_per_request"]
                for off, on in pairs
                if on["cpu_us_per_request"] is not None and off["cpu_us_per_request"] is not None
            ]
        )
    return out


def scrape_metrics(stack: Stack) -> None:
    """One GET /metrics of the gateway_metrics process (its port is in its command line)."""
    import urllib.request

    args = stack.procs["gateway_metrics"].args
    port = next(a.split("=", 1)[1] for a in args if a.startswith("metrics_port="))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        if r.status != 200 or b"gateway_requests_total" not in r.read():
            raise RuntimeError("metrics scrape failed")


def direct(stack: Stack, s: Settings) -> dict:
    """The fake provider alone: shows it is far from being the bottleneck."""
    spec = request_spec("bare", "openai")
    r1 = wrk(stack.url("fake"), spec, 1, s.duration, stack.tmp)
    r64 = wrk(stack.url("fake"), spec, 64, s.duration, stack.tmp)
    return {"c1": {"rps": r1["rps"], "p50_ms": r1["latency_us"]["p50"] / 1000},
            "c64": {"rps": r64["rps"], "p50_ms": r64["latency_us"]["p50"] / 1000}}


def streaming(stack: Stack, s: Settings) -> dict:
    extra = {"x-bench-events": str(s.stream_events), "x-bench-first-ms": str(s.stream_first_ms)}
    result: dict = {}
    for scenario in available_scenarios():
        runs: dict[str, list] = {"bare_stream": [], "gateway": []}
        cpu = {"bare_stream": 0.0, "gateway": 0.0}

        async def go():
            for i in range(s.stream_iterations + 2):
                order = ("bare_stream", "gateway") if i % 2 == 0 else ("gateway", "bare_stream")
                for target in order:
                    cpu0 = cpu_seconds(stack.pid(target))
                    r = await http_stream(stack.ports[target], request_spec(target, scenario, stream=True), extra)
                    if i >= 2:  # the first two are warm-up
                        runs[target].append(r)
                        cpu[target] += cpu_seconds(stack.pid(target)) - cpu0
        asyncio.run(go())
        row: dict = {"events": s.stream_events, "provider_first_event_pause_ms": s.stream_first_ms}
        for target, rs in runs.items():
            bad = [r for r in rs if r["status"] != 200 or not r["done"]]
            row["bare" if target == "bare_stream" else "gateway"] = {
                "ttfc_ms": median([r["ttfc"] for r in rs]) * 1000, "total_ms": median([r["total"] for r in rs]) * 1000,
                "events_received": median([r["events"] for r in rs]), "incomplete": len(bad), "iterations": len(rs),
                "cpu_us_per_event": cpu[target] / max(len(rs), 1) / s.stream_events * 1e6}
        b, g = row["bare"], row["gateway"]
        row["ratio"] = {"ttfc": ratio(g["ttfc_ms"], b["ttfc_ms"]), "total": ratio(g["total_ms"], b["total_ms"])}
        row["ratio"]["cpu_per_event"] = ratio(g["cpu_us_per_event"], b["cpu_us_per_event"])
        row["added_ttfc_ms"] = g["ttfc_ms"] - b["ttfc_ms"]
        # the whole-stream difference spread over the events: proxy-side cost per event, CPU and I/O
        row["added_per_event_us"] = (g["total_ms"] - b["total_ms"]) * 1000 / s.stream_events
        result[scenario] = row
    return result


def concurrent_streams(stack: Stack, s: Settings) -> dict:
    scenario = "anthropic" if "anthropic" in PROVIDERS else "openai"
    extra = {"x-bench-events": str(s.concurrent_events), "x-bench-gap-ms": str(s.concurrent_gap_ms)}
    result: dict = {"scenario": scenario, "streams": s.concurrent_streams, "events_per_stream": s.concurrent_events,
                    "event_gap_ms": s.concurrent_gap_ms}
    for target in ("bare_stream", "gateway"):
        spec = request_spec(target, scenario, stream=True)
        opened = [0, 0]

        async def one(delay: float):
            await asyncio.sleep(delay)
            try:
                return await asyncio.wait_for(http_stream(stack.ports[target], spec, extra, opened), 120)
            except Exception as e:  # counted as incomplete, never hangs the run
                return {"status": 0, "error": repr(e), "done": False}

        async def go():
            # ramp the connects over ~0.5 s: mitmproxy's listen backlog is small, and a dropped SYN
            # costs a 1 s retransmit, not a failure
            return await asyncio.gather(*(one(i * 0.5 / s.concurrent_streams) for i in range(s.concurrent_streams)))

        before = rss_mb(stack.pid(target))
        t0 = time.perf_counter()
        with RssSampler(stack.pid(target)) as sampler:
            rs = asyncio.run(go())
        ok = [r for r in rs if r.get("status") == 200 and r.get("done")]
        errors = sorted({r.get("error", f"status {r.get('status')}") for r in rs if r not in ok})[:5]
        result["bare" if target == "bare_stream" else "gateway"] = {
            "completed": len(ok), "all_complete": len(ok) == s.concurrent_streams, "peak_open": opened[1],
            "rss_before_mb": before, "rss_peak_mb": sampler.peak, "wall_s": time.perf_counter() - t0,
            "errors": errors}
    result["ratio"] = {"rss_peak": ratio(result["gateway"]["rss_peak_mb"], result["bare"]["rss_peak_mb"])}
    return result


def memory(stack: Stack, s: Settings) -> dict:
    """RSS before and after memory_requests requests per target (16 connections, both scenarios)."""
    scenarios = available_scenarios()
    done = {"bare": 0, "gateway": 0}
    before = {t: rss_mb(stack.pid(t)) for t in done}
    segment = 2.0 if s.memory_requests < 10_000 else 5.0
    i = 0
    t0 = time.perf_counter()
    while min(done.values()) < s.memory_requests:
        scenario = scenarios[i % len(scenarios)]
        order = ("bare", "gateway") if i % 2 == 0 else ("gateway", "bare")
        for target in order:
            if done[target] < s.memory_requests:
                r = wrk(stack.url(target), request_spec(target, scenario), 16, segment, stack.tmp)
                done[target] += r["requests"]
        i += 1
    print(f"  {done['gateway']} gateway / {done['bare']} bare requests in {time.perf_counter() - t0:.0f} s", flush=True)
    time.sleep(0.5)  # let closing connections be released
    out = {}
    for t in done:
        after = rss_mb(stack.pid(t))
        out[t] = {
            "requests": done[t],
            "rss_before_mb": before[t],
            "rss_after_mb": after,
            "growth_mb": after - before[t],
        }
    return out


def translator_cpu(s: Settings) -> dict:
    """CPU per event of the Anthropic stream translator (as the gateway wraps it), in-process."""
    if "anthropic" not in PROVIDERS:
        return {"available": False, "reason": "no 'anthropic' provider in addon.providers.PROVIDERS yet"}
    from mitmproxy.http import Headers

    from addon.wire.streams import fail_closed_stream

    pair = PAIRS[("openai_chat", PROVIDERS["anthropic"].api)]
    raw = json.dumps({"model": ANTHROPIC_MODEL, "messages": MESSAGES, "max_tokens": 64, "stream": True}).encode()
    events = anthropic_events(200)

    def setup():
        upstream, exchange = pair.prepare(json.loads(raw))
        return fail_closed_stream(exchange.stream_translator(), Headers(content_type="text/event-stream"), "HTTP/1.1")

    result = stream_cpu(setup, events, (b"[DONE]", b"word100"), s.translator_repeats)
    if result["available"]:
        result["messages"] = messages_translator_cpu(s)
    return result


def messages_translator_cpu(s: Settings) -> dict:
    """CPU per event of the Messages -> Chat Completions stream translator: OpenAI chunks in,
    Anthropic events out (as the gateway wraps it), in-process."""
    if ("anthropic_messages", "openai_chat") not in PAIRS:
        return {"available": False, "reason": "no Messages -> Chat Completions pair in this checkout"}
    from mitmproxy.http import Headers

    from addon.apis.registry import APIS
    from addon.wire.streams import fail_closed_stream

    pair, api = PAIRS[("anthropic_messages", "openai_chat")], APIS["anthropic_messages"]
    request = {"model": "gpt-4o-mini", "max_tokens": 64, "messages": MESSAGES[1:], "stream": True}
    events = openai_events(200)

    def setup():
        _, exchange = pair.prepare(json.loads(json.dumps(request)))
        return fail_closed_stream(exchange.stream_translator(), Headers(content_type="text/event-stream"), "HTTP/1.1",
                                  api.stream_error)

    return stream_cpu(setup, events, (b"message_stop", b"word100"), s.translator_repeats)


def stream_cpu(setup, events: list[bytes], expected: tuple[bytes, ...], repeats: int) -> dict:
    """CPU per event of the stream callables `setup()` makes, each fed `events` and the final b"",
    after one checked run whose output must hold every `expected` marker."""
    def run(stream) -> list:
        out = [stream(e) for e in events]
        out.append(stream(b""))
        return out

    sample = b"".join(p if isinstance(p, bytes) else b"".join(p) for p in run(setup()))
    if not all(marker in sample for marker in expected):
        return {"available": False, "reason": f"translator output looks wrong: {sample[:300]!r}"}
    t = time.process_time()
    streams = [setup() for _ in range(repeats)]
    setup_cpu = time.process_time() - t
    t = time.process_time()
    for stream in streams:
        run(stream)
    cpu = time.process_time() - t
    return {"available": True, "events_per_stream": len(events), "streams": repeats,
            "us_per_event": cpu / (repeats * len(events)) * 1e6, "setup_us_per_stream": setup_cpu / repeats * 1e6}


def ratio(a: float | None, b: float | None) -> float | None:
    # a window that completed nothing (a loaded machine) has no rate: no ratio, not a crash
    return a / b if a is not None and b else None


# --- report ----------------------------------------------------------------------------------

def targets(res: dict) -> list[dict]:
    t: list[dict] = []

    def add(name, value, limit, ok):
        t.append({"name": name, "value": value, "target": limit, "ok": bool(ok) if value is not None else None})

    for scenario, floor in (("openai", 0.9), ("anthropic", 0.8), ("messages_openai", 0.8), ("messages_anthropic", 0.9)):
        for c, row in res.get("throughput", {}).get(scenario, {}).items():
            add(f"{scenario} throughput c={c} gateway/bare", row["ratio"]["rps"], f">= {floor}",
                row["ratio"]["rps"] is not None and row["ratio"]["rps"] >= floor)
        row = res.get("throughput", {}).get(scenario, {}).get("1")
        if row:
            add(f"{scenario} added p50 at c=1 (ms)", row["added_p50_ms"], "<= 0.2", row["added_p50_ms"] <= 0.2)
    fleet_bench.targets(res, add)
    stream_latency.targets(res, add)
    large_body.targets(res, add)
    guard_bench.targets(res, add)
    tr = res.get("translator", {})
    if tr.get("available"):
        add("anthropic translation CPU per event (us)", tr["us_per_event"], "<= 50", tr["us_per_event"] <= 50)
        mt = tr.get("messages") or {}
        if mt.get("available"):
            add(
                "messages -> chat stream translation CPU per event (us)",
                mt["us_per_event"],
                "<= 25",
                mt["us_per_event"] <= 25,
            )
    for c, row in res.get("metrics", {}).items():
        add(
            f"metrics on/off throughput c={c}",
            row["ratio_rps"],
            ">= 0.97",
            row["ratio_rps"] is not None and row["ratio_rps"] >= 0.97,
        )
    for c, row in res.get("failover", {}).items():
        add(
            f"3 targets / 1 target throughput c={c}",
            row["ratio_rps"],
            ">= 0.95",
            row["ratio_rps"] is not None and row["ratio_rps"] >= 0.95,
        )
    for scenario, row in res.get("streaming", {}).items():
        add(f"{scenario} stream first chunk over bare (ms)", row["added_ttfc_ms"], "<= 1", row["added_ttfc_ms"] <= 1)
    if "memory" in res:
        mem = res["memory"]["gateway"]
        add(f"gateway RSS growth over {mem['requests']} requests (MB)", mem["growth_mb"], "< 10", mem["growth_mb"] < 10)
    if "concurrent_streams" in res:
        cs, n = res["concurrent_streams"]["gateway"], res["concurrent_streams"]["streams"]
        add(f"{n} concurrent streams all complete", cs["completed"], f"== {n}", cs["all_complete"])
        add(f"{n} concurrent streams peak RSS (MB)", cs["rss_peak_mb"], "< 300", cs["rss_peak_mb"] < 300)
    return t


def fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(res: dict) -> None:
    rows = [("metric", "bare", "gateway", "gw/bare")]
    for scenario, per_c in res.get("throughput", {}).items():
        for c, row in per_c.items():
            b, g = row["bare"], row["gateway"]
            rows.append((f"{scenario} c={c} req/s", fmt(b["rps"], 0), fmt(g["rps"], 0), fmt(row["ratio"]["rps"])))
            rows.append((f"{scenario} c={c} p50 ms", fmt(b["p50_ms"]), fmt(g["p50_ms"]), fmt(row["ratio"]["p50"])))
            rows.append((f"{scenario} c={c} p99 ms", fmt(b["p99_ms"]), fmt(g["p99_ms"]), fmt(row["ratio"]["p99"])))
            rows.append((f"{scenario} c={c} proxy CPU us/req", fmt(b["cpu_us_per_request"], 0),
                         fmt(g["cpu_us_per_request"], 0), fmt(row["ratio"]["cpu_per_request"])))
    for scenario, row in res.get("streaming", {}).items():
        b, g = row["bare"], row["gateway"]
        rows.append((f"{scenario} stream {row['events']} ev: first chunk ms", fmt(b["ttfc_ms"]), fmt(g["ttfc_ms"]),
                     fmt(row["ratio"]["ttfc"])))
        rows.append((f"{scenario} stream {row['events']} ev: total ms", fmt(b["total_ms"]), fmt(g["total_ms"]),
                     fmt(row["ratio"]["total"])))
        rows.append((f"{scenario} stream: proxy CPU us/event", fmt(b["cpu_us_per_event"], 1),
                     fmt(g["cpu_us_per_event"], 1), fmt(row["ratio"]["cpu_per_event"])))
    if "concurrent_streams" in res:
        cs = res["concurrent_streams"]
        rows.append((f"{cs['streams']} streams ({cs['scenario']}): completed", str(cs["bare"]["completed"]),
                     str(cs["gateway"]["completed"]), ""))
        rows.append((f"{cs['streams']} streams: peak open", str(cs["bare"]["peak_open"]),
                     str(cs["gateway"]["peak_open"]), ""))
        rows.append((f"{cs['streams']} streams: peak RSS MB", fmt(cs["bare"]["rss_peak_mb"], 1),
                     fmt(cs["gateway"]["rss_peak_mb"], 1), fmt(cs["ratio"]["rss_peak"])))
    if "memory" in res:
        m = res["memory"]
        rows.append(("RSS before MB", fmt(m["bare"]["rss_before_mb"], 1), fmt(m["gateway"]["rss_before_mb"], 1), ""))
        rows.append((f"RSS after ~{m['gateway']['requests']} req MB", fmt(m["bare"]["rss_after_mb"], 1),
                     fmt(m["gateway"]["rss_after_mb"], 1), ""))
        rows.append(("RSS growth MB", fmt(m["bare"]["growth_mb"], 1), fmt(m["gateway"]["growth_mb"], 1), ""))
    for section, label in (("metrics", "metrics off/on"), ("failover", "1 target/3 targets")):
        for c, row in res.get(section, {}).items():
            rows.append(
                (f"{label} c={c} req/s", fmt(row["off"]["rps"], 0), fmt(row["on"]["rps"], 0), fmt(row["ratio_rps"]))
            )
            rows.append((f"{label} c={c} proxy CPU us/req", fmt(row["off"]["cpu_us_per_request"], 0),
                         fmt(row["on"]["cpu_us_per_request"], 0), ""))
    tr = res.get("translator", {})
    if tr.get("available"):
        rows.append(("translator CPU us/event (in-process)", "", fmt(tr["us_per_event"]), ""))
        if (tr.get("messages") or {}).get("available"):
            rows.append(("messages translator CPU us/event (in-process)", "", fmt(tr["messages"]["us_per_event"]), ""))
    if "direct" in res:
        d = res["direct"]
        rows.append(("direct to fake provider: req/s c=1 / c=64", fmt(d["c1"]["rps"], 0), fmt(d["c64"]["rps"], 0), ""))
    rows += large_body.rows(res)
    rows += guard_bench.rows(res)
    rows += stream_latency.rows(res)
    rows += fleet_bench.rows(res)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for i, r in enumerate(rows):
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}")
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\ntargets:")
    for t in res["targets"]:
        mark = {True: "ok  ", False: "MISS", None: "n/a "}[t["ok"]]
        print(f"  [{mark}] {t['name']}: {fmt(t['value'])} (target {t['target']})")
    if tr and not tr.get("available"):
        print(f"  [n/a ] translator CPU: {tr['reason']}")


def git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, a few seconds (the smoke test)")
    ap.add_argument("--out", help="JSON result path (default bench/results/bench-<time>.json)")
    ap.add_argument("--rounds", type=int, help="alternating rounds per throughput cell")
    ap.add_argument("--duration", type=float, help="seconds per wrk round")
    ap.add_argument("--latency-rate", type=int, help="stream_latency: chunks per second over all the streams "
                    f"(default {Settings.latency_rate}; lower on a busy machine)")
    ap.add_argument("--latency-budget", type=float, help="stream_latency: seconds its stream openings may take in "
                    f"all (default {Settings.latency_budget_s:g}; raise it when a count is skipped)")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(SECTIONS)} (for focused before/after runs)")
    args = ap.parse_args(argv)
    # --quick alone skips the fleet (it starts HAProxy, Redis, nginx and N+3 gateways): --only fleet --quick
    # (and stream_latency's fleet column: --only stream_latency --quick)
    only = set(args.only.split(",")) if args.only else set(SECTIONS) - ({"fleet"} if args.quick else set())
    if only - set(SECTIONS):
        ap.error(f"--only: unknown section(s) {', '.join(sorted(only - set(SECTIONS)))}")
    s = QUICK if args.quick else Settings()
    if args.rounds:
        s.rounds = args.rounds
    if args.duration:
        s.duration = args.duration
    if args.latency_rate:
        s.latency_rate = args.latency_rate
    if args.latency_budget:
        s.latency_budget_s = args.latency_budget
    if not shutil.which("wrk"):
        print(
            "bench: wrk not found; install it (Debian/Ubuntu: apt-get install wrk) or use ./run.sh bench",
            file=sys.stderr,
        )
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # client + proxy, both sides of each stream; HAProxy derives its maxconn from this limit too
    need = max(4 * s.concurrent_streams, 3 * max(s.latency_streams)) + 256
    if soft < need:  # children inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))

    started = time.time()
    stack = Stack()
    try:
        print(
            f"bench: starting fake provider, bare mitmdump and gateway ({'quick' if args.quick else 'full'} run)",
            flush=True,
        )
        if args.quick:
            print(QUICK_NOTE, flush=True)
        stack.start()
        res: dict = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "quick": args.quick,
                              "settings": asdict(s), "git": git_rev(), "python": platform.python_version(),
                              "cpus": os.cpu_count(), "providers": available_scenarios(),
                              "mitmproxy": _mitmproxy_version()},
                     "rss_startup_mb": {t: rss_mb(stack.pid(t)) for t in ("bare", "bare_stream", "gateway")}}
        steps = {
            "translator": ("translator CPU (in-process)", lambda: translator_cpu(s)),
            "direct": ("direct to the fake provider", lambda: direct(stack, s)),
            "throughput": ("throughput and latency (wrk, alternating bare/gateway)", lambda: throughput(stack, s)),
            "memory": (f"memory over {s.memory_requests} requests per target", lambda: memory(stack, s)),
            "streaming": (f"streaming, {s.stream_events}-event streams", lambda: streaming(stack, s)),
            "concurrent_streams": (f"{s.concurrent_streams} concurrent streams", lambda: concurrent_streams(stack, s)),
            "metrics": ("metrics on against off (openai, wrk, alternating)", lambda: metrics_cost(stack, s)),
            "failover": (
                "a key with three targets against one with one (openai, wrk, alternating)",
                lambda: failover_cost(stack, s) if has_targets() else {},
            ),
            "large_body": (
                f"/health latency while a {large_body.BODY_MB} MB request is handled (untranslated, translated); "
                f"{large_body.BURST} of them at once from an rpm-{large_body.BURST_RPM} key",
                lambda: large_body.section(stack, s, SDK_HEADERS, rss_mb),
            ),
            "guardrails": (
                "guardrails: scanning per KB, added p50 at 2 and 200 KB, throughput, stream masking per chunk",
                lambda: guard_bench.section(stack, s, SDK_HEADERS, wrk),
            ),
            "stream_latency": (
                f"latency added per chunk, {'/'.join(map(str, s.latency_streams))} concurrent streams: "
                "bare, gateway, fleet",
                lambda: stream_latency.section(stack, s, with_fleet=not args.quick or bool(args.only)),
            ),
            "fleet": (
                "fleet: N workers behind HAProxy against one, Redis, TLS upstream reuse",
                lambda: fleet_bench.fleet_section(stack, s),
            ),
        }
        for name, (title, step) in steps.items():
            if name in only:
                print(f"bench: {title}", flush=True)
                res[name] = step()
        res["meta"]["seconds"] = time.time() - started
        res["targets"] = targets(res)
    finally:
        stack.stop()
    out = Path(args.out) if args.out else BENCH / "results" / time.strftime(
        f"bench-%Y%m%d-%H%M%S{'-quick' if args.quick else ''}.json", time.gmtime(started))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print_table(res)
    print(f"\nbench: {res['meta']['seconds']:.0f} s; results in {out}")
    if args.quick:
        print(QUICK_NOTE)
    return 0


QUICK_NOTE = ("bench: --quick is a smoke test: it checks that every part runs, and its numbers are too "
              "noisy to judge the targets by. Run ./run.sh bench (no --quick) on a quiet machine for those.")


def _mitmproxy_version() -> str:
    try:
        from importlib.metadata import version
        return version("mitmproxy")
    except Exception:
        return ""


if __name__ == "__main__":
    sys.exit(main())
