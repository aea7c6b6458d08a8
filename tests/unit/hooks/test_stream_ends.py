"""How a broken stream is ended (addon/hooks/streamends.py): the tail each API gets. Providers that
reset, stall or send garbage through a real gateway: tests/e2e/test_stream_ends.py."""

from __future__ import annotations

import json


from addon.wire.sse import DONE
from addon.apis.openai_chat import OPENAI_CHAT
from addon.hooks.streamends import BROKEN, chunked, stalled, tail


# --- pure parts -----------------------------------------------------------------------------


def test_tail_keeps_a_proper_end_and_adds_the_apis_error_events_otherwise():
    finish = [b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n', DONE]
    error = OPENAI_CHAT.stream_error(*BROKEN)
    assert tail(finish, error, idle=False) == finish  # a translator that ended the stream: as it is
    assert tail([], error, idle=False) == error  # a passthrough stream: the error event, [DONE]
    assert json.loads(error[0][6:])["error"]["code"] == "upstream_stream_broken" and error[1] == DONE
    idle = tail(finish, OPENAI_CHAT.stream_error(*stalled(120)), idle=True)  # a stall: error before [DONE]
    assert (
        idle[0] == finish[0] and json.loads(idle[1][6:])["error"]["code"] == "stream_idle_timeout" and idle[2] == DONE
    )
    assert len(idle) == 3
    assert chunked([b"ab", b"", b"c"]) == b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
