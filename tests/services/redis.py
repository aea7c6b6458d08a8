"""A real redis-server for tests: a free loopback port, a temp dir, stopped after.

Tests using it are marked `fleet` and skip with a clear reason when redis-server is not
installed (.ci/run installs it). `stop()` and `start()` again on the same port stand for an
outage and its end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fleet.supervisor import redis_encode
from tests.conftest import free_port


class RedisServer:
    """`password`: requirepass, from a config file (never on redis-server's own command line:
    tests look for it in every process's)."""

    def __init__(self, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server not installed (Debian: apt-get install redis-server; .ci/run does)")
        self.binary = binary
        self.tmp = tempfile.TemporaryDirectory(prefix="redis-")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.password = password

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> "RedisServer":
        # loopback only, no persistence: each test's Redis starts empty and leaves nothing behind
        config = Path(self.tmp.name) / "redis.conf"
        config.write_text(f"requirepass {self.password}\n" if self.password else "")
        config.chmod(0o600)
        self.proc = subprocess.Popen(
            [self.binary, str(config), "--bind", "127.0.0.1", "--port", str(self.port), "--protected-mode", "yes",
             "--dir", self.tmp.name, "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--loglevel", "warning", "--logfile", str(Path(self.tmp.name) / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up either way
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command's raw reply (RESP), for tests that look inside."""
        return command(self.port, *args, password=self.password)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.tmp.cleanup()


def command(port: int, *args: str, password: str | None = None) -> bytes:
    """One command's raw reply (RESP) from the redis-server on 127.0.0.1:`port`, after AUTH with
    `password` (none: the command as a client without the password sends it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        if password:
            s.sendall(redis_encode("AUTH", password))
            assert s.recv(64) == b"+OK\r\n"
        s.sendall(redis_encode(*args))
        time.sleep(0.05)
        return s.recv(1 << 20)


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()
