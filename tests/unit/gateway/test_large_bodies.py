"""A large body is parsed and prepared (its translation included) in the large-body worker
thread, one at a time (in-process Gateway, its request hook run on an event loop)."""

from __future__ import annotations

import asyncio
import json
import threading

from mitmproxy import flow
from mitmproxy.test import tflow, tutils

from addon.hooks import largebodies
from addon.translate.openai_chat_anthropic import OpenAIChatToAnthropic
from addon.wire.sse import large_bodies
from tests.unit.gateway.test_fuzz import gateway_with

KEYS = {
    "providers": {
        "anthropic": {"base_url": "http://127.0.0.1:9002"},
        "openai": {"base_url": "http://127.0.0.1:9001/v1"},
    },
    "virtual_keys": {
        "vk_a": {"provider": "anthropic", "api_key": "sk-ant-large-000000"},
        "vk_o": {"provider": "openai", "api_key": "sk-large-openai-0000"},
    },
}


def large_request(key: str, content: bytes) -> flow.Flow:
    req = tutils.treq(
        method=b"POST", path=b"/v1/chat/completions", host="127.0.0.1", port=1, scheme=b"http", content=content
    )
    req.headers.clear()
    req.headers["authorization"] = f"Bearer {key}"
    req.headers["content-type"] = "application/json"
    return tflow.tflow(req=req)


def test_a_large_body_is_translated_in_the_worker_thread(tmp_path, monkeypatch):
    seen = []
    original = OpenAIChatToAnthropic.prepare

    def prepare(self, request):
        seen.append((threading.current_thread().name, large_bodies.on))
        return original(self, request)

    monkeypatch.setattr(OpenAIChatToAnthropic, "prepare", prepare)
    body = json.dumps(
        {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    ).encode()
    with gateway_with(KEYS, tmp_path) as gw:

        async def run():
            f = large_request("vk_a", body)
            gw.requestheaders(f)
            pending = gw.request(f)
            assert pending is not None  # over OFF_LOOP_BYTES: its hook waits for the thread
            await pending
            return f

        f = asyncio.run(run())
        assert f.response is None and f.request.path == "/messages"  # routed, translated
        assert json.loads(f.request.content)["messages"][0]["content"][0]["text"] == "x" * 2_000_000
        assert seen == [("gateway-large-body_0", True)]
        assert not large_bodies.on  # (the flag is the worker's)
        f.error = flow.Error("connection refused")
        gw.error(f)


def test_large_bodies_are_worked_on_one_at_a_time():
    assert largebodies.LARGE_AT_ONCE == 1 and largebodies.LARGE_BODIES._max_workers == 1
