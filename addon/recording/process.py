"""Start the real gateway (mitmdump + addon/gateway.py, as run.sh does) on a free 127.0.0.1 port.

Used by the offline replay (addon/recording/replay.py) and by the tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
MITMDUMP = Path(sys.executable).parent / "mitmdump"
LISTENING = re.compile(rb"listening at (?:\S+?):(\d+)")


class GatewayProcess:
    def __init__(self, keys: dict | str, extra_args: list[str] | None = None, env: dict | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="gw-")
        if isinstance(keys, dict):
            self.keys_file = os.path.join(self.tmp.name, "keys.json")
            Path(self.keys_file).write_text(json.dumps(keys))
        else:
            self.keys_file = keys
        self.extra_args = extra_args or []
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.output = bytearray()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(MITMDUMP),
            "--mode", "reverse:http://127.0.0.1:1@127.0.0.1:0",
            "--set", "connection_strategy=lazy",
            "--set", f"keys_file={self.keys_file}",
            "--set", f"confdir={self.tmp.name}",
            "-s", str(ROOT / "addon" / "gateway.py"),
            *self.ledger_args(),
            *self.quiet_args(),
            *self.extra_args,
        ]

    def ledger_args(self) -> list[str]:
        """Each gateway its own ledger (budgets do not leak between runs, the real ledger is not
        touched) unless the caller names one. Not both: mitmdump given the same script option
        twice silently fails to load the script."""
        if any(arg.startswith("usage_db=") for arg in self.extra_args):
            return []
        return ["--set", f"usage_db={os.path.join(self.tmp.name, 'usage.sqlite3')}"]

    def quiet_args(self) -> list[str]:
        """As run.sh: the gateway's access lines instead of mitmproxy's per-flow lines, unless the
        caller chose a flow_detail (mitmproxy refuses an option given twice)."""
        if any(arg.startswith("flow_detail=") for arg in self.extra_args):
            return []
        return ["--set", "flow_detail=0"]

    def start(self, timeout: float = 30) -> "GatewayProcess":
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output += line
            m = LISTENING.search(line)
            if m:
                self.port = int(m.group(1))
                threading.Thread(target=self._drain, daemon=True).start()
                if self._healthy(deadline):
                    return self
                break
        self.stop()
        raise RuntimeError("gateway did not start:\n" + self.output.decode(errors="replace"))

    def _healthy(self, deadline: float) -> bool:
        """Listening is not ready: mitmdump exits after printing it if start-up logged an error."""
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                time.sleep(0.05)
        return False

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output += line

    def log(self) -> str:
        """What the gateway printed so far. Its output is read on a thread, so a line written just
        before the answer a caller got may not have arrived yet: wait until the output stops
        growing for a moment (at most 2 s) first."""
        deadline = time.monotonic() + 2
        size = -1
        while len(self.output) != size and time.monotonic() < deadline:
            size = len(self.output)
            time.sleep(0.05)
        return self.output.decode(errors="replace")

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc)
        self.tmp.cleanup()


def terminate(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process is gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
