"""The answers of the Anthropic Messages -> OpenAI Chat Completions pair (translate/anthropic_messages_openai_chat.py):
a chat.completion back to a Message, an OpenAI error to Anthropic's shape, and chat.completion.chunk
events to the Messages event stream, incrementally, its state explicit in MessagesStreamTranslator. Pure.
"""

from __future__ import annotations

import json

from addon.apis.anthropic_messages import anthropic_error, error_body, error_dict, error_type
from addon.apis.openai_chat import is_openai_error
from addon.translate.tables import ERROR_TYPES, FINISH_REASONS
from addon.wire.tokens import usage_from_dict
from addon.wire.sse import SSEDecoder, json_bytes


# --- response --------------------------------------------------------------------------------


def message_id(chat_id) -> str:
    chat_id = chat_id if isinstance(chat_id, str) and chat_id else "gateway"
    return chat_id if chat_id.startswith("msg_") else f"msg_{chat_id}"


def delta_usage(usage) -> dict:
    """OpenAI usage -> Anthropic's (a message_delta's): input_tokens exclude the cache reads."""
    u = usage_from_dict(usage)
    prompt, cached, completion = (
        (u.prompt_tokens, min(u.cached_tokens, u.prompt_tokens), u.completion_tokens) if u else (0, 0, 0)
    )
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": completion, "server_tool_use": None}


def convert_usage(usage) -> dict:
    """OpenAI usage -> a Message's usage, every field Anthropic sends (the ones with no
    equivalent null)."""
    return {**delta_usage(usage), "cache_creation": None, "inference_geo": None, "service_tier": None}


def tool_input(arguments) -> dict:
    if not arguments:
        return {}
    value = json.loads(arguments)  # not JSON: the adapter answers 502 rather than guess
    if not isinstance(value, dict):
        raise ValueError("tool call arguments are not a JSON object")
    return value


# where OpenAI-compatible servers say which stop string ended the answer (OpenAI itself does not):
# vLLM's `stop_reason`, SGLang's `matched_stop` (either may also hold a stop token's id)
MATCHED_STOP_FIELDS = ("stop_reason", "matched_stop")


def stop_of(choice: dict, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a choice whose finish_reason is set. OpenAI's "stop" is a
    natural end or one of the request's stop sequences, without saying which: it reads as
    end_turn unless the provider names the sequence it stopped on, and it is one asked for."""
    finish = choice.get("finish_reason")
    if stops and finish == "stop":
        for field in MATCHED_STOP_FIELDS:
            matched = choice.get(field)
            if isinstance(matched, str) and matched in stops:
                return "stop_sequence", matched
    return FINISH_REASONS.reverse(finish), None


def convert_completion(completion: dict, model: str, stops: tuple[str, ...] = ()) -> dict:
    """OpenAI chat.completion -> Anthropic Message (`stops`: the request's stop_sequences)."""
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the provider's 2xx body is not a chat.completion")
    choice = choices[0]
    reply = choice.get("message") or {}
    content: list[dict] = []
    if reply.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": reply["reasoning_content"], "signature": ""})
    text = reply.get("content") or reply.get("refusal")
    if text:
        content.append({"type": "text", "text": text, "citations": None})
    for call in reply.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "", "name": function.get("name") or "",
                        "input": tool_input(function.get("arguments")), "caller": DIRECT})
    stop_reason, stop_sequence = stop_of(choice, stops)
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model") or model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "stop_details": None,
        "usage": convert_usage(completion.get("usage")),
        "container": None,
    }


DIRECT = {"type": "direct"}  # who called a tool: the model itself


def convert_error(status: int, body: bytes) -> bytes | None:
    """A provider error body in Anthropic's shape (None: it is already)."""
    if anthropic_error(body) is not None:
        return None
    if is_openai_error(body):
        error = json.loads(body)["error"]
        return error_body(str(error.get("message") or error.get("type") or f"HTTP {status}"), error_type(status))
    text = body[:200].decode("utf-8", "replace").strip()
    return error_body(f"provider returned HTTP {status}" + (f": {text}" if text else ""), error_type(status))


# --- streaming -------------------------------------------------------------------------------


