"""run.sh hands REDIS_URL to one process (through the environment: tests/e2e/test_secreturl.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


from tests.conftest import ROOT, free_port
from tests.services.haproxy import wait_healthy


def test_one_process_with_redis_url_gets_it_as_the_redis_url_option(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"virtual_keys": {"vk_x": {"provider": "openai", "api_key": "sk-real-key-deploy-1"}}}))
    port = free_port()
    proc = subprocess.Popen(
        [str(ROOT / "run.sh"), "-q", "--set", f"confdir={tmp_path}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "KEYS_FILE": str(keys),
            "GATEWAY_PORT": str(port),
            "USAGE_DB": str(tmp_path / "u.sqlite3"),
            "REDIS_URL": "redis://127.0.0.1:6390/2",
        },
    )
    try:
        wait_healthy(port, proc)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")  # run.sh exec'd mitmdump
        assert argv.count(b"redis_url=env:REDIS_URL") == 1 and b"6390" not in b" ".join(argv)
        assert b"mitmdump" in argv[1] or b"mitmdump" in argv[0]
    finally:
        proc.terminate()
        proc.wait(20)
