"""hooks/patches/errorpages.py: a provider that cannot be reached is told to the client by cause,
from mitmproxy's connect or TLS error text; the address stays in the log."""

from __future__ import annotations

import pytest

from addon.hooks.accesslog import outcome
from addon.hooks.patches.errorpages import unreachable_cause
from addon.routing.state import FlowState


@pytest.mark.parametrize(
    "message, tls, cause",
    [
        ("[Errno -2] Name or service not known", True, "the DNS lookup of api.openai.com failed"),
        ("[Errno -3] Temporary failure in name resolution", True, "the DNS lookup of api.openai.com failed"),
        (
            "[Errno 111] Connect call failed ('10.0.0.5', 443)",
            True,
            "the provider refused the connection (nothing listens at its base_url)",
        ),
        ("[Errno 110] Connect call failed ('10.0.0.5', 443)", True, "connecting to the provider timed out"),
        ("[Errno 101] Network is unreachable", False, "no route to the provider (network unreachable)"),
        (
            "The remote server does not speak TLS.",
            True,
            "the TLS handshake with the provider failed: The remote server does not speak TLS.",
        ),
        (
            "Certificate verify failed: unable to get local issuer certificate",
            True,
            "the TLS handshake with the provider failed: Certificate verify failed: unable to get local issuer certificate",
        ),
        ("connection cancelled", False, "could not connect to the provider"),
    ],
)
def test_each_cause_in_words_without_the_address(message, tls, cause):
    said = unreachable_cause(message, "api.openai.com", tls)
    assert said == cause
    assert "10.0.0.5" not in said and "443" not in said


def test_the_access_line_says_who_answered_as_the_header_does():
    meta = {"key": "team-a", "fingerprint": "f" * 16}
    assert outcome(502, FlowState(**meta, failed="upstream_unreachable")) == "502 upstream_unreachable"
    assert outcome(504, FlowState(**meta, failed="upstream_timeout")) == "504 upstream_timeout"
    assert outcome(502, FlowState(**meta)) == "502 from provider"  # the provider's own 502
    assert outcome(0, FlowState(**meta, failed="upstream_unreachable")) == "0 failed"  # the client had gone
