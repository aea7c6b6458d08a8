"""The benchmark's `fleet` section (bench/run.py --only fleet): many workers against one, in one run.

Starts, next to run.py's stack (its fast fake provider):
- `single`: one gateway mitmdump, MemoryStore (what ./run.sh runs);
- `lb1`: one worker behind HAProxy (fleet/supervisor.py, as GATEWAY_WORKERS would, with N=1): what
  HAProxy costs;
- `fleet`: GATEWAY_WORKERS=N behind HAProxy, N = the machine's cores (at least 2);
- `single_redis`: one gateway with --set redis_url (when the gateway has a Redis store);
- nginx with a self-signed certificate made at run time, as a TLS provider: a client that opens a
  new connection per request, through HAProxy and through a single mitmdump; nginx's log counts
  the TLS handshakes (new connections) the provider saw.
Rounds alternate the order of the targets; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.supervisor import READY_PREFIX  # noqa: E402

REDIS_STORE = any('"redis_url"' in p.read_text() for p in (ROOT / "addon").rglob("*.py"))
OPENAI_BODY = json.dumps({
    "id": "chatcmpl-bench-tls", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 14, "completion_tokens": 2, "total_tokens": 16}})

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    log_format conns '$connection $connection_requests';
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {tmp}/tls-cert.pem;
        ssl_certificate_key {tmp}/tls-key.pem;
        access_log {tmp}/nginx-access.log conns;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def self_signed(tmp: Path) -> None:
    """A certificate for 127.0.0.1, made now (the cryptography package comes with mitmproxy)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-provider")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp / "tls-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "tls-key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))


def handshakes(tmp: Path) -> tuple[int, int]:
    """(requests, distinct connections) in nginx's log so far."""
    path = tmp / "nginx-access.log"
    if not path.exists():
        return 0, 0
    lines = path.read_text().split()
    conns = lines[0::2]
    return len(conns), len(set(conns))


