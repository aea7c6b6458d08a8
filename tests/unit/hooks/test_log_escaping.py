"""Client fields in the access log: escaped after their keys are redacted (tests/e2e/test_log_injection.py
drives a real gateway)."""

from __future__ import annotations

from addon.hooks import accesslog
from addon.hooks.logredact import Secrets
from addon.policy.keys_parse import parse_keys

VK = "vk_victim_log_3141592"


def test_escaping_keeps_keys_redacted():
    """A key right after a control character is still masked: redaction runs before escaping
    (an escape's hex digits would glue to the key and hide it from the token lookup)."""
    keys = parse_keys({"virtual_keys": {VK: {"provider": "openai", "api_key": "sk-log-real-key-271828"}}})
    saved = accesslog.ACCESS.redact
    accesslog.ACCESS.redact = Secrets(keys).redact
    try:
        for glue in ("\x1b", "\n", "\u2028", "\\", '"', " "):
            field = accesslog.value(f"gpt{glue}{VK}{glue}x")
            assert VK not in field and "vk_...592" in field, field
            assert VK not in accesslog.word(f"/v1/{glue}{VK}")
    finally:
        accesslog.ACCESS.redact = saved


def test_plain_fields_are_written_as_they_are():
    assert accesslog.value("gpt-4o-mini") == "gpt-4o-mini"
    assert accesslog.value("claude-sonnet-4-6@2025") == "claude-sonnet-4-6@2025"
    assert accesslog.word("/v1/chat/completions") == "/v1/chat/completions"
    assert (
        accesslog.value("gpt 4o") == '"gpt 4o"' and accesslog.value("a=b") == '"a=b"' and accesslog.word("a=b") == "a=b"
    )
