"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, a real `postgres` on loopback.

PostgreSQL refuses to run as root: as root, the cluster is created and run as the `postgres`
user (runuser). Skips with a clear reason when the server binaries are not installed (Debian:
postgresql; .ci/run installs it).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from tests.conftest import free_port


def server_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    def __init__(self) -> None:
        self.bin = server_bin()
        if self.bin is None:
            pytest.skip(
                "PostgreSQL server binaries (initdb, postgres) not installed (Debian: apt-get install postgresql)"
            )
        self.as_root = os.geteuid() == 0
        if self.as_root and shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as the postgres user")
        self.tmp = tempfile.mkdtemp(prefix="pg-")
        self.data = os.path.join(self.tmp, "data")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        if self.as_root:
            shutil.chown(self.tmp, "postgres", "postgres")
            os.chmod(self.tmp, 0o700)

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)

    def start(self, timeout: float = 60) -> "PostgresServer":
        """Create the cluster (first time) and run it; again after halt(): the same data, the same port."""
        if not os.path.exists(self.data):
            subprocess.run(self._cmd(str(self.bin / "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust",
                                     "-E", "UTF8", "--no-sync"), check=True, capture_output=True)
        self.proc = subprocess.Popen(self._cmd(
            str(self.bin / "postgres"), "-D", self.data, "-p", str(self.port), "-k", self.tmp,
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=50"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        import psycopg
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                    self.stop()
                    raise RuntimeError("PostgreSQL did not start: " + err)
                time.sleep(0.1)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def halt(self) -> None:
        """Stop the server, keep its data (start() runs it again)."""
        if self.proc and self.proc.poll() is None:
            # pg_ctl signals the server itself (runuser, its parent here, does not pass SIGINT
            # on); fast: open connections are closed
            subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "stop", "-D", self.data, "-m", "fast", "-w", "-t", "20"),
                           capture_output=True)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database in the session's cluster, for one test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50] + f"_{os.getpid()}"
    return postgres_server.create_database(name)
