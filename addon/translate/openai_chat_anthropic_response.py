"""The answers of the OpenAI Chat Completions -> Anthropic Messages pair (translate/openai_chat_anthropic.py):
a Message back to a chat.completion, an Anthropic error to an OpenAI error, and the Anthropic event
stream to chat.completion.chunk events, incrementally, its state explicit in StreamTranslator. Pure.
"""

from __future__ import annotations

import json
import uuid

from addon.translate.tables import ERROR_TYPES, FINISH_REASONS
from addon.wire.errors import error_dict
from addon.wire.sse import DONE, SSEDecoder, encode_data, json_encoder


# tool call arguments as json.dumps writes them (", " and ": "), which clients have seen so far
arguments_json = json_encoder(", ", ": ")
DEFAULT_FINISH_REASON = FINISH_REASONS.default_forward


# --- response --------------------------------------------------------------------------------


def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.forward(stop_reason)


def convert_usage(usage: dict) -> dict:
    cache_read = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) + cache_read
    completion = usage.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


def convert_message(message: dict, created: int) -> dict:
    """Anthropic Message -> OpenAI chat.completion."""
    texts, thinking, tool_calls = [], [], []
    for block in message.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thinking.append(block.get("thinking", ""))
        elif kind == "tool_use":
            tool_calls.append({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": arguments_json(block.get("input") or {})},
            })
    reply: dict = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    if thinking:
        reply["reasoning_content"] = "".join(thinking)
    return {
        "id": message.get("id") or new_id(),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model", ""),
        "choices": [
            {"index": 0, "message": reply, "logprobs": None, "finish_reason": finish_reason(message.get("stop_reason"))}
        ],
        "usage": convert_usage(message.get("usage") or {}),
    }


def convert_error(error: dict) -> dict:
    """Anthropic {"type", "message"} -> OpenAI error dict; the Anthropic type is kept as code."""
    kind = error.get("type") or "api_error"
    openai_type = ERROR_TYPES.forward(kind)
    return error_dict(str(error.get("message") or kind), openai_type, code=kind)


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# --- streaming -------------------------------------------------------------------------------