class FleetBench:
    def __init__(self, stack, workers: int) -> None:
        from run import MITMDUMP, free_port  # bench/run.py (on sys.path as bench/)
        self.stack, self.workers, self.free_port, self.mitmdump = stack, workers, free_port, MITMDUMP
        self.tmp = stack.tmp / "fleet"
        self.tmp.mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.redis_url = ""

    # --- processes -----------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], port: int) -> None:
        self.ports[name] = port
        self.procs[name] = subprocess.Popen(cmd, stdout=open(self.tmp / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=ROOT)

    def keys(self) -> Path:
        fake = self.stack.url("fake")
        keys = {
            "providers": {"openai": {"base_url": fake + "/v1"}},
            "virtual_keys": {
                "vk_bench_openai": {"provider": "openai", "api_key": "sk-bench-openai-0000000000"},
                # a limit: its admission goes through the store (Redis, when given)
                "vk_bench_limited": {
                    "provider": "openai",
                    "api_key": "sk-bench-openai-0000000000",
                    "rpm": 1_000_000_000,
                },
                "vk_bench_tls": {
                    "provider": "openai",
                    "api_key": "sk-bench-openai-0000000000",
                    "base_url": f"https://127.0.0.1:{self.ports['nginx']}/v1",
                },
            },
        }
        path = self.tmp / "keys.json"
        path.write_text(json.dumps(keys))
        return path

    def gateway_args(self, name: str, keys: Path) -> list[str]:
        return ["--set", "connection_strategy=lazy", "--set", f"keys_file={keys}",
                "--set", f"usage_db={self.tmp / ('usage-' + name + '.sqlite3')}",
                "--set", f"ssl_verify_upstream_trusted_ca={self.tmp / 'tls-cert.pem'}",
                "--set", f"confdir={self.tmp / ('confdir-' + name)}", "-q", "-s", str(ROOT / "addon" / "gateway.py")]

    def start(self) -> None:
        from run import wait_port
        self_signed(self.tmp)
        port = self.free_port()
        (self.tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=self.tmp, port=port, body=OPENAI_BODY))
        self._spawn(
            "nginx", [shutil.which("nginx") or "nginx", "-c", str(self.tmp / "nginx.conf"), "-p", str(self.tmp)], port
        )
        port = self.free_port()
        self._spawn("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                              "--appendonly", "yes", "--dir", str(self.tmp)], port)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        keys = self.keys()
        for name in ("single", "single_redis") if REDIS_STORE else ("single",):
            port = self.free_port()
            extra = ["--set", f"redis_url={self.redis_url}"] if name == "single_redis" else []
            self._spawn(name, [str(self.mitmdump), "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{port}",
                               *self.gateway_args(name, keys), *extra], port)
        for name, n in (("lb1", 1), ("fleet", self.workers)):
            port = self.free_port()
            self._spawn(name, [sys.executable, "-m", "fleet.supervisor", "--workers", str(n), "--port", str(port),
                               "--drain-s", "1", "--redis-url", self.redis_url, "--state-dir", str(self.tmp / name),
                               "--mitmdump", str(self.mitmdump), "--", *self.gateway_args(name, keys)], port)
        for name in self.procs:
            if name in ("lb1", "fleet"):
                deadline = time.monotonic() + 90
                while READY_PREFIX.encode() not in (self.tmp / f"{name}.log").read_bytes():
                    if self.procs[name].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not start: {(self.tmp / f'{name}.log').read_text()[-2000:]}")
                    time.sleep(0.1)
            else:
                wait_port(self.ports[name], self.procs[name], name, self.tmp / f"{name}.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if proc.args[1:3] == ["-m", "fleet.supervisor"] else signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def pid_cpu(self, name: str) -> int | None:
        return self.procs[name].pid if name.startswith("single") else None

    # --- measurements --------------------------------------------------------------------

    def run(self, s) -> dict:
        from run import median, ratio, request_spec, wrk
        spec = request_spec("gateway", "openai")
        limited = (spec[0], spec[1], {**spec[2], "Authorization": "Bearer vk_bench_limited"})
        tls_close = (spec[0], spec[1], {**spec[2], "Authorization": "Bearer vk_bench_tls", "Connection": "close"})
        for name in ("single", "lb1", "fleet"):  # warm-up: imports, connections
            wrk(self.url(name), spec, 4, 1, self.tmp)
        cells: dict[str, list] = {}

        def measure(key: str, name: str, spec_, connections: int, duration: float) -> dict:
            r = wrk(self.url(name), spec_, connections, duration, self.tmp, self.pid_cpu(name))
            cells.setdefault(key, []).append(r)
            cpu = f"  gateway CPU {r['cpu_us_per_request']:5.0f} us/request" if r.get("cpu_us_per_request") else ""
            print(f"  {key:22s} {r['rps']:8.0f} req/s  p50 {r['latency_us']['p50'] / 1000:6.2f} ms  "
                  f"errors {r['error_count']}{cpu}", flush=True)
            return r

        tls: dict[str, dict] = {"single": {"requests": 0, "connections": 0}, "fleet": {"requests": 0, "connections": 0}}
        for rnd in range(s.rounds):
            names = ["single", "lb1", "fleet"]
            for name in names if rnd % 2 == 0 else names[::-1]:
                measure(f"c64 {name}", name, spec, 64, s.duration)
            if REDIS_STORE:
                for name in ("single", "single_redis") if rnd % 2 == 0 else ("single_redis", "single"):
                    measure(f"c64 limited {name}", name, limited, 64, s.duration)
                    measure(f"c1 limited {name}", name, limited, 1, s.duration)
            for name in ("single", "fleet") if rnd % 2 == 0 else ("fleet", "single"):
                before = handshakes(self.tmp)
                measure(f"tls new-conn {name}", name, tls_close, 4, s.duration)
                after = handshakes(self.tmp)
                tls[name]["requests"] += after[0] - before[0]
                tls[name]["connections"] += after[1] - before[1]

        def cell(key: str) -> dict:
            rs = cells.get(key, [])
            return {
                "rps": median([r["rps"] for r in rs]),
                "p50_ms": median([r["latency_us"]["p50"] for r in rs]) / 1000,
                "p99_ms": median([r["latency_us"]["p99"] for r in rs]) / 1000,
                "errors": sum(r["error_count"] for r in rs),
                "requests": sum(r["requests"] for r in rs),
                "cpu_us_per_request": median(
                    [r["cpu_us_per_request"] for r in rs if r.get("cpu_us_per_request")] or [0]
                )
                or None,
            }

        def paired(a: str, b: str, f) -> float | None:
            vals = [v for v in (f(x, y) for x, y in zip(cells.get(a, []), cells.get(b, []))) if v is not None]
            return median(vals) if vals else None

        rps = lambda x, y: ratio(x["rps"], y["rps"])  # noqa: E731
        out: dict = {"workers": self.workers, "cpus": os.cpu_count(), "redis_store": REDIS_STORE,
                     "c64": {name: cell(f"c64 {name}") for name in ("single", "lb1", "fleet")}}
        out["ratio"] = {"fleet_vs_single": paired("c64 fleet", "c64 single", rps),
                        "haproxy_1_worker_vs_single": paired("c64 lb1", "c64 single", rps)}
        out["target_fleet_vs_single"] = 0.75 * self.workers
        if REDIS_STORE:
            out["redis"] = {name: {"c64": cell(f"c64 limited {name}"), "c1": cell(f"c1 limited {name}")}
                            for name in ("single", "single_redis")}
            out["ratio"]["redis_vs_memory_c64"] = paired("c64 limited single_redis", "c64 limited single", rps)
            # the gateway's own CPU per request, steadier than req/s on a shared machine
            out["ratio"]["redis_vs_memory_cpu_c64"] = paired(
                "c64 limited single_redis",
                "c64 limited single",
                lambda x, y: ratio(x["cpu_us_per_request"], y["cpu_us_per_request"]),
            )
            out["redis_added_p50_ms_c1"] = paired("c1 limited single_redis", "c1 limited single",
                                                  lambda x, y: (x["latency_us"]["p50"] - y["latency_us"]["p50"]) / 1000)
        else:
            out["redis"] = {"available": False, "reason": "the gateway has no redis_url option (RedisStore) yet"}
        out["tls_new_connection_per_request"] = {
            name: {**cell(f"tls new-conn {name}"), "provider_requests": t["requests"],
                   "provider_handshakes": t["connections"],
                   "handshakes_per_100_requests": 100 * t["connections"] / t["requests"] if t["requests"] else None}
            for name, t in tls.items()}
        return out


def fleet_section(stack, s) -> dict:
    missing = [tool for tool in ("haproxy", "redis-server", "nginx") if shutil.which(tool) is None]
    if missing:
        return {"available": False, "reason": f"not installed: {', '.join(missing)}"}
    bench = FleetBench(stack, max(2, os.cpu_count() or 2))
    try:
        bench.start()
        return {"available": True, **bench.run(s)}
    finally:
        bench.stop()


def targets(res: dict, add) -> None:
    f = res.get("fleet")
    if not f or not f.get("available"):
        return
    r = f["ratio"]
    add(f"fleet: {f['workers']} workers / 1 at c=64", r["fleet_vs_single"], f">= {f['target_fleet_vs_single']:.2f}",
        r["fleet_vs_single"] is not None and r["fleet_vs_single"] >= f["target_fleet_vs_single"])
    if "redis_vs_memory_c64" in r:
        add("fleet: RedisStore / MemoryStore at c=64", r["redis_vs_memory_c64"], ">= 0.9",
            r["redis_vs_memory_c64"] is not None and r["redis_vs_memory_c64"] >= 0.9)
    t = f["tls_new_connection_per_request"]
    lb, single = t["fleet"]["handshakes_per_100_requests"], t["single"]["handshakes_per_100_requests"]
    add("fleet: provider TLS handshakes per 100 new-connection requests via HAProxy", lb,
        f"< single mitmdump ({single if single is None else round(single, 1)})",
        lb is not None and single is not None and lb < single)


def rows(res: dict) -> list[tuple[str, str, str, str]]:
    from run import fmt
    f = res.get("fleet")
    if not f:
        return []
    if not f.get("available"):
        return [("fleet", "", "", f"n/a: {f['reason']}")]
    c = f["c64"]
    out = [(f"fleet c=64 req/s: single / 1 behind HAProxy / {f['workers']} workers", fmt(c["single"]["rps"], 0),
            f"{fmt(c['lb1']['rps'], 0)} / {fmt(c['fleet']['rps'], 0)}",
            f"{fmt(f['ratio']['haproxy_1_worker_vs_single'])} / {fmt(f['ratio']['fleet_vs_single'])}")]
    if f.get("redis_store"):
        rd = f["redis"]
        out.append(("fleet limited key c=64 req/s: memory / redis", fmt(rd["single"]["c64"]["rps"], 0),
                    fmt(rd["single_redis"]["c64"]["rps"], 0), fmt(f["ratio"]["redis_vs_memory_c64"])))
        out.append(
            (
                "fleet limited key c=64 gateway CPU us/request: memory / redis",
                fmt(rd["single"]["c64"]["cpu_us_per_request"], 0),
                fmt(rd["single_redis"]["c64"]["cpu_us_per_request"], 0),
                fmt(f["ratio"].get("redis_vs_memory_cpu_c64")),
            )
        )
        out.append(("fleet limited key c=1 p50 ms: memory / redis", fmt(rd["single"]["c1"]["p50_ms"]),
                    fmt(rd["single_redis"]["c1"]["p50_ms"]), f"+{fmt(f['redis_added_p50_ms_c1'])} ms"))
    t = f["tls_new_connection_per_request"]
    out.append(("fleet TLS provider, new conn/request: p50 ms single / HAProxy", fmt(t["single"]["p50_ms"]),
                fmt(t["fleet"]["p50_ms"]), ""))
    out.append(("fleet TLS provider: handshakes per 100 requests", fmt(t["single"]["handshakes_per_100_requests"], 1),
                fmt(t["fleet"]["handshakes_per_100_requests"], 1), ""))
    return out
