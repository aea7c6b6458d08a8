"""The demo's fake provider: answers OpenAI, Anthropic and DeepSeek requests on 127.0.0.1, plain
and streamed, every answer marked "[demo]". Standard library only (the gateway's venv runs it).

    /openai/v1/chat/completions     OpenAI Chat Completions (stream: usage chunk when asked)
    /deepseek/chat/completions      DeepSeek: the same shape, usage on the last content chunk
    /anthropic/v1/messages          Anthropic Messages (stream: message_start ... message_stop)

It checks the key the gateway sends (the demo keys file's api_key), so a wrong one gets the
provider's own 401, as a real provider would answer.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEYS = {"openai": "sk-demo-openai-not-a-real-key", "deepseek": "sk-demo-deepseek-not-a-real-key",
        "anthropic": "sk-ant-demo-not-a-real-key"}
STREAM_DELAY = 0.04  # seconds between streamed pieces, so a terminal shows them arrive


def answer_text(provider: str, request: dict) -> str:
    said = ""
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            said = content if isinstance(content, str) else " ".join(
                part.get("text", "") for part in content or [] if isinstance(part, dict))
            break
    said = " ".join(said.split())[:80]
    return f"[demo] {provider} model {request.get('model', '?')} here (a local fake, no real model). You said: {said!r}"


def pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


def usage_numbers(request: dict, text: str) -> tuple[int, int]:
    return len(json.dumps(request.get("messages", ""))) // 4, len(text) // 4


def sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()


def openai_reply(provider: str, request: dict) -> tuple[dict | None, list[bytes] | None]:
    text = answer_text(provider, request)
    prompt, completion = usage_numbers(request, text)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    base = {"id": f"chatcmpl-demo-{int(time.time() * 1000)}", "created": int(time.time()), "model": request.get("model")}
    if not request.get("stream"):
        return {**base, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}, None

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        return sse({**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces(text)]
    if provider == "deepseek":  # DeepSeek puts usage on the last chunk
        events.append(chunk({}, "stop", usage=usage))
    else:
        events.append(chunk({}, "stop"))
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append(sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
    return None, events + [sse("[DONE]")]


def anthropic_reply(request: dict) -> tuple[dict | None, list[bytes] | None]:
    text = answer_text("anthropic", request)
    prompt, completion = usage_numbers(request, text)
    message = {"id": f"msg_demo{int(time.time() * 1000)}", "type": "message", "role": "assistant",
               "model": request.get("model")}
    if not request.get("stream"):
        return {**message, "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": completion}}, None
    events = [sse({"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                   "usage": {"input_tokens": prompt, "output_tokens": 1}}}, "message_start"),
              sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start")]
    events += [sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}, "content_block_delta")
               for p in pieces(text)]
    events += [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": completion}}, "message_delta"),
               sse({"type": "message_stop"}, "message_stop")]
    return None, events


ROUTES = {"/openai/v1/chat/completions": "openai", "/deepseek/chat/completions": "deepseek",
          "/anthropic/v1/messages": "anthropic"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-provider"

    def log_message(self, *args) -> None:  # the gateway logs every request already
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        provider = ROUTES.get(self.path.partition("?")[0])
        if provider is None:
            return self.send_json(404, {"error": {"message": f"[demo] no such endpoint {self.path}", "type": "not_found_error"}})
        presented = self.headers.get("x-api-key") if provider == "anthropic" else \
            (self.headers.get("authorization") or "").removeprefix("Bearer ")
        if presented != KEYS[provider]:
            return self.send_json(401, {"error": {"message": "[demo] Incorrect API key provided", "type": "invalid_request_error",
                                                  "param": None, "code": "invalid_api_key"}})
        try:
            request = json.loads(body)
        except ValueError:
            return self.send_json(400, {"error": {"message": "[demo] body is not JSON", "type": "invalid_request_error"}})
        whole, events = anthropic_reply(request) if provider == "anthropic" else openai_reply(provider, request)
        if whole is not None:
            return self.send_json(200, whole)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, event in enumerate(events):
            if i:
                time.sleep(STREAM_DELAY)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")  # at once: SDKs hang up right after the last event

    def send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def start(port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
