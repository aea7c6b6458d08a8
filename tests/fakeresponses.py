"""Fake OpenAI Responses API answers (whole Response objects and response.* event streams) and
a fake provider handler that stores responses so the stored-response paths can be exercised.
The shapes follow the official openai SDK's types (it parses them in the tests)."""

from __future__ import annotations

import json

from tests.fakeprovider import Received, Reply, default_reply

USAGE = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0}, "output_tokens": 3,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12}


def message_item(text: str, item_id: str = "msg_fake1") -> dict:
    return {"type": "message", "id": item_id, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def response(request: dict, text: str = "hello", rid: str = "resp_fake1", status: str = "completed", usage=USAGE,
             background: bool = False) -> dict:
    return {
        "id": rid,
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "background": background,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "model": request.get("model"),
        "output": [message_item(text)] if status == "completed" else [],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "previous_response_id": None,
        "store": True,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": usage if status == "completed" else None,
        "metadata": {},
    }


def sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def response_stream(request: dict, pieces=("hel", "lo"), rid: str = "resp_fake1", usage=USAGE) -> list[bytes]:
    text = "".join(pieces)
    item = message_item(text)
    background = request.get("background") is True
    events = [
        {
            "type": "response.created",
            "response": response(
                request, rid=rid, status="queued" if background else "in_progress", background=background
            ),
        },
        {
            "type": "response.in_progress",
            "response": response(request, rid=rid, status="in_progress", background=background),
        },
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "status": "in_progress", "content": []},
        },
        {
            "type": "response.content_part.added",
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        },
    ]
    events += [{"type": "response.output_text.delta", "item_id": item["id"], "output_index": 0, "content_index": 0,
                "delta": p, "logprobs": []} for p in pieces]
    events += [
        {
            "type": "response.output_text.done",
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "text": text,
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "part": item["content"][0],
        },
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": response(request, text, rid, usage=usage, background=background)},
    ]
    return [sse({**e, "sequence_number": i}) for i, e in enumerate(events)]


class StoredResponses:
    """A handler: POST .../responses creates resp_fake1 (plain or streamed); GET / DELETE on
    .../responses/{id}[/input_items] answer from the store; chat falls back to default_reply.

    Background mode as OpenAI documents it: a create with `background: true` answers `queued`
    with `usage: null` (streamed: events from `queued` on, the work going on if the client leaves);
    each GET moves it on, queued -> in_progress -> completed (with `usage`); GET ?stream=true
    streams it to its end; POST .../cancel makes one still running `cancelled` (usage null) and
    answers an ended one as it is. `usage`: what a completed response reports."""

    def __init__(self, usage: dict = USAGE) -> None:
        self.stored: dict[str, dict] = {}
        self.status: dict[str, str] = {}  # a background response's
        self.usage = usage
        self.stream_hold = None  # a threading.Event: a background create's stream holds after its first event

    def __call__(self, req: Received) -> Reply:
        path, _, query = req.path.partition("?")
        if "/responses" not in path:
            return default_reply(req)
        tail = path[path.index("/responses") + len("/responses"):]
        if not tail and req.method == "POST":
            body = req.json()
            rid = f"resp_fake{len(self.stored) + 1}"
            self.stored[rid] = body
            if body.get("background") is True:
                self.status[rid] = "in_progress" if body.get("stream") else "queued"
                if body.get("stream"):
                    return Reply.sse(
                        response_stream(body, rid=rid, usage=self.usage), hold_after_first=self.stream_hold
                    )
                return Reply.json(response(body, rid=rid, status="queued", background=True))
            if body.get("stream"):
                return Reply.sse(response_stream(body, rid=rid))
            return Reply.json(response(body, rid=rid))
        rid, _, sub = tail.strip("/").partition("/")
        if rid not in self.stored:
            return Reply.json(
                {
                    "error": {
                        "message": f"Response with id '{rid}' not found.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                404,
            )
        if req.method == "DELETE":
            del self.stored[rid]
            return Reply.json({"id": rid, "object": "response", "deleted": True})
        if rid in self.status and sub != "input_items":
            return self.background(req, rid, sub, "stream=true" in query)
        if sub == "input_items":
            return Reply.json(
                {
                    "object": "list",
                    "data": [
                        {
                            "type": "message",
                            "id": "msg_in1",
                            "role": "user",
                            "status": "completed",
                            "content": [{"type": "input_text", "text": "hi"}],
                        }
                    ],
                    "first_id": "msg_in1",
                    "last_id": "msg_in1",
                    "has_more": False,
                }
            )
        return Reply.json(response(self.stored[rid], rid=rid))

    def background(self, req: Received, rid: str, sub: str, stream: bool) -> Reply:
        body, status = self.stored[rid], self.status[rid]
        if sub == "cancel":
            if status in ("queued", "in_progress"):
                status = self.status[rid] = "cancelled"
        elif stream:
            self.status[rid] = "completed"
            return Reply.sse(response_stream(body, rid=rid, usage=self.usage))
        elif status == "queued":
            status = self.status[rid] = "in_progress"
        elif status == "in_progress":
            status = self.status[rid] = "completed"
        return Reply.json(response(body, rid=rid, status=status, usage=self.usage, background=True))
