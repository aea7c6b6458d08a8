"""Shared fixtures: a fake provider on 127.0.0.1 and real gateway processes in front of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.fakeprovider import FakeProvider
from tests.gatewayproc import GatewayProcess

# The fuzz tests (tests/test_fuzz.py) draw the same bodies at every run of the suite, CI's included:
# a failure there is a bug seen again on the next run, never one the dice found once. To look for
# new ones: HYPOTHESIS_PROFILE=explore ./run.sh test tests/test_fuzz.py (fresh draws each run).
settings.register_profile("suite", derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

# recorded real provider traffic and the official specs: present in the team's checkout
# layout (../shared), absent in a user's clone; tests that read it skip without it
SHARED_REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"


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


@pytest.fixture(scope="session")
def gateway_factory():
    started: list[GatewayProcess] = []

    def start(keys: dict | str, extra_args: list[str] | None = None, env: dict | None = None) -> GatewayProcess:
        gw = GatewayProcess(keys, extra_args, env).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def sdk_body_bytes(provider, gateway_factory):
    """measure(messages, **create_args): the bytes of the body the openai SDK sends for them. A
    budgeted request reserves its body's bytes + max_tokens (docs/shared-state.md): tests that need
    a budget to fit exactly N requests size it with this. Call it before setting a provider handler
    (it resets the provider)."""
    import openai

    def measure(messages: list, **create_args) -> int:
        probe = gateway_factory({"providers": {"openai": {"base_url": provider.url + "/v1"}},
                                 "virtual_keys": {"vk_probe": {"provider": "openai", "api_key": "sk-probe-123456"}}})
        openai.OpenAI(base_url=probe.url + "/v1", api_key="vk_probe", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=messages, **create_args)
        size = len(provider.received[-1].body)
        probe.stop()
        provider.reset()
        return size

    return measure
