"""Start-up: a bad keys file stops the gateway with one clear line and no secret."""

import json
import subprocess

import pytest

from addon.recording.process import GatewayProcess

pytestmark = pytest.mark.e2e
SECRET = "sk-secret-never-print-0001"


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "not found"),
        ('{"virtual_keys": ', "is not valid JSON"),
        (
            json.dumps({"virtual_keys": {"vk_user_broken": {"provider": "nope", "api_key": SECRET}}}),
            "virtual key 'vk_...ken': unknown provider 'nope'",
        ),
        (
            json.dumps({"virtual_keys": {"vk_x": {"provider": "openai", "name": "team-x"}}}),
            "virtual key 'team-x' has no \"api_key\"",
        ),
    ],
)
def test_bad_keys_file_stops_start_up(tmp_path, content, expected):
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    gw = GatewayProcess(str(path))
    try:
        proc = subprocess.run(gw.command(), capture_output=True, text=True, timeout=60)
    finally:
        gw.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert expected in out and str(path) in out
    assert "Traceback" not in out
    assert SECRET not in out


def test_run_sh_checks_the_keys_file_before_starting(tmp_path):
    from tests.conftest import ROOT
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps({"virtual_keys": {"vk_x": {"provider": "openai", "api_key": SECRET}}, "providers": {"zzz": {}}})
    )
    proc = subprocess.run(
        [str(ROOT / "run.sh")],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KEYS_FILE": str(path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "providers.zzz: unknown provider" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_run_sh_refuses_script_options_it_sets_itself(tmp_path):
    from tests.conftest import ROOT
    proc = subprocess.run([str(ROOT / "run.sh"), "--set", "usage_db=/tmp/x.sqlite3"], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert "USAGE_DB" in proc.stderr


def test_run_sh_replay_without_a_file_says_how(tmp_path):
    from tests.conftest import ROOT
    proc = subprocess.run([str(ROOT / "run.sh"), "replay"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "usage: ./run.sh replay FILE"


def test_run_sh_with_an_empty_usage_db_keeps_no_ledger(tmp_path):
    from tests.conftest import ROOT
    proc = subprocess.run([str(ROOT / "run.sh"), "usage"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "USAGE_DB": ""})
    assert proc.returncode == 1
    assert "keeps no usage ledger" in proc.stderr
