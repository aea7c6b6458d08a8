"""The demo's fake provider: answers OpenAI, Anthropic and DeepSeek requests on 127.0.0.1, plain
and streamed, every answer marked "[demo]". Standard library only (the gateway's venv runs it).
It serves what the gateway forwards for each endpoint the README lists, so every one of them
can be tried in the demo:

    POST /openai/v1/chat/completions        OpenAI Chat Completions (stream: usage chunk when asked)
    POST /openai/v1/embeddings              OpenAI embeddings (float or base64, as asked)
    POST /openai/v1/responses               OpenAI Responses (stream: response.created ... completed)
    GET|DELETE /openai/v1/responses/{id}    a response made here; GET .../{id}/input_items
    POST /deepseek/chat/completions         DeepSeek: the same shape, usage on the last content chunk
    POST /anthropic/v1/messages             Anthropic Messages (stream: message_start ... message_stop)
    POST /anthropic/v1/messages/count_tokens  {"input_tokens": n}

It checks the key the gateway sends (the demo keys file's api_key), so a wrong one gets the
provider's own 401, as a real provider would answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEYS = {"openai": "sk-demo-openai-not-a-real-key", "deepseek": "sk-demo-deepseek-not-a-real-key",
        "anthropic": "sk-ant-demo-not-a-real-key"}
STREAM_DELAY = 0.04  # seconds between streamed pieces, so a terminal shows them arrive
STORE: dict[str, dict] = {}  # responses made here (POST /responses), by id: the requests that made them
LOCK = threading.Lock()  # the server answers each connection on its own thread


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
    base = {
        "id": f"chatcmpl-demo-{int(time.time() * 1000)}",
        "created": int(time.time()),
        "model": request.get("model"),
    }
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
    events = [
        sse(
            {
                "type": "message_start",
                "message": {
                    **message,
                    "content": [],
                    "stop_reason": None,
                    "usage": {"input_tokens": prompt, "output_tokens": 1},
                },
            },
            "message_start",
        ),
        sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        ),
    ]
    events += [
        sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
            "content_block_delta",
        )
        for p in pieces(text)
    ]
    events += [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": completion}}, "message_delta"),
               sse({"type": "message_stop"}, "message_stop")]
    return None, events


def embeddings_reply(request: dict) -> dict:
    """One small vector per input, the same for the same text (a hash, not a model)."""
    inputs = request.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data, tokens = [], 0
    for i, text in enumerate(inputs):
        text = text if isinstance(text, str) else json.dumps(text)
        tokens += max(1, len(text) // 4)
        digest = hashlib.sha256(text.encode()).digest()
        vector = [round(b / 255 * 2 - 1, 4) for b in digest[:8]]
        if request.get("encoding_format") == "base64":  # what the openai SDK asks for, then decodes
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {"object": "list", "data": data, "model": request.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def responses_text(request: dict) -> str:
    """The Responses API's `input` (a string or a list of messages) as chat messages."""
    given = request.get("input")
    messages = [{"role": "user", "content": given}] if isinstance(given, str) else [
        {"role": m.get("role"), "content": m.get("content") if isinstance(m.get("content"), str) else " ".join(
            part.get("text", "") for part in m.get("content") or [] if isinstance(part, dict))}
        for m in given or [] if isinstance(m, dict)]
    return answer_text("openai", {"model": request.get("model"), "messages": messages})


def response_object(request: dict, rid: str, text: str, done: bool = True) -> dict:
    prompt, completion = len(json.dumps(request.get("input", ""))) // 4, len(text) // 4
    item = {"type": "message", "id": f"msg_{rid[5:]}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if done else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "model": request.get("model"),
        "output": [item] if done else [],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "previous_response_id": None,
        "store": True,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "metadata": {},
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        if done
        else None,
    }


def responses_reply(request: dict, rid: str) -> tuple[dict | None, list[bytes] | None]:
    text = responses_text(request)
    whole = response_object(request, rid, text)
    if not request.get("stream"):
        return whole, None
    item = whole["output"][0]
    at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    events = [
        {"type": "response.created", "response": response_object(request, rid, text, done=False)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **at, "part": {"type": "output_text", "text": "", "annotations": []}},
    ]
    events += [{"type": "response.output_text.delta", **at, "delta": p} for p in pieces(text)]
    events += [{"type": "response.output_text.done", **at, "text": text},
               {"type": "response.content_part.done", **at, "part": item["content"][0]},
               {"type": "response.output_item.done", "output_index": 0, "item": item},
               {"type": "response.completed", "response": whole}]
    return None, [sse({**e, "sequence_number": i}, e["type"]) for i, e in enumerate(events)]


