"""A gateway fleet started the way a user starts one: `GATEWAY_WORKERS=N ./run.sh`.

run.sh execs fleet/supervisor.py, which starts the mitmdump workers, a local redis-server (unless
REDIS_URL is given) and HAProxy from deploy/haproxy.cfg.template. Tests skip with a clear reason
when haproxy or redis-server is not installed (.ci/run installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fleet.supervisor import READY_PREFIX as READY
from fleet.supervisor import REDIS_CONFIG, STATS_SOCKET
from tests.conftest import ROOT, free_port


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: apt-get install {' '.join(missing)}; .ci/run does)")


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 90, log=lambda: "") -> None:
    """Until the gateway `proc` (./run.sh, one process) answers /health on 127.0.0.1:`port`."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                assert r.status == 200
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not start\n" + log()
            time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent has not reaped it yet)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def cmdlines_holding(secret: str) -> list[str]:
    """Every process on the machine whose command line holds `secret` (as `ps` shows it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if secret.encode() in cmdline:
                found.append(f"{proc.name}: {cmdline.replace(b'\0', b' ').decode(errors='replace')}")
    return found


class FleetProcess:
    """`GATEWAY_WORKERS=workers ./run.sh` on a free port, its own state dir and (unless given) ledger."""

    def __init__(self, keys: dict, workers: int | str = 3, env: dict | None = None, args: list[str] | None = None,
                 quiet: bool = True) -> None:
        require("haproxy", *(() if (env or {}).get("REDIS_URL") else ("redis-server",)))
        self.tmp = tempfile.TemporaryDirectory(prefix="fleet-")
        tmp = Path(self.tmp.name)
        (tmp / "keys.json").write_text(json.dumps(keys))
        self.port = free_port()
        self.state_dir = tmp / "state"
        self.env = {
            **os.environ, "GATEWAY_WORKERS": str(workers), "GATEWAY_PORT": str(self.port),
            "KEYS_FILE": str(tmp / "keys.json"), "USAGE_DB": str(tmp / "usage.sqlite3"),
            "FLEET_DIR": str(self.state_dir), "GATEWAY_DRAIN_S": "10", **(env or {}),
        }
        self.ledger = self.env["USAGE_DB"]
        # -q: no line per request (quiet=False: and the gateway's start-up lines); confdir: no CA
        # written to the real home
        self.args = [*(["-q"] if quiet else []), "--set", f"confdir={tmp}", *(args or [])]
        self.proc: subprocess.Popen | None = None
        self.output = bytearray()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> "FleetProcess":
        self.proc = subprocess.Popen([str(ROOT / "run.sh"), *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while READY.encode() not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fleet did not start:\n" + self.log())
            time.sleep(0.05)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output += line

    def log(self) -> str:
        return self.output.decode(errors="replace")

    def state(self) -> dict:
        return json.loads((self.state_dir / "fleet.json").read_text())

    def redis_password(self) -> str:
        """The local redis-server's password of this run, from its 0600 config file: what the
        user who started the fleet can read, and no other local user."""
        config = self.state_dir / "redis" / REDIS_CONFIG
        return next(line.split()[1] for line in config.read_text().splitlines() if line.startswith("requirepass "))

    def redis_command(self, *args: str, auth: bool = True) -> bytes:
        """One command's raw reply from the local redis-server (auth=False: without the password)."""
        from tests.services.redis import command

        return command(self.state()["redis"]["port"], *args, password=self.redis_password() if auth else None)

    def worker_requests(self) -> dict[str, int]:
        """How many requests HAProxy has sent to each worker ({"w1": n, ...}): `stot` from its
        stats socket in the state dir."""
        import csv
        import io

        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.state_dir / STATS_SOCKET))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().removeprefix("# ")))
        return {r["svname"]: int(r["stot"]) for r in rows if r["pxname"] == "workers" and r["svname"] != "BACKEND"}

    def pids(self) -> list[int]:
        """Every process the fleet started (workers, HAProxy, Redis), from fleet.json."""
        state = self.state()
        pids = [w["pid"] for w in state["workers"]] + [state["haproxy"]]
        return pids + ([state["redis"]["pid"]] if state["redis"] else [])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)  # run.sh exec'd the supervisor: this is its pid

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                pids = self.pids()
            except (OSError, ValueError):
                pids = []
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)  # the second one: no drain
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                for pid in pids:  # pdeathsig would do it too
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)
        self.tmp.cleanup()
