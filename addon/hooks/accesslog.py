"""One access-log line per request, at the default verbosity, never a key.

    gateway: 200 key=team-alpha provider=openai model=gpt-4o-mini tokens=12/34 latency=523ms
    gateway: 200 key=team-alpha provider=openai model=gpt-4o tokens=900/12 dropped=cache_control,thinking latency=840ms
    gateway: 429 budget_exceeded key=team-alpha provider=openai model=gpt-4o latency=1ms
    gateway: 401 from provider key=team-alpha provider=openai model=gpt-4o latency=212ms
    gateway: 401 invalid_api_key POST /v1/chat/completions latency=0ms
    gateway: 0 failed key=team-alpha provider=anthropic model=claude-sonnet-4-6 tokens=~812/40 latency=3100ms

(`~`: an estimate, for a stream abandoned before the provider's usage arrived.)

Every field that a client or the keys file chose (model, path, method, key and target names,
dropped parameters) is escaped (wire/logtext.py): a line break, an ANSI escape or a quote in it
comes out as `\\n`, `\\x1b`, `\\"`, and a value with a space or `=` is quoted, so that no request can
end the gateway's line, start one of its own, or add a field (`model="gpt-4o tokens=1/1"`).

Requests made with a known key are logged when hooks/accounting.py counts them (it has their
tokens then, so nothing is parsed twice; up to FLUSH_EVERY seconds after the response); the rest
(no or an unknown key, unknown paths) when their response is made. Keys are named as everywhere
else: the key's `name`, or `key-<fingerprint>`. Successful health checks are not logged.

The lines go straight to stdout, one write per accounting batch, as mitmproxy's own per-flow
lines (Dumper) do, not through Python logging: a log record is dispatched to every mitmproxy
addon, about 1M instructions per line (bench/instructions.py), a batched write ~1/100 of that.
"""

from __future__ import annotations

import functools
import logging
import sys
import time

from addon.guard.record import log_fields
from addon.routing.state import FlowState
from addon.wire import logtext
from addon.wire.secrets import fingerprint

# mitmproxy's per-connection lines, which the access line replaces at the default verbosity
CONNECTION_NOISE = ("client connect", "client disconnect", "server connect", "server disconnect")


class QuietConnections(logging.Filter):
    """Drops mitmproxy's INFO `client connect` / `server disconnect ...` lines; errors stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not str(record.msg).startswith(CONNECTION_NOISE)


class AccessLog:
    """The `access_log` option: off, mitmproxy's connection lines come back and no access lines
    are written. Lines wait in `pending` until `flush()` (called by each accounting batch)."""

    def __init__(self) -> None:
        self.quiet = QuietConnections()
        self.enabled = True
        self.pending: list[str] = []
        self.out = sys.stdout
        self.redact = lambda text: text  # gateway.py sets the log redaction's (keys in force masked)
        self._second, self._stamp = -1, ""  # the last line's whole second and its "%H:%M:%S"

    def add(self, text: str, when: float) -> None:
        second = int(when)
        if second != self._second:  # localtime + strftime: about half of a line's cost, once a second
            self._second, self._stamp = second, time.strftime("%H:%M:%S", time.localtime(second))
        self.pending.append(f"[{self._stamp}.{int(when % 1 * 1000):03d}] gateway: {text}")

    def flush(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            try:
                self.out.write(self.redact("\n".join(lines)) + "\n")
                self.out.flush()
            except (OSError, ValueError):  # stdout closed or gone: the access log is not worth a failure
                pass

    def load(self, loader) -> None:
        loader.add_option(
            "access_log", bool, True,
            "One log line per request (key name, provider, model, status, tokens, latency) in place "
            "of mitmproxy's per-connection lines.",
        )

    def configure(self, updated) -> None:
        if "access_log" in updated:
            from mitmproxy import ctx
            self.enabled = ctx.options.access_log
            server_log = logging.getLogger("mitmproxy.proxy.server")
            server_log.removeFilter(self.quiet)
            if self.enabled:
                server_log.addFilter(self.quiet)

    def done(self) -> None:
        self.flush()
        logging.getLogger("mitmproxy.proxy.server").removeFilter(self.quiet)


ACCESS = AccessLog()  # one per gateway process: the accounting reads whether it is on


def value(text) -> str:
    """A client's (or the keys file's) text as one field of a log line. Keys are redacted before
    escaping (an escape glues its hex digits to the next word, hiding a key from the token lookup
    that the batch's redaction does); text with nothing to escape is left to that batch redaction."""
    text = str(text)
    if text and logtext.plain(text) and " " not in text and "=" not in text:
        return text
    return logtext.value(ACCESS.redact(text))


def word(text) -> str:
    """A field on its own (a method, a path), as `value` does it."""
    text = str(text)
    if text and logtext.plain(text) and " " not in text:
        return text
    return logtext.word(ACCESS.redact(text))


def outcome(status: int, state: FlowState | None) -> str:
    """`200`, `429 budget_exceeded` (the gateway refused), `502 upstream_unreachable` (the
    gateway's answer for a provider it could not reach), `401 from provider`, `0 failed`."""
    if state is not None and state.answered is not None:
        return f"{status} {word(state.answered)}"
    if status == 0:
        return "0 failed"
    if state is not None and state.failed is not None:  # the gateway's 502/504 for a provider it got no answer from
        return f"{status} {state.failed}"
    if status >= 400:
        return f"{status} from provider"
    return str(status)


def key_name(state: FlowState) -> str:
    """The key's name, unless someone named a key with the key itself."""
    name = state.key if state.key is not None else ""
    return f"key-{state.fingerprint}" if _fingerprint(name) == state.fingerprint else name


_fingerprint = functools.lru_cache(maxsize=1024)(fingerprint)  # a SHA-256 per line otherwise; names are few


def log_counted(state: FlowState, status: int, prompt_tokens: int, completion_tokens: int, latency_ms: float,
                ended: float, estimated: bool = False) -> None:
    if not ACCESS.enabled:
        return
    provider = state.provider if state.provider is not None else "-"
    model = state.model if state.model is not None else "-"
    line = f"{outcome(status, state)} key={value(key_name(state))} provider={value(provider)} model={value(model)}"
    if prompt_tokens or completion_tokens:
        line += f" tokens={'~' if estimated else ''}{prompt_tokens}/{completion_tokens}"
    if state.target is not None:  # a key with several targets: which one answered, after how many attempts
        line += f" target={value(state.target)} attempts={state.attempts or 1}"
    if state.dropped_params:  # dropped or approximated in translation (x-gateway-dropped-params)
        line += f" dropped={value(','.join(state.dropped_params))}"
    if state.guardrails:  # what the key's guardrails masked or blocked, by detector (never the text)
        line += log_fields(state.guardrails)
    ACCESS.add(f"{line} latency={latency_ms:.0f}ms", ended)


def log_unkeyed(method: str, path: str, status: int, state: FlowState | None, latency_ms: float, ended: float) -> None:
    if not ACCESS.enabled or status == 200 and "/health" in path:
        return
    ACCESS.add(
        f"{outcome(status, state)} {word(method)} {word(path.partition('?')[0][:200])} latency={latency_ms:.0f}ms",
        ended,
    )
