"""A fake LLM provider on 127.0.0.1 for tests: records every request, answers as scripted.

Runs its own asyncio loop in a thread, so sync tests (the openai SDK) and the gateway
subprocess can both talk to it. Speaks enough HTTP/1.1 for keep-alive clients: content-length
requests, content-length or chunked responses, SSE streamed chunk by chunk with optional delays.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] | None = None  # sent chunked, one write per chunk
    delay: float = 0.0  # seconds between chunks (or before a plain body)
    gzip: bool = False
    # streaming proof without timing: after the first chunk, hold the rest until the test
    # sets this event (it does so once its client has seen that chunk)
    hold_after_first: threading.Event | None = None
    # bad luck: after the chunks (or half of a plain body), wait for `stall` (if given, at most
    # 30 s: a provider that stops sending), then with `cut` close the connection without ending
    # the body (no last chunk; fewer bytes than content-length)
    stall: threading.Event | None = None
    cut: bool = False
    # when each chunk was written (time.monotonic(), this process's clock): what the provider
    # did, for tests that compare it with when their client saw each chunk
    sent: list[float] = field(default_factory=list)

    @classmethod
    def json(cls, obj, status: int = 200, **kw) -> "Reply":
        return cls(status, json.dumps(obj).encode(), {"content-type": "application/json"}, **kw)

    @classmethod
    def sse(cls, events: list[bytes], delay: float = 0.0, **kw) -> "Reply":
        return cls(200, b"", {"content-type": "text/event-stream"}, chunks=events, delay=delay, **kw)


def openai_completion(request: dict, text: str = "hello") -> dict:
    return {
        "id": "chatcmpl-fake1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": request.get("model", "gpt-4o"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def openai_stream(request: dict, pieces=("hel", "lo"), usage: bool = True) -> list[bytes]:
    def chunk(delta, finish=None, **extra):
        return {
            "id": "chatcmpl-fake1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": request.get("model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": p}) for p in pieces]
    events.append(chunk({}, "stop"))
    if usage:
        events.append(
            {
                "id": "chatcmpl-fake1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": request.get("model"),
                "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)},
            }
        )
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def worst_case_reply(req: Received) -> Reply:
    """An answer that uses all a budget reserved for it (its body's bytes + max_tokens,
    docs/shared-state.md), slowly, so concurrent requests overlap. What the provider was asked
    for then never exceeds a budget, whether the requests overlapped or (a slow machine) not:
    a settled request spends what it held."""
    body = req.json()
    reply = openai_completion(body)
    prompt, completion = len(req.body), body["max_tokens"]
    reply["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return Reply.json(reply, delay=0.3)


def default_reply(req: Received) -> Reply:
    """OpenAI-shaped answer echoing nothing secret: plain or streamed, per the request."""
    try:
        body = req.json()
    except ValueError:
        return Reply.json(
            {"error": {"message": "bad json", "type": "invalid_request_error", "param": None, "code": None}}, 400
        )
    if body.get("stream"):
        return Reply.sse(openai_stream(body))
    return Reply.json(openai_completion(body))


class FakeProvider:
    def __init__(self, handler: Callable[[Received], Reply] = default_reply, port: int = 0) -> None:
        self.handler = handler
        self.received: list[Received] = []
        self.connections = 0
        self.in_flight = 0  # requests received and not yet answered in full
        self.max_in_flight = 0
        self.holds_released: list[bool] = []  # per held reply: was it released by the client?
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server = None
        self.port = port  # 0: any free port
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- lifecycle --
    def start(self) -> "FakeProvider":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(5)
        return self

    async def _start(self):
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _stop():
            self._server.close()
            for w in list(self._writers):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_received(self, count: int = 1, timeout: float = 30) -> bool:
        """Wait (bounded) until `count` requests have arrived; for tests that hold one in flight."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(self.received) >= count

    def reset(self, handler: Callable[[Received], Reply] | None = None) -> None:
        self.received.clear()
        self.holds_released.clear()
        self.max_in_flight = self.in_flight
        self.handler = handler or default_reply

    # -- HTTP --
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                req = Received(method, target, headers, body)
                self.received.append(req)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    reply = self.handler(req)
                    await self._send(writer, reply)
                finally:
                    self.in_flight -= 1
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        headers = dict(reply.headers)
        if reply.gzip:
            headers["content-encoding"] = "gzip"
        if reply.chunks is None:
            body = gzip.compress(reply.body) if reply.gzip else reply.body
            headers["content-length"] = str(len(body))
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.cut or reply.stall:
                body = body[: len(body) // 2]
            writer.write(_head(reply.status, headers) + body)
            await writer.drain()
            await self._bad_luck(writer, reply)
            return
        headers["transfer-encoding"] = "chunked"
        writer.write(_head(reply.status, headers))
        compressor = gzip.zlib.compressobj(9, gzip.zlib.DEFLATED, 16 + gzip.zlib.MAX_WBITS) if reply.gzip else None
        for i, piece in enumerate(reply.chunks):
            if i == 1 and reply.hold_after_first is not None:
                released = await asyncio.get_running_loop().run_in_executor(None, reply.hold_after_first.wait, 10)
                self.holds_released.append(released)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if compressor:
                piece = compressor.compress(piece) + compressor.flush(gzip.zlib.Z_SYNC_FLUSH)
            if piece:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                reply.sent.append(time.monotonic())
                await writer.drain()
        if await self._bad_luck(writer, reply):
            return
        if compressor:
            tail = compressor.flush()
            writer.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _bad_luck(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        """Stall and/or cut as the reply says; True if the connection was cut."""
        if reply.stall is not None:
            await asyncio.get_running_loop().run_in_executor(None, reply.stall.wait, 30)
        if reply.cut:
            writer.transport.abort()  # a reset, not a clean end
            raise ConnectionResetError("cut by the test")
        return False


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
