"""watched_stream: the usage watcher composed after a provider's stream translator."""

from addon.hooks.accounting import watched_stream
from addon.wire.tokens import StreamUsage, Usage
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
    from addon.hooks.accounting import UsageAccounting
    from addon.hooks.live import Live
    from addon.policy.memory_store import MemoryStore

    store = MemoryStore()
    accounting = UsageAccounting(Live(store))
    body = json.dumps(
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    ).encode()
    with taddons.context(accounting) as tctx:
        tctx.configure(accounting, usage_db="")
        for live in (True, False):
            f = tflow.tflow(resp=tutils.tresp(content=body))
            f.live = live
            f.metadata["gateway"] = {
                "fingerprint": "fp-live" if live else "fp-loaded",
                "key": "k",
                "provider": "openai",
                "model": "m",
            }
            accounting.response(f)
    assert store.spend("fp-live", None, 2e9)[0] == 7
    assert store.spend("fp-loaded", None, 2e9)[0] == 0


def _finished_flow(fingerprint: str, tokens: tuple[int, int] = (5, 2)):
    import json
    from mitmproxy.test import tflow, tutils

    usage = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1], "total_tokens": sum(tokens)}
    f = tflow.tflow(resp=tutils.tresp(content=json.dumps({"choices": [], "usage": usage}).encode()))
    f.metadata["gateway"] = {"fingerprint": fingerprint, "key": "k", "provider": "openai", "model": "m"}
    return f


def test_counting_waits_for_a_batch_but_every_read_of_usage_sees_it_first():
    from mitmproxy.test import taddons
    from addon.hooks.accounting import UsageAccounting
    from addon.hooks.live import Live
    from addon.policy.memory_store import MemoryStore

    store = MemoryStore()
    accounting = UsageAccounting(Live(store))
    with taddons.context(accounting) as tctx:
        tctx.configure(accounting, usage_db="")
        f = _finished_flow("fp", (600, 400))
        accounting.response(f)
        assert len(accounting.unsettled) == 1  # noted, not yet parsed or counted
        # a tpm check right after the response already sees its 1,000 tokens
        assert store.tokens_wait("fp", 1000, f.response.timestamp_end + 1) is not None
        assert accounting.unsettled == []
        accounting.response(_finished_flow("fp", (1, 1)))
        assert store.spend("fp", None, 2e9).tokens == 1002


def test_the_writer_settles_without_a_ledger_and_done_settles_the_rest(tmp_path):
    import asyncio
    import sqlite3
    from mitmproxy.test import taddons
    from addon.usage import sqlite
    from addon.hooks.accounting import UsageAccounting
    from addon.hooks.live import Live
    from addon.policy.memory_store import MemoryStore

    async def go():
        store = MemoryStore()
        accounting = UsageAccounting(Live(store))
        with taddons.context(accounting) as tctx:
            tctx.configure(accounting, usage_db="")
            accounting.running()
            accounting.response(_finished_flow("fp"))
            await asyncio.sleep(sqlite.FLUSH_EVERY * 2.5)
            assert accounting.unsettled == [] and store._spend["fp"].tokens == 7
            accounting.done()

        store = MemoryStore()
        accounting = UsageAccounting(Live(store))
        db = tmp_path / "usage.sqlite3"
        with taddons.context(accounting) as tctx:
            tctx.configure(accounting, usage_db=str(db))
            accounting.response(_finished_flow("fp2"))
            accounting.done()  # stopping: settled and written, nothing lost
        rows = sqlite3.connect(db).execute("SELECT key_fingerprint, prompt_tokens FROM usage").fetchall()
        assert rows == [("fp2", 5)]

    asyncio.run(go())


def test_access_lines_are_stamped_with_their_own_second_and_millisecond():
    """AccessLog.add formats the clock part once a second: a line in the next second, or an
    earlier one, still gets its own time."""
    import time

    from addon.hooks.accesslog import AccessLog
    log = AccessLog()
    base = 1_700_000_000
    whens = [base + 0.998, base + 0.999, base + 1.0005, base + 0.25, base + 3601.5]
    for i, when in enumerate(whens):
        log.add(f"line{i}", when)
    for line, when in zip(log.pending, whens):
        assert line.startswith(
            f"[{time.strftime('%H:%M:%S', time.localtime(when))}.{int(when % 1 * 1000):03d}] gateway: "
        )
    assert [line.rpartition(" ")[2] for line in log.pending] == [f"line{i}" for i in range(len(whens))]


def test_an_access_line_never_names_a_key_by_the_key_itself():
    """key_name remembers names it has checked: the answer must stay per name, every time."""
    from addon.wire.secrets import fingerprint
    from addon.hooks.accesslog import key_name
    from addon.routing.state import FlowState
    vk = "vk_named_by_itself_0001"
    for _ in range(3):
        assert key_name(FlowState(key=vk, fingerprint=fingerprint(vk))) == f"key-{fingerprint(vk)}"
        assert key_name(FlowState(key="team-alpha", fingerprint=fingerprint(vk))) == "team-alpha"
        assert key_name(FlowState(key="team-alpha", fingerprint=fingerprint("team-alpha"))) == \
            f"key-{fingerprint('team-alpha')}"
