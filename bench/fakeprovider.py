"""A fast fake LLM provider for the benchmark: fixed OpenAI / Anthropic answers, plain and SSE.

It must never be the bottleneck, so it is a bare asyncio.Protocol with precomputed reply bytes:
no HTTP library, no JSON parsing. Which reply: the path (`/messages` -> Anthropic, else OpenAI)
and whether the body says `"stream": true`. Streams are chunked, one write per event, shaped like
recorded provider traffic. Request headers tune streams (the gateway forwards them unchanged):
  x-bench-events: N      events in the stream (default 200)
  x-bench-first-ms: F    pause after the first event, so time-to-first-chunk is not masked by
                         the rest of the burst (default 0)
  x-bench-gap-ms: G      pause between the following events (default 0: a burst of writes)
  x-bench-stamp: 1       every content event carries the time it was written: its text is
                         T<19 digits>, CLOCK_MONOTONIC in ns (time.monotonic_ns(), one clock for
                         every process on the machine), for clients that measure what the proxy in
                         between adds to each chunk (OpenAI streams)
  x-bench-open: 1        with x-bench-stamp: the stream goes on, a stamped event every G ms,
                         until `POST /bench/end` (to this provider, not through a proxy) ends every
                         stream begun before it, at once, as a stream ends

    python bench/fakeprovider.py [--port 0]     prints "PORT <n>" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

OPENAI_COMPLETION = {
    "id": "chatcmpl-bench0000000000000000000001", "object": "chat.completion", "created": 1700000000,
    "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_0000000000",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris.",
                                         "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
    "service_tier": "default",
}
ANTHROPIC_MESSAGE = {
    "id": "msg_01BenchBenchBenchBenchBench", "type": "message", "role": "assistant",
    "model": "claude-3-5-haiku-20241022",
    "content": [{"type": "text", "text": "The capital of France is Paris."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
              "output_tokens": 10, "service_tier": "standard"},
}


def anthropic_events(n: int) -> list[bytes]:
    """n SSE events shaped like a recorded Anthropic text stream (ping included); at least 6."""
    def ev(name: str, obj: dict) -> bytes:
        return b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(obj, separators=(",", ":")).encode())
    head = [
        ev(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01BenchBenchBenchBenchBench",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-3-5-haiku-20241022",
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 20,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        ev(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    tail = [
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": max(1, n - 6)}}),
        ev("message_stop", {"type": "message_stop"}),
    ]
    deltas = [ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": f" word{i}"}})
              for i in range(max(0, n - len(head) - len(tail)))]
    return head + deltas + tail


def openai_events(n: int) -> list[bytes]:
    """n SSE events shaped like a recorded OpenAI stream with usage: role, content..., stop, usage, [DONE]."""
    base = {"id": "chatcmpl-bench0000000000000000000001", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_0000000000"}

    def chunk(delta: dict, finish=None) -> bytes:
        obj = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    usage = {**base, "choices": [], "usage": {"prompt_tokens": 14, "completion_tokens": n, "total_tokens": 14 + n}}
    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": f" word{i}"}) for i in range(max(0, n - 4))]
    events += [chunk({}, "stop"), b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n",
               b"data: [DONE]\n\n"]
    return events


STAMP_PLACEHOLDER = b"T" + b"0" * 19
# one OpenAI content event, its text the placeholder a stamp replaces at write time
STAMPED_EVENT = openai_events(5)[1].replace(b" word0", STAMP_PLACEHOLDER)
END_REPLY = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
streams_end_ns = 0  # POST /bench/end: open streams begun before this end, at once
streams_ended = asyncio.Event()  # set (and replaced) at each POST /bench/end: wakes them


def stamped_chunk() -> bytes:
    """A chunk holding one content event stamped now (the caller writes it at once)."""
    event = STAMPED_EVENT.replace(STAMP_PLACEHOLDER, b"T%019d" % time.monotonic_ns())
    return b"%x\r\n%s\r\n" % (len(event), event)


def plain(status: int, obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return (
        b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(body))
    ) + body


REPLY_OPENAI = plain(200, OPENAI_COMPLETION)
REPLY_ANTHROPIC = plain(200, ANTHROPIC_MESSAGE)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
_stream_cache: dict[tuple[bool, int], list[bytes]] = {}


def stream_chunks(anthropic: bool, n: int) -> list[bytes]:
    key = (anthropic, n)
    if key not in _stream_cache:
        events = anthropic_events(n) if anthropic else openai_events(n)
        _stream_cache[key] = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    return _stream_cache[key]


def header_int(head: bytes, name: bytes, default: int) -> int:
    i = head.find(name)
    if i < 0:
        return default
    i += len(name)
    end = head.find(b"\r\n", i)
    return int(head[i:end if end >= 0 else len(head)].strip(b": \t"))


class Server(asyncio.Protocol):
    __slots__ = ("transport", "buf", "busy")

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buf = b""
        self.busy = False
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = header_int(head, b"\r\ncontent-length", 0)
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4:total]
            self.buf = self.buf[total:]
            line = head[:head.find(b"\r\n")]
            if line.startswith(b"post /bench/end "):
                global streams_end_ns, streams_ended
                streams_end_ns = time.monotonic_ns()
                streams_ended.set()
                streams_ended = asyncio.Event()
                self.transport.write(END_REPLY)
                continue
            anthropic = b"/messages" in line
            if (b'"stream": true' in body or b'"stream":true' in body) and header_int(head, b"\r\nx-bench-stamp", 0):
                self.busy = True
                asyncio.get_running_loop().create_task(self.stamped_stream(
                    header_int(head, b"\r\nx-bench-events", 200), header_int(head, b"\r\nx-bench-first-ms", 0) / 1000,
                    header_int(head, b"\r\nx-bench-gap-ms", 0) / 1000, bool(header_int(head, b"\r\nx-bench-open", 0))))
                return
            if b'"stream": true' in body or b'"stream":true' in body:
                n = header_int(head, b"\r\nx-bench-events", 200)
                first = header_int(head, b"\r\nx-bench-first-ms", 0)
                gap = header_int(head, b"\r\nx-bench-gap-ms", 0)
                chunks = stream_chunks(anthropic, n)
                if not first and not gap:
                    write = self.transport.write
                    write(STREAM_HEAD)
                    for c in chunks:  # one write (one TCP segment, NODELAY) per event
                        write(c)
                    write(b"0\r\n\r\n")
                    continue
                self.busy = True
                asyncio.get_running_loop().create_task(self.slow_stream(chunks, first / 1000, gap / 1000))
                return
            self.transport.write(REPLY_ANTHROPIC if anthropic else REPLY_OPENAI)

    async def slow_stream(self, chunks: list[bytes], first: float, gap: float) -> None:
        write = self.transport.write
        write(STREAM_HEAD + chunks[0])
        if first:
            await asyncio.sleep(first)
        for c in chunks[1:]:
            if gap:
                await asyncio.sleep(gap)
            if self.transport.is_closing():
                return
            write(c)
        write(b"0\r\n\r\n")
        self.busy = False
        self.process()

    async def stamped_stream(self, n: int, first: float, gap: float, open_ended: bool) -> None:
        """An OpenAI stream whose content events say when each was written: the role event, then
        n stamped events (open_ended: until POST /bench/end), then the finish, usage and [DONE]."""
        write, begun = self.transport.write, time.monotonic_ns()
        events = openai_events(4)  # role, stop, usage, [DONE]
        write(STREAM_HEAD + b"%x\r\n%s\r\n" % (len(events[0]), events[0]) + stamped_chunk())
        sent = 1
        if first:
            await asyncio.sleep(first)
        while (streams_end_ns < begun) if open_ended else sent < n:
            if gap and open_ended:
                try:  # the pause, cut short by POST /bench/end
                    async with asyncio.timeout(gap):
                        await streams_ended.wait()
                    break
                except TimeoutError:
                    pass
            elif gap:
                await asyncio.sleep(gap)
            if self.transport.is_closing():
                return
            write(stamped_chunk())
            sent += 1
        for e in events[1:]:
            write(b"%x\r\n%s\r\n" % (len(e), e))
        write(b"0\r\n\r\n")
        self.busy = False
        self.process()

    def connection_lost(self, exc) -> None:
        self.buf = b""


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, "127.0.0.1", port, backlog=4096)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(main(ap.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
