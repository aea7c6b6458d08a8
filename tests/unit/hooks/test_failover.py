"""Failover's pure parts (addon/hooks/failover.py). Several targets per virtual key through a real
gateway: tests/e2e/test_failover.py and tests/e2e/test_failover_edges.py."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("headers, seconds", [({"retry-after": "7"}, 7.0), ({"retry-after-ms": "1500"}, 1.5),
                                              ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0), ({}, 0.0),
                                              ({"retry-after": "-3"}, 0.0), ({"retry-after": "1e9"}, 0.0)])
def test_a_429s_retry_after_is_read_in_seconds_or_milliseconds(headers, seconds):
    from addon.hooks.failover import retry_after_seconds

    assert retry_after_seconds(headers) == seconds
