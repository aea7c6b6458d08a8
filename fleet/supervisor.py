"""GATEWAY_WORKERS > 1: run N mitmdump workers behind HAProxy, and a local redis-server.

`./run.sh` execs this (`python -m fleet.supervisor`) when GATEWAY_WORKERS is more than one. It
starts, watches and stops processes; it never touches a request. The balancing is HAProxy's
(deploy/haproxy.cfg.template), the shared limits are Redis's.

- Workers: `mitmdump <the gateway's arguments>` in reverse mode on 127.0.0.1, each on its own
  port. A worker that exits is started again on the same port (HAProxy's health checks route
  around it meanwhile); one that keeps dying is retried with a growing pause.
- Redis: REDIS_URL from the environment (or --redis-url); without it, a local redis-server on
  127.0.0.1 (AOF on, data in the state directory) with a password generated at each start, which
  it reads from a 0600 file (never argv): other local users cannot rewrite or flush the limits. Every worker gets the URL in its environment
  as REDIS_URL and `--set redis_url=env:REDIS_URL` on its command line: a password in it is never
  in argv (ps, /proc/PID/cmdline) nor in mitmweb's options (addon/wire/secreturl.py).
- Stop (SIGINT, SIGTERM): HAProxy is soft-stopped first (it stops accepting, lets requests in
  flight finish, for at most GATEWAY_DRAIN_S), then the workers get SIGTERM (they write their
  pending ledger rows and exit), then Redis. A second Ctrl-C skips the wait.
- No orphans: children run in their own process group (a terminal's Ctrl-C reaches only this
  process, which then drains in order) and get SIGTERM from the kernel if this process dies
  (PR_SET_PDEATHSIG).
- `<state dir>/fleet.json` names every process (pid, port) for operators and tests;
  `<state dir>/haproxy.sock` is HAProxy's stats socket (requests sent to each worker).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

from addon.wire.secreturl import masked_url

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "haproxy.cfg.template"
START_TIMEOUT = 60.0  # seconds for a worker / Redis / HAProxy to become ready at start
STOP_TIMEOUT = 15.0  # seconds a worker gets after SIGTERM (it writes its ledger rows) before SIGKILL
RESTART_PAUSE_MAX = 10.0  # seconds between restarts of a worker that keeps dying
POLL = 0.2
SILENCE_MARGIN = 60  # seconds HAProxy waits on a silent worker beyond what the gateway waits itself
REDIS_ENV = "REDIS_URL"  # the environment variable the workers read their Redis URL from
# a UNIX socket's path has at most 107 bytes; HAProxy binds `<path>.<pid>.tmp` first, then renames it
SOCKET_PATH_MAX = 90
STATS_SOCKET = "haproxy.sock"  # in the state dir: HAProxy's stats socket (per-worker counters)
REDIS_CONFIG = "redis.conf"  # in <state dir>/redis/: the local redis-server's password (0600)
READY_PREFIX = "fleet: ready:"  # the start-up line once HAProxy answers (tests and the bench wait for it)


def say(message: str) -> None:
    print(f"fleet: {message}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the process group still gets our signals
        pass


def spawn(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, process_group=0, preexec_fn=_die_with_parent, **kw)


def http_ok(host: str, port: int, path: str = "/health", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n".encode())
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def redis_encode(*words: str) -> bytes:
    """One Redis command in RESP (any byte in a word is safe, unlike an inline command)."""
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode()) for w in words)


def redis_ping(port: int, password: str | None = None) -> bool:
    """Whether the redis-server on 127.0.0.1:`port` answers PING (after AUTH with `password`)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall((redis_encode("AUTH", password) if password else b"") + redis_encode("PING"))
            expected, reply = (b"+OK\r\n" if password else b"") + b"+PONG\r\n", b""
            while len(reply) < len(expected) and expected.startswith(reply):  # else -NOAUTH, -LOADING, ...
                chunk = s.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply == expected
    except OSError:
        return False