class StreamTranslator:
    """Anthropic SSE pieces -> chat.completion.chunk SSE, one event at a time.

    State is explicit: which chunk id, whether the role / finish / [DONE] went out, which
    content block index is which tool call, and the usage seen so far.
    """

    def __init__(self, created: int, model: str, include_usage: bool) -> None:
        self.decoder = SSEDecoder()
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.message_id: str | None = None
        self.role_sent = False
        self.finish_sent = False
        self.done = False
        self.tool_index_by_block: dict[int, int] = {}
        self.tools_without_arguments: set[int] = set()  # block indexes: no argument text yet
        self.usage: dict[str, int] = {}

    def __call__(self, piece: bytes) -> list[bytes]:
        events = self.decoder.feed(piece) if piece else self.decoder.flush()
        out: list[bytes] = []
        for event, data in events:
            if self.done:
                break
            out.extend(self.on_event(event, data))
        if not piece and not self.done:
            out.extend(self.finish())  # the stream ended without message_stop
        return out

    def on_event(self, event: str | None, data: str) -> list[bytes]:
        if not data:
            return []
        payload = json.loads(data)
        kind = payload.get("type") or event
        handler = self.HANDLERS.get(kind)
        return handler(self, payload) if handler else []

    # -- chunk making --
    def chunk(self, delta: dict, finish: str | None = None) -> bytes:
        if not self.role_sent:
            delta = {"role": "assistant", **({"content": ""} if not delta else {}), **delta}
            self.role_sent = True
        return encode_data(self._envelope([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]))

    def _envelope(self, choices: list, **extra) -> dict:
        if self.message_id is None:
            self.message_id = new_id()
        return {"id": self.message_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices, **extra}

    # -- events --
    def on_message_start(self, payload: dict) -> list[bytes]:
        message = payload.get("message") or {}
        if self.message_id is None and message.get("id"):
            self.message_id = message["id"]
        self.model = message.get("model") or self.model
        self.usage.update({k: v for k, v in (message.get("usage") or {}).items() if isinstance(v, int)})
        return [] if self.role_sent else [self.chunk({})]

    def on_block_start(self, payload: dict) -> list[bytes]:
        block = payload.get("content_block") or {}
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            return [self.chunk({"content": block["text"]})]
        if kind == "thinking" and block.get("thinking"):
            return [self.chunk({"reasoning_content": block["thinking"]})]
        if kind != "tool_use":
            return []
        block_index = payload.get("index")
        tool_index = len(self.tool_index_by_block)
        self.tool_index_by_block[block_index] = tool_index
        initial = block.get("input")
        arguments = arguments_json(initial) if initial else ""
        if not arguments:
            self.tools_without_arguments.add(block_index)
        call = {"index": tool_index, "id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"), "arguments": arguments}}
        return [self.chunk({"tool_calls": [call]})]

    def on_block_delta(self, payload: dict) -> list[bytes]:
        delta = payload.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta":
            return [self.chunk({"content": delta.get("text", "")})] if delta.get("text") else []
        if kind == "thinking_delta":
            return [self.chunk({"reasoning_content": delta.get("thinking", "")})] if delta.get("thinking") else []
        if kind == "input_json_delta":
            block_index = payload.get("index")
            fragment = delta.get("partial_json") or ""
            if not fragment or block_index not in self.tool_index_by_block:
                return []
            self.tools_without_arguments.discard(block_index)
            return [self.tool_arguments(block_index, fragment)]
        return []  # signature_delta, citations_delta: nothing OpenAI-shaped to say

    def on_block_stop(self, payload: dict) -> list[bytes]:
        block_index = payload.get("index")
        if block_index in self.tools_without_arguments:
            # a tool without parameters: clients json.loads the arguments, "" would fail
            self.tools_without_arguments.discard(block_index)
            return [self.tool_arguments(block_index, "{}")]
        return []

    def tool_arguments(self, block_index: int, fragment: str) -> bytes:
        call = {"index": self.tool_index_by_block[block_index], "function": {"arguments": fragment}}
        return self.chunk({"tool_calls": [call]})

    def on_message_delta(self, payload: dict) -> list[bytes]:
        self.usage.update({k: v for k, v in (payload.get("usage") or {}).items() if isinstance(v, int)})
        stop_reason = (payload.get("delta") or {}).get("stop_reason")
        if stop_reason is None or self.finish_sent:
            return []
        self.finish_sent = True
        return [self.chunk({}, finish_reason(stop_reason))]

    def on_message_stop(self, payload: dict) -> list[bytes]:
        return self.finish()

    def on_error(self, payload: dict) -> list[bytes]:
        self.done = True
        # the tokens read so far are billed even when the stream fails: report them first
        # (SDKs raise at the error event and read nothing after it)
        usage = [self.usage_chunk()] if self.include_usage and self.usage else []
        return [*usage, encode_data(convert_error(payload.get("error") or {})), DONE]

    def finish(self) -> list[bytes]:
        out = []
        if not self.finish_sent:
            self.finish_sent = True
            out.append(self.chunk({}, DEFAULT_FINISH_REASON))
        if self.include_usage:
            out.append(self.usage_chunk())
        out.append(DONE)
        self.done = True
        return out

    def usage_chunk(self) -> bytes:
        return encode_data(self._envelope([], usage=convert_usage(self.usage)))

    HANDLERS = {
        "message_start": on_message_start,
        "content_block_start": on_block_start,
        "content_block_delta": on_block_delta,
        "content_block_stop": on_block_stop,
        "message_delta": on_message_delta,
        "message_stop": on_message_stop,
        "error": on_error,
        # "ping" and unknown future events: dropped
    }