ROUTES = {"/openai/v1/chat/completions": "openai", "/deepseek/chat/completions": "deepseek",
          "/anthropic/v1/messages": "anthropic", "/openai/v1/embeddings": "openai",
          "/openai/v1/responses": "openai", "/anthropic/v1/messages/count_tokens": "anthropic"}
STORED = re.compile(r"/openai/v1/responses/(resp_[A-Za-z0-9_-]+)(/input_items)?")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-provider"

    def log_message(self, *args) -> None:  # the gateway logs every request already
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        path = self.path.partition("?")[0]
        provider = ROUTES.get(path)
        if provider is None:
            return self.not_found()
        if not self.key_ok(provider):
            return
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return self.send_json(
                400, {"error": {"message": "[demo] body is not a JSON object", "type": "invalid_request_error"}}
            )
        if path.endswith("/embeddings"):
            return self.send_json(200, embeddings_reply(request))
        if path.endswith("/count_tokens"):
            return self.send_json(200, {"input_tokens": len(json.dumps(request.get("messages", ""))) // 4})
        if path.endswith("/responses"):
            rid = f"resp_demo{time.time_ns()}"
            with LOCK:
                STORE[rid] = request
                if len(STORE) > 1000:  # a demo's worth; the oldest go first
                    del STORE[next(iter(STORE))]
            whole, events = responses_reply(request, rid)
        elif provider == "anthropic":
            whole, events = anthropic_reply(request)
        else:
            whole, events = openai_reply(provider, request)
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

    def do_GET(self) -> None:
        self.stored_response()

    def do_DELETE(self) -> None:
        self.stored_response()

    def stored_response(self) -> None:
        """GET / DELETE /openai/v1/responses/{id}, GET .../{id}/input_items: a response made here."""
        m = STORED.fullmatch(self.path.partition("?")[0])
        if m is None or (m.group(2) and self.command != "GET"):
            return self.not_found()
        if not self.key_ok("openai"):
            return
        rid = m.group(1)
        with LOCK:
            request = STORE.get(rid)
            if request is not None and self.command == "DELETE":
                del STORE[rid]
        if request is None:
            return self.send_json(404, {"error": {"message": f"Response with id '{rid}' not found.",
                                                  "type": "invalid_request_error", "param": None, "code": None}})
        if self.command == "DELETE":
            return self.send_json(200, {"id": rid, "object": "response", "deleted": True})
        if m.group(2):
            given = request.get("input")
            item = {"type": "message", "id": "msg_in1", "role": "user", "status": "completed",
                    "content": [{"type": "input_text", "text": given if isinstance(given, str) else json.dumps(given)}]}
            return self.send_json(200, {"object": "list", "data": [item], "first_id": "msg_in1", "last_id": "msg_in1",
                                        "has_more": False})
        return self.send_json(200, response_object(request, rid, responses_text(request)))

    def key_ok(self, provider: str) -> bool:
        """The key the gateway sent is the demo keys file's; else the provider's own 401."""
        presented = self.headers.get("x-api-key") if provider == "anthropic" else \
            (self.headers.get("authorization") or "").removeprefix("Bearer ")
        if presented == KEYS[provider]:
            return True
        self.send_json(401, {"error": {"message": "[demo] Incorrect API key provided", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_api_key"}})
        return False

    def not_found(self) -> None:
        self.send_json(
            404,
            {"error": {"message": f"[demo] no such endpoint {self.command} {self.path}", "type": "not_found_error"}},
        )

    def send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that hung up mid-answer (`curl ... | head`: the gateway then closes its
        connection here) is no error; anything else is one line, never socketserver's traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (BrokenPipeError, ConnectionResetError)):
            print(f"demo: the fake provider failed to answer: {type(error).__name__}: {error}", file=sys.stderr)


def start(port: int = 0) -> ThreadingHTTPServer:
    server = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