def write_private(path: Path, text: str) -> None:
    """`text` in a file only its owner can read: created 0600 (never readable for a moment), replacing
    any file there before."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def render_haproxy(bind: str, ports: list[int], drain_s: float, worker_args: list[str] = (), template: Path = TEMPLATE,
                   stats_socket: Path | None = None) -> str:
    """HAProxy's configuration for workers on `ports`, run with mitmdump arguments `worker_args`;
    its stats socket (read-only, 0600) at `stats_socket` unless the path is too long for one."""
    servers = "\n".join(f"    server w{i} 127.0.0.1:{port}" for i, port in enumerate(ports, 1))
    if stats_socket is None:
        stats = "    # (no stats socket)"
    elif len(str(stats_socket).encode()) > SOCKET_PATH_MAX:
        stats = f"    # (no stats socket: the state directory's path is too long for a UNIX socket's, {SOCKET_PATH_MAX} bytes)"
    else:
        stats = f"    stats socket {stats_socket} mode 600 level user"
    return string.Template(template.read_text()).substitute(
        BIND=bind, SERVERS=servers, DRAIN_S=max(1, int(round(drain_s))), SILENCE_S=silence_s(worker_args), STATS=stats)


def set_option(args: list[str], name: str) -> str | None:
    """The value a `--set name=value` among mitmdump arguments gives (the last one), or None."""
    value = None
    for flag, arg in zip(args, args[1:]):
        if flag == "--set" and arg.startswith(name + "="):
            value = arg.partition("=")[2]
    return value


def silence_s(worker_args: list[str]) -> int:
    """How long HAProxy lets a worker send nothing: longer than the gateway waits on purpose, so
    that the client gets the gateway's own answer (its 504 upstream_timeout or stream_idle_timeout
    in the client's API shape, or the next target's), never HAProxy's HTML 504. Each attempt of a
    request (up to max_attempts, for a key with several targets) may wait upstream_timeout to
    connect (TCP, TLS) and for the provider's headers; a body may pause stream_idle_timeout."""
    from addon.hooks.failover import DEFAULT_MAX_ATTEMPTS
    from addon.hooks.timeouts import STREAM_IDLE_TIMEOUT, UPSTREAM_TIMEOUT

    try:
        upstream = float(set_option(worker_args, "upstream_timeout") or UPSTREAM_TIMEOUT)
        idle = float(set_option(worker_args, "stream_idle_timeout") or STREAM_IDLE_TIMEOUT)
        attempts = int(set_option(worker_args, "max_attempts") or 0) or DEFAULT_MAX_ATTEMPTS
    except ValueError:  # the workers refuse such a value themselves, and do not start
        upstream, idle, attempts = UPSTREAM_TIMEOUT, STREAM_IDLE_TIMEOUT, DEFAULT_MAX_ATTEMPTS
    return int(max(upstream * attempts, idle)) + SILENCE_MARGIN


def fleet_endpoint_line(url: str, worker_args: list[str]) -> str:
    """The gateway's start-up line for the whole fleet: HAProxy's `url` and the workers' keys."""
    from addon.policy.keys import endpoint_line, load_keys_with_timeout
    from addon.policy.keys_parse import KeysError

    try:
        reach = load_keys_with_timeout(set_option(worker_args, "keys_file") or "keys.json").summary()
    except KeysError as e:  # (run.sh checked the file before; the workers say why it fails now)
        reach = str(e)
    return endpoint_line(url, reach)