def event(kind: str, data: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


class MessagesStreamTranslator:
    """chat.completion.chunk SSE pieces -> Anthropic's event sequence, one chunk at a time:
    message_start, per block content_block_start / _delta / _stop (thinking, text, tool_use, in
    the order they arrive), message_delta (stop_reason, final usage), message_stop.

    State is explicit: whether message_start went out, the open block (its kind and index), which
    OpenAI tool-call index is which block, the finish reason (and stop sequence) and the usage
    seen so far. `stops`: the request's stop_sequences.
    """

    def __init__(self, model: str, stops: tuple[str, ...] = ()) -> None:
        self.decoder = SSEDecoder()
        self.model = model
        self.stops = stops
        self.stop_sequence: str | None = None
        self.started = False
        self.done = False
        self.index = -1  # the last block opened
        self.block: str | int | None = None  # open block: "text", "thinking", or an OpenAI tool index
        self.tool_blocks: dict[int, int] = {}  # OpenAI tool-call index -> block index
        self.stop_reason: str | None = None
        self.usage: dict | None = None

    def __call__(self, piece: bytes) -> list[bytes]:
        events = self.decoder.feed(piece) if piece else self.decoder.flush()
        out: list[bytes] = []
        for _, data in events:
            if self.done:
                break
            out.extend(self.on_data(data))
        if not piece and not self.done:
            out.extend(self.end(complete=False))
        return out

    def on_data(self, data: str) -> list[bytes]:
        if not data:
            return []
        if data.strip() == "[DONE]":
            return self.end(complete=True)
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            return []
        if isinstance(chunk.get("error"), dict):
            return self.fail(chunk["error"])
        out = self.start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out.extend(self.text_delta("thinking", delta["reasoning_content"]))
            text = delta.get("content") or delta.get("refusal")  # a refusal is the answer's text
            if text:
                out.extend(self.text_delta("text", text))
            for call in delta.get("tool_calls") or []:
                out.extend(self.tool_delta(call))
            if choice.get("finish_reason"):
                self.stop_reason, self.stop_sequence = stop_of(choice, self.stops)
                out.extend(self.close_block())
        return out

    def start(self, chunk: dict) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        self.model = chunk.get("model") or self.model
        message = {"id": message_id(chunk.get("id")), "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None, "stop_details": None,
                   "usage": convert_usage(None), "container": None}  # the counts come at the end
        return [event("message_start", {"type": "message_start", "message": message})]

    def open_block(self, block: str | int, content_block: dict) -> list[bytes]:
        out = self.close_block()
        self.index += 1
        self.block = block
        return [*out, event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                    "content_block": content_block})]

    def close_block(self) -> list[bytes]:
        if self.block is None:
            return []
        self.block = None
        return [event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def text_delta(self, kind: str, text: str) -> list[bytes]:
        out = []
        if self.block != kind:
            start = (
                {"type": "text", "text": "", "citations": None}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            out = self.open_block(kind, start)
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        out.append(event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}))
        return out

    def tool_delta(self, call: dict) -> list[bytes]:
        tool_index = call.get("index", 0)
        function = call.get("function") or {}
        out = []
        if tool_index not in self.tool_blocks:
            out = self.open_block(tool_index, {"type": "tool_use", "id": call.get("id") or f"toolu_{tool_index}",
                                               "name": function.get("name") or "", "input": {}, "caller": DIRECT})
            self.tool_blocks[tool_index] = self.index
        elif self.block != tool_index:
            # Anthropic blocks do not interleave: arguments for a closed block cannot be sent
            raise ValueError("the provider interleaved the arguments of two tool calls")
        arguments = function.get("arguments")
        if arguments:
            out.append(event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                     "delta": {"type": "input_json_delta", "partial_json": arguments}}))
        return out

    def end(self, complete: bool) -> list[bytes]:
        out = self.start({}) + self.close_block()
        if self.stop_reason is None and not complete:
            # the provider's stream broke off: say so rather than end the message as if complete
            return [*out, *self.fail({"message": "the provider's stream ended before the answer was complete",
                                      "type": "server_error"})]
        self.done = True
        delta = {"stop_reason": self.stop_reason or FINISH_REASONS.reverse(None), "stop_sequence": self.stop_sequence,
                 "stop_details": None, "container": None}
        out.append(event("message_delta", {"type": "message_delta", "delta": delta, "usage": delta_usage(self.usage)}))
        out.append(event("message_stop", {"type": "message_stop"}))
        return out

    def fail(self, error: dict) -> list[bytes]:
        self.done = True
        kind = ERROR_TYPES.reverse(error.get("type"))
        return [event("error", error_dict(str(error.get("message") or kind), kind))]
