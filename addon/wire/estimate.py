"""Token estimates for requests whose provider usage never arrived. Pure: no mitmproxy.

A streaming client that hangs up as soon as it has the answer (before the usage chunk), a
provider stream that breaks off, a provider that never reports usage: the answer was produced
and must be paid for. The estimate is CHARS_PER_TOKEN characters per token (about right for
English text with the common BPE tokenizers; a rough figure, never zero for text that exists):

- prompt: the characters of every JSON string value in the request body (messages, system,
  tool definitions; names and punctuation are not counted), unless the provider already said
  how many input tokens it read (Anthropic's `message_start` does): a known count wins;
- completion: the characters of the answer the client was sent (`content`, `reasoning_content`,
  tool-call `arguments`, refusals; in Anthropic format `text`, `thinking`, `partial_json`).

`estimate_usage(request_body, streamed_text)` is the one entry point; `StreamSample` keeps a
bounded sample of a stream's client-bound bytes and its text as `streamed_text`.
"""

from __future__ import annotations

import json
import re
import time

from addon.wire.tokens import MAX_TOKENS, Usage

CHARS_PER_TOKEN = 4
SAMPLE_BYTES = 32 * 1024  # client-bound bytes kept per stream; beyond, the text is scaled up

# answer text in client-bound SSE chunks (OpenAI and Anthropic format): the JSON string value
# of one of these keys. `"key":"` cannot occur inside a JSON string (its quotes would be escaped).
_TEXT = re.compile(
    rb'"(?:content|reasoning_content|arguments|refusal|text|thinking|partial_json)"\s*:\s*"((?:[^"\\]|\\.)*)"'
)


def tokens_for(chars: int) -> int:
    """Tokens for `chars` characters: CHARS_PER_TOKEN a token, rounded up (1 char -> 1 token)."""
    return min(MAX_TOKENS, -(-chars // CHARS_PER_TOKEN)) if chars > 0 else 0


def prompt_chars(request_body: bytes) -> int:
    """Characters of the string values in a JSON request body (its byte length if not JSON)."""
    try:
        data = json.loads(request_body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return len(request_body)
    chars = 0
    todo = [data]
    while todo:  # iterative: a deep body must not recurse
        value = todo.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return chars


def streamed_text(sse: bytes) -> str:
    """The answer text carried by client-bound SSE bytes (chunks cut at either end are skipped)."""
    parts = []
    for m in _TEXT.finditer(sse):
        try:
            parts.append(json.loads(b'"' + m.group(1) + b'"'))
        except (ValueError, UnicodeDecodeError):
            parts.append(m.group(1).decode("utf-8", "replace"))
    return "".join(parts)


def estimate_usage(request_body: bytes, streamed_text: str, prompt_tokens: int | None = None) -> Usage:
    """Usage of a request whose provider usage is missing: estimated, and marked so.

    `prompt_tokens`: input tokens the provider did report (e.g. Anthropic's message_start);
    they take precedence over the estimate from `request_body`."""
    return estimate_from_chars(request_body, len(streamed_text), prompt_tokens)


def estimate_from_chars(request_body: bytes, completion_chars: int, prompt_tokens: int | None = None) -> Usage:
    """`estimate_usage` for an answer whose length in characters is all that is known."""
    prompt = min(prompt_tokens, MAX_TOKENS) if prompt_tokens else tokens_for(prompt_chars(request_body))
    return Usage(prompt, tokens_for(completion_chars), 0, True)


class StreamSample:
    """The first SAMPLE_BYTES of what a stream sent its client, and how much it sent in all:
    enough to estimate the answer's length without keeping whole streams in memory."""

    __slots__ = ("sent", "late_usage", "_kept", "first_at")

    def __init__(self) -> None:
        self.sent = 0
        # the usage was first seen in the stream's final call: made up by a translator for a
        # stream that ended without the provider's final count (input tokens known, output not)
        self.late_usage = False
        self._kept: list[bytes] = []
        self.first_at = 0.0  # when the first bytes went to the client (time.time()): time to first token

    def add(self, data: bytes) -> None:
        if self.sent < SAMPLE_BYTES:
            if not self.sent:
                self.first_at = time.time()
            self._kept.append(data)
        self.sent += len(data)

    def text_chars(self) -> int:
        """Characters of answer text sent: those in the sample, scaled to all bytes sent."""
        kept = b"".join(self._kept)
        chars = len(streamed_text(kept))
        if chars and self.sent > len(kept):
            chars = int(chars * self.sent / len(kept))
        return chars