def haproxy_bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forget_metrics(pid: int | None) -> None:
    """A dead worker's live gauges (requests in flight) leave the metrics sum (docs/metrics.md):
    a worker that crashed could not remove them itself."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)
    except OSError:
        pass


class Child:
    """One supervised process: how to start it, and when it was last started."""

    def __init__(self, name: str, argv: list[str], port: int) -> None:
        self.name, self.argv, self.port = name, argv, port
        self.env: dict[str, str] | None = None  # None: the supervisor's
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.pause = 0.5  # before the next restart, doubled while it keeps dying
        self.restart_at: float | None = None

    def start(self) -> None:
        self.proc = spawn(self.argv, env=self.env)
        self.started = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Fleet:
    def __init__(self, args: argparse.Namespace, worker_args: list[str]) -> None:
        self.args, self.worker_args = args, worker_args
        self.state = Path(args.state_dir).resolve()
        self.stopping = 0  # 1: draining, 2: stop now
        ports = [free_port() for _ in range(args.workers)]
        # the endpoint line names HAProxy's address, once, here (not each worker's own port)
        quiet = ["--set", "endpoint_line=false"] if set_option(worker_args, "endpoint_line") is None else []
        # Redis's spend is compared with the ledger's by the first worker only: one line, if any
        unchecked = ["--set", "spend_check=false"] if set_option(worker_args, "spend_check") is None else []
        self.workers = [
            Child(f"worker {i}", [args.mitmdump, "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{port}",
                                  *worker_args, *quiet, *(unchecked if i > 1 else ())], port)
            for i, port in enumerate(ports, 1)
        ]
        self.redis: Child | None = None
        self.haproxy: Child | None = None
        self.redis_url = args.redis_url

    # --- start -------------------------------------------------------------------------

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self.start_redis()
        # the URL (maybe with a password) through the environment only: argv is public
        env = {**os.environ, REDIS_ENV: self.redis_url}
        for w in self.workers:
            w.argv += ["--set", f"redis_url=env:{REDIS_ENV}"]
            w.env = env
        # the first worker alone: on a first run it writes mitmproxy's CA into confdir, which
        # workers starting at the same moment would read half-written
        first, rest = self.workers[0], self.workers[1:]
        first.start()
        self.wait_ready("worker 1", lambda: http_ok("127.0.0.1", first.port), [first])
        for w in rest:
            w.start()
        self.wait_ready("workers", lambda: all(http_ok("127.0.0.1", w.port) for w in self.workers),
                        self.workers)
        config = self.state / "haproxy.cfg"
        config.write_text(render_haproxy(haproxy_bind(self.args.host, self.args.port), [w.port for w in self.workers],
                                         self.args.drain_s, worker_args=self.worker_args,
                                         stats_socket=self.state / STATS_SOCKET))
        self.haproxy = Child("haproxy", [self.args.haproxy, "-db", "-f", str(config)], self.args.port)
        self.haproxy.start()
        self.wait_ready("HAProxy", lambda: http_ok(self.args.host, self.args.port), [self.haproxy])
        self.write_state()
        url = f"http://{haproxy_bind(self.args.host, self.args.port)}"
        say(f"{READY_PREFIX.removeprefix('fleet: ')} {len(self.workers)} workers behind HAProxy at {url} "
            f"(Redis {masked_url(self.redis_url)}{', local' if self.redis else ''}; drain {self.args.drain_s:g} s)")
        print(fleet_endpoint_line(url, self.worker_args), file=sys.stderr, flush=True)

    def start_redis(self) -> None:
        """A redis-server on loopback with a password new at each start. redis-server reads it from
        a 0600 file in the (0700) data directory, its first argument, never from argv; the workers
        get it in the URL in their environment. Its restarts read the same file: same password."""
        data = self.state / "redis"
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        data.chmod(0o700)  # the AOF holds every key's spend; the config file the password
        password = secrets.token_urlsafe(32)
        config = data / REDIS_CONFIG
        write_private(config, f"# written by fleet/supervisor.py at each start: the password of this run\n"
                              f"requirepass {password}\n")
        port = free_port()
        self.redis = Child(
            "redis-server",
            [
                self.args.redis_server,
                str(config),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--protected-mode",
                "yes",
                "--dir",
                str(data),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
                str(data / "redis.log"),
            ],
            port,
        )
        self.redis.start()
        self.wait_ready("redis-server", lambda: redis_ping(port, password), [self.redis])
        self.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"

    def wait_ready(self, what: str, ready, children: list[Child]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            dead = [c for c in children if not c.alive()]
            if dead or time.monotonic() > deadline or self.stopping:
                reason = f"{dead[0].name} exited with {dead[0].proc.returncode}" if dead else (
                    "stopped" if self.stopping else f"not ready after {START_TIMEOUT:g} s")
                raise StartError(f"{what}: {reason}")
            time.sleep(0.05)

    def write_state(self) -> None:
        state = {
            "supervisor": os.getpid(),
            "listen": haproxy_bind(self.args.host, self.args.port),
            "workers": [{"name": w.name, "pid": w.pid, "port": w.port} for w in self.workers],
            "haproxy": self.haproxy.pid if self.haproxy else None,
            "redis": {"pid": self.redis.pid, "port": self.redis.port} if self.redis else None,
        }
        tmp = self.state / "fleet.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state / "fleet.json")

    # --- run ---------------------------------------------------------------------------

    def watch(self) -> None:
        """Until asked to stop: restart whatever died."""
        while not self.stopping:
            changed = False
            for child in [*self.workers, self.redis, self.haproxy]:
                if child is None or child.alive():
                    continue
                now = time.monotonic()
                if child.restart_at is None:
                    ran = now - child.started
                    child.pause = 0.5 if ran > 30 else min(child.pause * 2, RESTART_PAUSE_MAX)
                    child.restart_at = now + (0 if ran > 30 else child.pause)
                    say(f"{child.name} (pid {child.pid}, port {child.port}) exited with {child.proc.returncode}; "
                        f"restarting{'' if ran > 30 else f' in {child.restart_at - now:.1f} s'}")
                    if child in self.workers:
                        forget_metrics(child.pid)
                if now >= child.restart_at:
                    child.start()
                    changed = True
            if changed:
                self.write_state()
            time.sleep(POLL)

    # --- stop --------------------------------------------------------------------------

    def stop(self) -> None:
        drain = self.args.drain_s
        if self.haproxy and self.haproxy.alive():
            if self.stopping < 2:
                say(f"stopping: HAProxy takes no new requests; waiting up to {drain:g} s for requests in flight")
                self.haproxy.proc.send_signal(signal.SIGUSR1)
                self.wait_exit([self.haproxy], drain + 2)
            self.terminate([self.haproxy], 2)
        self.terminate(self.workers, STOP_TIMEOUT)
        if self.redis:
            self.terminate([self.redis], STOP_TIMEOUT)
        say("stopped")

    def wait_exit(self, children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(c.alive() for c in children) and time.monotonic() < deadline and self.stopping < 2:
            time.sleep(0.05)

    def terminate(self, children: list[Child], timeout: float) -> None:
        for c in children:
            if c.alive():
                c.proc.terminate()
        self.wait_exit(children, timeout)
        for c in children:
            if c.alive():
                say(f"{c.name} (pid {c.pid}) did not stop; killing it")
                c.proc.kill()
        for c in children:
            if c.proc is not None:
                c.proc.wait()


class StartError(Exception):
    pass


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.supervisor",
        description="N gateway workers behind HAProxy (run.sh does this for GATEWAY_WORKERS > 1).",
    )
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="where HAProxy listens (GATEWAY_HOST)")
    parser.add_argument("--port", type=int, default=8080, help="(GATEWAY_PORT)")
    parser.add_argument(
        "--drain-s", type=float, default=30.0, help="at most this long for requests in flight at a stop"
    )
    parser.add_argument("--redis-url", default=os.environ.get(REDIS_ENV, ""),
                        help=f"shared Redis (default: ${REDIS_ENV}, the way run.sh passes it: argv is visible "
                             "to every local user); empty: start a local redis-server")
    parser.add_argument("--state-dir", default=str(ROOT / ".fleet"), help="haproxy.cfg, fleet.json, redis/ (data)")
    parser.add_argument("--mitmdump", default=str(Path(sys.executable).parent / "mitmdump"))
    parser.add_argument("--haproxy", default="haproxy")
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument(
        "worker_args", nargs=argparse.REMAINDER, help="-- then mitmdump's arguments for every worker (no --mode)"
    )
    args = parser.parse_args(argv)
    worker_args = args.worker_args[1:] if args.worker_args[:1] == ["--"] else args.worker_args
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.drain_s < 0:
        parser.error("--drain-s must not be negative")
    return args, worker_args


def main(argv: list[str] | None = None) -> int:
    args, worker_args = parse_args(sys.argv[1:] if argv is None else argv)
    fleet = Fleet(args, worker_args)

    def on_signal(signum, frame):
        fleet.stopping = min(fleet.stopping + 1, 2)
        if fleet.stopping == 2:
            say("second signal: stopping now")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        fleet.start()
        fleet.watch()
    except StartError as e:
        say(f"could not start: {e}")
        code = 1
    finally:
        fleet.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
