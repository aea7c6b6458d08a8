"""`secrets`: well-known credential formats, each a fixed prefix or a keyword in front of it, after
the patterns of detect-secrets' plugins (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, JWT, basic
auth in URLs), with Anthropic and Google API keys and database connection strings added. No
generic high-entropy guessing: it fires on hashes and ids."""

from __future__ import annotations

import base64
import binascii
import json
import re

from addon.guard.detector import Pattern, PatternDetector


def _jwt(token: str) -> bool:
    """A JWT's first part is base64url JSON naming its algorithm (so `eyJ...` ids are not)."""
    head = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


# A password in a URL or a connection string: placeholders that are not one are left alone.
_PLACEHOLDER = re.compile(r"(?i)^(?:\*+|x+|\.+|<[^>]*>|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|%\([a-z_]+\)s|\{\{?[^}]*\}\}?|"
                          r"password|pass|passwd|pwd|secret|changeme|\[redacted[^\]]*\]?|redacted)$")


def _password(value: str) -> bool:
    # (a port-like number is a host:port written in front of an @: mitmproxy's `reverse:http://h:1@h`)
    return not _PLACEHOLDER.match(value) and not (value.isdigit() and len(value) <= 5)


_T = r"(?![A-Za-z0-9_\-])"  # a token ends where its alphabet does
_G = r"g(?:h[pousr]_|ithub_pat_|l(?:pat|oas|dt|rt|ptt|ft|soat)-)"  # GitHub's and GitLab's prefixes, found at once

DETECTOR = PatternDetector(
    "secrets",
    [
        # AWS: an access key id, and a secret key named as one (40 base64 characters after the name)
        Pattern(r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}" + _T,
                anchors=("A(?:KIA|SIA|BIA|CCA|3T)",)),
        Pattern(r"(?i)\baws[A-Za-z0-9_.\-]{0,20}?(?:secret|key|pass|token)[A-Za-z0-9_.\-]{0,20}?['\"]?\s{0,3}[:=]"
                r"{1,2}>?\s{0,3}['\"]?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])", group=1,
                anchors=("aws",), folded=True),
        # GitHub, GitLab
        Pattern(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}" + _T,
                anchors=(_G,)),
        Pattern(r"\bgithub_pat_[A-Za-z0-9_]{82}" + _T, anchors=(_G,)),
        Pattern(r"\b(?:glpat|gloas|gldt|glrt|glptt|glft|glsoat)-[A-Za-z0-9_\-]{20,64}" + _T,
                anchors=(_G,)),
        # Slack: tokens and incoming webhooks
        Pattern(r"\bxox(?:a|b|p|o|s|r|e)-(?:\d+-)?[A-Za-z0-9\-]{10,250}" + _T, anchors=("xox",)),
        Pattern(r"https://hooks\.slack\.com/(?:services|workflows)/T[A-Z0-9]{6,12}/[A-Z0-9]{6,12}/[A-Za-z0-9]{16,64}",
                anchors=("://",), lead=6),
        # Stripe: secret and restricted keys, webhook secrets (publishable pk_ keys are public)
        Pattern(r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,247}" + _T, anchors=("k_(?:live|test)_",), lead=1),
        Pattern(r"\bwhsec_[A-Za-z0-9]{24,64}" + _T, anchors=("whsec_",)),
        # Anthropic; OpenAI project, service-account and admin keys, and the older ones marked T3BlbkFJ
        Pattern(r"\bsk-ant-(?:api|admin|oat|ort)\d{2}-[A-Za-z0-9_\-]{80,120}" + _T, anchors=("sk-",)),
        Pattern(r"\bsk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_\-]{40,250}" + _T, anchors=("sk-",)),
        Pattern(r"\bsk-[A-Za-z0-9_\-]{16,80}T3BlbkFJ[A-Za-z0-9_\-]{16,80}" + _T, anchors=("sk-",)),
        # Google API keys
        Pattern(r"\bAIza[0-9A-Za-z_\-]{35}" + _T, anchors=("AIza",)),
        # JWTs (a header that decodes to JSON with "alg")
        Pattern(r"\beyJ[A-Za-z0-9_\-]{10,2000}\.eyJ[A-Za-z0-9_\-]{10,8000}\.[A-Za-z0-9_\-]{10,2000}" + _T,
                valid=_jwt, anchors=("eyJ",)),
        # a URL with a password (postgres://, mysql://, redis://, amqp://, https://...): the password.
        # It begins at "://" (the scheme behind it is not masked), so re finds it at memchr speed.
        Pattern(r"(?<=[A-Za-z0-9])://[^\s:/@\"'<>]{0,128}:([^\s/@\"'<>]{1,256})@[A-Za-z0-9\[\]._\-]{1,253}",
                group=1, valid=_password, anchors=("://",)),
        # key=value connection strings (ADO.NET, JDBC properties, libpq): a host, then a password
        Pattern(r"(?i)\b(?:server|host|hostaddr|data source|address|addr)\s{0,3}=\s{0,3}[^;\s\"']{1,253}[;\s]"
                r"[^\n\"]{0,300}?\b(?:password|pwd)\s{0,3}=\s{0,3}([^;\s\"']{1,128})", group=1, valid=_password,
                anchors=("assword", "pwd"), lead=620, folded=True),
    ],
    max_len=12000,
)
