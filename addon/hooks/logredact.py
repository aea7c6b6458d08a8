"""Keys out of the log: a filter on every handler of the root logger, mitmproxy's own included.

mitmproxy logs what it sees, e.g. `Client closed connection before completing request headers:
b'...Authorization: Bearer vk_...'`. Its handlers (termlog in mitmdump, the event log in mitmweb)
hang on the root logger (mitmproxy/log.py `MitmLogHandler.install`), and a filter on a logger only
sees records logged to that logger itself, so the filter goes on each handler. Every record is
rewritten before any handler formats it:

- the value after `Authorization`, `Proxy-Authorization`, `x-api-key`, `api-key`,
  `x-goog-api-key` or `Cookie` (as a header line, in a bytes repr, or `name=value`), and of a
  `?key=` / `&api_key=` query parameter, is masked (every place a client may put a key:
  wire/keyplaces.py);
- every known key (the virtual keys and real provider keys in force, from the gateway's KeyStore,
  so a reload is seen at the next record) is masked wherever it appears.

Masked means `vk_...xyz` (wire/secrets.py `mask`): enough to tell keys apart, never enough to use one. The
message is formatted once and the arguments dropped; an exception's traceback is folded into the
message so that it is redacted too.

After redaction, the record is made unable to forge another (wire/logtext.py `record`): control
characters, line and paragraph separators and ANSI escapes become `\\x..`/`\\u....` escapes, and
every line after a record's first starts with whitespace. The gateway escapes the client's fields
in its own lines; this is for the text it does not write itself (mitmproxy's lines, an exception's
message quoting a client's value).
"""

from __future__ import annotations

import logging
import re

from addon.policy.virtual_keys import KeyStore

from addon.wire import logtext
from addon.wire.secrets import mask

# a header name, its separator, an optional auth scheme, then the secret (up to whitespace, a
# quote, a backslash of a bytes repr's `\r\n`, or a separator)
_HEADER = re.compile(
    r"""(?i)((?:proxy-)?authorization|x-api-key|x-goog-api-key|(?<![\w-])api-key|cookie|(?<=[?&])(?:api_)?key(?==))"""
    r"""(["']?\s*[:=]\s*["']?)((?:bearer|basic)\s+)?([^\s"'\\,;&]+)"""
)
# candidate tokens for the known-key lookup: runs of characters that are not separators. The
# C0 and C1 controls and DEL separate too: a key right after an ANSI escape (a client's model
# "\x1b[2Kvk_...") is a token of its own
_CONTROLS = "\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f"  # those that \s does not already cover
_TOKEN = re.compile(rf"""[^\s"'\\,;:=()\[\]{{}}<>&/{_CONTROLS}]+""")
_TOKEN_CHARS = re.compile(rf"""[^\s"'\\,;:=()\[\]{{}}<>&/{_CONTROLS}]+\Z""")
# the same tokens as _TOKEN.findall, found faster: the separators other than whitespace become a
# space, and str.split() splits at whitespace as \s defines it (both are Py_UNICODE_ISSPACE)
_SEPARATORS_TO_SPACE = str.maketrans(
    dict.fromkeys(
        "\"'\\,;:=()[]{}<>&/"
        + "".join(map(chr, [*range(0x00, 0x09), *range(0x0E, 0x1C), *range(0x7F, 0x85), *range(0x86, 0xA0)])),
        " ",
    )
)


def tokens(text: str) -> list[str]:
    """`_TOKEN.findall(text)`, about 3 times as fast."""
    return text.translate(_SEPARATORS_TO_SPACE).split()


def may_name_header(text: str) -> bool:
    """False only where _HEADER cannot match: ASCII text naming none of its headers. The
    case-insensitive regex costs about 0.2 us per character of text searched (every access-log
    batch goes through here); this check about 1/100 of that. Non-ASCII text goes to the regex,
    whose case folding matches more than str.lower does (the Kelvin sign for a k)."""
    if not text.isascii():
        return True
    lowered = text.lower()
    return ("authorization" in lowered or "api-key" in lowered or "cookie" in lowered
            or "?key=" in lowered or "&key=" in lowered or "_key=" in lowered)


class Secrets:
    """The known keys of one KeyStore: a set for whole tokens, a list for odd-shaped keys."""

    def __init__(self, keys: KeyStore | None) -> None:
        self.keys = keys
        secrets = set(keys.secrets()) if keys is not None else set()
        secrets.discard("")
        self.tokens = frozenset(s for s in secrets if _TOKEN_CHARS.match(s))
        self.odd = tuple(sorted(secrets - self.tokens, key=len, reverse=True))

    def redact(self, text: str) -> str:
        if may_name_header(text) and _HEADER.search(text):
            text = _HEADER.sub(_mask_header, text)
        if self.tokens and not self.tokens.isdisjoint(tokens(text)):
            text = _TOKEN.sub(self._mask_token, text)
        for secret in self.odd:
            if secret in text:
                text = text.replace(secret, mask(secret))
        return text

    def _mask_token(self, m: re.Match) -> str:
        token = m.group()
        return mask(token) if token in self.tokens else token


def _mask_header(m: re.Match) -> str:
    value = m.group(4)
    if value == "REDACTED" or "..." in value:
        return m.group()
    return f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{mask(value)}"


class RedactingFilter(logging.Filter):
    """Rewrites each record in place (it never drops one). `keys` is called for the KeyStore in
    force; the secrets are recomputed only when it returns another one."""

    def __init__(self, keys) -> None:
        super().__init__("gateway-redaction")
        self._keys = keys
        self._secrets = Secrets(None)

    def secrets(self) -> Secrets:
        keys = self._keys()
        if keys is not self._secrets.keys:
            self._secrets = Secrets(keys)
        return self._secrets

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_gateway_redacted", False):
            return True  # a second handler: done already
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            if record.exc_text:
                message += "\n" + record.exc_text
            if record.stack_info:
                message += "\n" + record.stack_info
                record.stack_info = None
            record.msg = logtext.record(self.secrets().redact(message))
            record.exc_text = None
        except Exception:  # never let a log record through unredacted, never raise in logging
            record.msg = "(log record dropped by the gateway's key redaction: it could not be read)"
            record.exc_info = record.exc_text = record.stack_info = None
        record.args = None
        record._gateway_redacted = True
        return True


class LogRedaction:
    """The addon: installs one RedactingFilter on every handler of the root logger, at load and
    whenever options change (handlers added later, e.g. by another addon, get it then too)."""

    def __init__(self, live) -> None:
        self.filter = RedactingFilter(lambda: live.keys)

    def install(self) -> None:
        for handler in logging.getLogger().handlers:
            if self.filter not in handler.filters:
                handler.addFilter(self.filter)

    def uninstall(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self.filter)

    def load(self, loader) -> None:
        self.install()

    def configure(self, updated) -> None:
        self.install()

    def running(self) -> None:
        self.install()
