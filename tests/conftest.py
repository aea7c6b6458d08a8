"""What the tests share: the layout's markers, a fake provider on 127.0.0.1, real gateway processes in
front of it, a keys-file builder and free ports. Helpers that are not fixtures are imported from
here (`from tests.conftest import ROOT, free_port, keys_for`).

Layout: tests/unit/<layer>/ mirrors addon/ and starts no process (a guard below fails a unit test
that starts a gateway, mitmweb, run.sh or a service); tests/e2e/ starts gateways, fleets, Redis,
HAProxy, PostgreSQL, the browser or npm clients and is marked `e2e` by its directory.
`./run.sh test --quick` runs the unit layer only."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from addon.recording.process import GatewayProcess
from tests.fakeprovider import FakeProvider

# redis_server, postgres_server and postgres_url, for every module that asks
pytest_plugins = ("tests.services.redis", "tests.services.postgres")

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

# The fuzz tests (tests/unit/gateway/test_fuzz.py) draw the same bodies at every run of the suite,
# CI's included: a failure there is a bug seen again on the next run, never one the dice found once.
# To look for new ones: HYPOTHESIS_PROFILE=explore ./run.sh test tests/unit/gateway/test_fuzz.py
# (fresh draws each run).
settings.register_profile("suite", derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

# ./run.sh test --quick (GATEWAY_TEST_QUICK=1): property tests draw a fifth of their examples, as
# drawing them is most of the unit layer's time (the fuzz tests: 25 of its 36 CPU seconds). The
# full run, CI's, draws them all.
QUICK = os.environ.get("GATEWAY_TEST_QUICK") == "1"


def examples(count: int) -> int:
    """max_examples for a property test: `count`, a fifth of it under ./run.sh test --quick."""
    return max(20, count // 5) if QUICK else count

# recorded real provider traffic and the official specs: present in the team's checkout
# layout (../shared), absent in a user's clone; tests that read it skip without it
SHARED_REFERENCE = ROOT.parent / "shared" / "reference"


# --- the layout --------------------------------------------------------------------------

# markers of tests that start processes (pytest.ini): none of them belongs under tests/unit/
PROCESS_MARKERS = ("e2e", "fleet", "browser", "client")
# programs a unit test must not start: what makes a test slow and e2e (git, mount and the like
# are tools a unit test may run)
SERVICES = {"mitmdump", "mitmweb", "mitmproxy", "run.sh", "redis-server", "haproxy", "postgres", "initdb",
            "pg_ctl", "chromium", "node", "npm", "npx", "nginx", "wrk", "claude", "codex"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TESTS / "e2e" in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def pytest_runtest_setup(item):
    if TESTS / "unit" in item.path.parents:
        marked = [m for m in PROCESS_MARKERS if item.get_closest_marker(m)]
        if marked:
            pytest.fail(f"{item.nodeid} is marked {', '.join(marked)}: a test that starts a process belongs "
                        "in tests/e2e/ (tests/unit/ runs in ./run.sh test --quick)", pytrace=False)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_service(request, monkeypatch):
    """Under tests/unit/, starting a gateway, mitmweb, run.sh or a service fails the test at once."""
    if TESTS / "unit" not in request.node.path.parents:
        return

    class Refused(subprocess.Popen):
        def __new__(cls, args, *rest, **kw):  # before __init__: no half-made Popen to clean up
            argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
            program = os.path.basename(os.fsdecode(argv[0])).split()[0] if argv else ""
            if program in SERVICES or any(os.fsdecode(a) in ("mitmproxy.tools.main", "fleet.supervisor") for a in argv):
                raise AssertionError(f"a unit test started {program} ({request.node.nodeid}): "
                                     "tests that start processes belong in tests/e2e/")
            return super().__new__(cls)

    monkeypatch.setattr(subprocess, "Popen", Refused)


# --- helpers -----------------------------------------------------------------------------

def free_port() -> int:
    """A loopback port nothing listens on right now (for a server the test starts next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keys_for(provider, virtual_keys: dict, *, providers: dict | None = None, **sections) -> dict:
    """A keys file's content: the openai provider at `provider` (the fake provider, or its URL) +
    "/v1", more providers in `providers`, the `virtual_keys` (name -> entry), and any other
    top-level section (prices=...)."""
    url = provider if isinstance(provider, str) else provider.url
    return {"providers": {"openai": {"base_url": url + "/v1"}, **(providers or {})},
            "virtual_keys": virtual_keys, **sections}


def openai_key(api_key: str, **entry) -> dict:
    """A virtual key's entry for the openai provider with the real key `api_key`."""
    return {"provider": "openai", "api_key": api_key, **entry}


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def provider_server():
    server = FakeProvider().start()
    yield server
    server.stop()


@pytest.fixture
def provider(provider_server):
    """The session's fake provider, with a clean request log and the default OpenAI replies."""
    provider_server.reset()
    yield provider_server
    provider_server.reset()


@pytest.fixture(scope="module")
def gateway_factory():
    """start(keys, extra_args, env): a real gateway process (mitmdump with addon/gateway.py, as
    run.sh starts it; addon/recording/process.py) on a free port, `keys` a dict or a file's path.
    One a test started stops when the test ends (_stop_the_tests_gateways), one a module's
    fixture started when the module ends, or either earlier by gw.stop()."""
    started: list[GatewayProcess] = []

    def start(keys: dict | str, extra_args: list[str] | None = None, env: dict | None = None) -> GatewayProcess:
        gw = GatewayProcess(keys, extra_args, env).start()
        started.append(gw)
        return gw

    start.started = started
    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(autouse=True)
def _stop_the_tests_gateways(request):
    """Gateways started by a test or its function-scoped fixtures stop at its end: kept to the
    session's end, a full run held 140 idle gateways (each with its timers and ~70 MB) at once.
    pytest sets up higher-scoped fixtures first, so a module's gateway is started before `mark`."""
    if "gateway_factory" not in request.fixturenames:
        yield
        return
    started = request.getfixturevalue("gateway_factory").started
    mark = len(started)
    yield
    for gw in started[mark:]:
        gw.stop()
    del started[mark:]


@pytest.fixture
def sdk_body_bytes(provider, gateway_factory):
    """measure(messages, **create_args): the bytes of the body the openai SDK sends for them. A
    budgeted request reserves its body's bytes + max_tokens (docs/shared-state.md): tests that need
    a budget to fit exactly N requests size it with this. Call it before setting a provider handler
    (it resets the provider)."""
    import openai

    def measure(messages: list, **create_args) -> int:
        probe = gateway_factory(keys_for(provider, {"vk_probe": openai_key("sk-probe-123456")}))
        openai.OpenAI(base_url=probe.url + "/v1", api_key="vk_probe", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=messages, **create_args)
        size = len(provider.received[-1].body)
        probe.stop()
        provider.reset()
        return size

    return measure


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KB tmpfs (root can mount one): a disk that really fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
