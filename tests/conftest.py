"""Shared fixtures: a fake provider on 127.0.0.1 and real gateway processes in front of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakeprovider import FakeProvider
from tests.gatewayproc import GatewayProcess

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
