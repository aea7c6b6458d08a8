"""No key reaches the log, not even through mitmproxy's own log lines: the RedactingFilter
(addon/hooks/logredact.py) in-process. Through a real gateway: tests/e2e/test_log_redaction.py."""

from __future__ import annotations

import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from addon.hooks import logredact
from addon.policy.keys_parse import parse_keys
from addon.hooks.logredact import RedactingFilter, Secrets
from tests.conftest import examples

VK = "vk_user_secret_7f3a"
REAL = "sk-real-provider-key-123456"
ODD = "vk with spaces/and:colons 123"


def keystore(*virtual: str, real: str = REAL):
    return parse_keys({"virtual_keys": {vk: {"provider": "openai", "api_key": real} for vk in virtual}})


def redacted(flt: RedactingFilter, msg: str, *args, exc_info=None) -> str:
    record = logging.LogRecord("mitmproxy.proxy.server", logging.INFO, __file__, 1, msg, args, exc_info)
    assert flt.filter(record) is True  # never dropped
    return logging.Formatter().format(record)


def test_mitmproxys_mid_headers_line_is_redacted_by_header_and_by_known_key():
    keys = keystore(VK)
    flt = RedactingFilter(lambda: keys)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + VK.encode()
        + b"\r\nX-Api-Key: other-secret-99\r\n"
    )
    text = redacted(flt, "Client closed connection before completing request headers: %r", head)
    assert VK not in text and "other-secret-99" not in text
    assert "Authorization: Bearer vk_...f3a" in text
    # a known key anywhere, not only in a header; an unknown token is left alone
    text = redacted(flt, "upstream said %s about %s and api-key=%s", REAL, "innocent-token", "abcdefghijkl")
    assert REAL not in text and "sk-...456" in text and "innocent-token" in text and "abcdefghijkl" not in text


def test_tracebacks_and_odd_shaped_keys_are_redacted_too():
    keys = keystore(VK, ODD)
    flt = RedactingFilter(lambda: keys)
    try:
        raise ValueError(f"bad key {REAL} and {ODD}")
    except ValueError:
        import sys
        text = redacted(flt, "failed", exc_info=sys.exc_info())
    assert "Traceback" in text and "ValueError" in text
    assert REAL not in text and ODD not in text


# the fast paths (logredact.tokens, may_name_header) must find what the regexes find
_HEADERISH = st.sampled_from(["Authorization", "x-API-key", "api-key", "proxy-authorization", "AUTHORIZATION",
                              "\u212a", "ı", "İ", "ſ", "Bearer ", ": ", "=", '"', "'", "\\", "\r\n", "\u2003",
                              "\x1c", "\x85", VK, REAL, "-", "_", "/", "&", "key", " "])


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(st.one_of(_HEADERISH, st.text(max_size=6)), max_size=14).map("".join))
def test_the_fast_paths_agree_with_the_regexes(text):
    assert logredact.tokens(text) == logredact._TOKEN.findall(text)
    if logredact._HEADER.search(text):
        assert logredact.may_name_header(text)
    secrets = Secrets(keystore(VK, ODD))
    slow = logredact._HEADER.sub(logredact._mask_header, text)
    if not secrets.tokens.isdisjoint(logredact._TOKEN.findall(slow)):
        slow = logredact._TOKEN.sub(secrets._mask_token, slow)
    for secret in secrets.odd:
        slow = slow.replace(secret, logredact.mask(secret))
    assert secrets.redact(text) == slow


def test_tokens_split_at_every_separator_the_regex_knows():
    """Every code point, between two token characters: the same tokens (whitespace included:
    the regex's \\s and str.split() agree on what is whitespace)."""
    text = "a" + "a".join(map(chr, range(0x110000))) + "a"  # each code point alone between two a's
    if logredact.tokens(text) != logredact._TOKEN.findall(text):  # (one call each: 1.1M calls took 3 s)
        for code in range(0x110000):  # name the first that differs
            one = f"a{chr(code)}b"
            assert logredact.tokens(one) == logredact._TOKEN.findall(one), hex(code)
        raise AssertionError("the tokens differ, and for no code point alone")


def test_an_access_line_naming_a_header_in_odd_case_is_still_masked():
    secrets = Secrets(keystore(VK))
    assert "abcdefghijkl" not in secrets.redact("upstream said X-Api-KEY: abcdefghijkl")
    assert "abcdefghijkl" not in secrets.redact("upstream said x-api-\u212aey: abcdefghijkl")  # Kelvin sign: the regex
    assert secrets.redact("200 key=team provider=openai model=gpt-4o-mini latency=3ms") == \
        "200 key=team provider=openai model=gpt-4o-mini latency=3ms"


def test_a_reload_is_seen_at_the_next_record():
    current = {"keys": keystore(VK)}
    flt = RedactingFilter(lambda: current["keys"])
    assert "vk_new_key_000111" in redacted(flt, "seen vk_new_key_000111")
    current["keys"] = keystore("vk_new_key_000111", real="sk-new-real-000222")
    text = redacted(flt, "seen vk_new_key_000111 sk-new-real-000222")
    assert "vk_new_key_000111" not in text and "sk-new-real-000222" not in text


