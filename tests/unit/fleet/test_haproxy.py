"""The HAProxy configuration the fleet renders (fleet/), read without starting HAProxy.
HAProxy itself in front of real workers: tests/e2e/test_fleet.py."""

from __future__ import annotations

from fleet.supervisor import render_haproxy


def test_haproxy_waits_on_a_silent_worker_longer_than_the_gateway_waits_itself():
    """Otherwise HAProxy's HTML 504 reaches the client instead of the gateway's JSON 504 or the
    next target's answer (equal timeouts: HAProxy's won 5 of 5 in a scaled-down run)."""
    import re

    def timeouts(*args: str) -> set[int]:
        config = render_haproxy("127.0.0.1:18080", [41001], 30, list(args))
        return {int(v) for v in re.findall(r"^\s*timeout (?:client|server) (\d+)s$", config, re.M)}

    assert len(timeouts()) == 1 and min(timeouts()) > 600 * 3  # upstream_timeout for each of up to 3 attempts
    assert min(timeouts("-q", "--set", "upstream_timeout=900")) > 900 * 3
    assert min(timeouts("--set", "upstream_timeout=100", "--set", "max_attempts=5")) > 100 * 5
    assert min(timeouts("--set", "stream_idle_timeout=4000")) > 4000
