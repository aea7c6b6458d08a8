"""watched_stream: the usage watcher composed after a provider's stream translator."""

from addon.accounting import watched_stream
from addon.usage import StreamUsage, Usage
from tests.fakeprovider import openai_stream

STREAM = openai_stream({"model": "gpt-4o"})


def run(stream_callable, pieces) -> bytes:
    out = []
    for piece in [*pieces, b""]:
        sent = stream_callable(piece)
        assert b"" not in sent  # an empty chunk would end an HTTP/1.1 chunked body
        out += sent
    return b"".join(out)


def test_after_a_translator_that_returns_lists_and_flushes_at_the_end():
    held = []

    def translator(piece: bytes):  # holds everything until the end, then returns it in two parts
        if piece:
            held.append(piece)
            return []
        whole = b"".join(held)
        return [whole[:10], whole[10:]]

    watcher = StreamUsage(strip=True)
    out = run(watched_stream(translator, watcher), STREAM)
    assert watcher.usage == Usage(5, 2, 0)
    assert b'"choices": []' not in out and out.endswith(b"data: [DONE]\n\n")


def test_passthrough_stream_is_watched():
    watcher = StreamUsage(strip=False)
    assert run(watched_stream(True, watcher), STREAM) == b"".join(STREAM)
    assert watcher.usage == Usage(5, 2, 0)


class FailsOnThirdPiece(StreamUsage):
    __slots__ = ("calls",)

    def feed(self, piece):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return super().feed(piece)


def test_a_failing_watcher_does_not_break_the_stream():
    whole = b"".join(STREAM)
    pieces = [whole[i:i + 50] for i in range(0, len(whole), 50)]
    # the bytes it held back and the rest go on; nothing lost, nothing doubled
    assert run(watched_stream(True, FailsOnThirdPiece(strip=True)), pieces) == whole


def test_flows_loaded_from_a_file_are_not_counted_again():
    import json
    from mitmproxy.test import taddons, tflow, tutils
    from addon.accounting import UsageAccounting
    from addon.store import MemoryStore

    store = MemoryStore()
    accounting = UsageAccounting(store)
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}).encode()
    with taddons.context(accounting) as tctx:
        tctx.configure(accounting, usage_db="")
        for live in (True, False):
            f = tflow.tflow(resp=tutils.tresp(content=body))
            f.live = live
            f.metadata["gateway"] = {"fingerprint": "fp-live" if live else "fp-loaded", "key": "k", "provider": "openai", "model": "m"}
            accounting.response(f)
    assert store.spend("fp-live", None, 2e9)[0] == 7
    assert store.spend("fp-loaded", None, 2e9)[0] == 0
