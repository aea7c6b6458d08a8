"""Anthropic Messages in, OpenAI Chat Completions out: the pair for Claude Code and anthropic-SDK
clients whose virtual key names an OpenAI-compatible provider (OpenAI, DeepSeek, ...).

`prepare` maps the Messages request to a chat completion request, or raises GatewayError(400)
naming a parameter that has no faithful equivalent and would change the answer (`top_k`, server
tools, documents). Parameters that manage context or cost, not what is asked (`cache_control`,
`context_management`, ...), and those only approximated (`thinking` -> `reasoning_effort`) are
named in `UpstreamRequest.dropped`: the gateway puts them in `x-gateway-dropped-params` and the
log. The exchange maps the chat.completion back to a Message, OpenAI error bodies to Anthropic
ones, and the chunk stream to Anthropic's event sequence, incrementally. Pure: dicts and bytes.
The mapping is documented in docs/anthropic.md ("Anthropic Messages in front").
"""

from __future__ import annotations

import base64
import json

from addon.apis.anthropic_messages import anthropic_error, error_body, error_dict, error_type
from addon.apis.openai_chat import is_openai_error
from addon.translate.base import UpstreamRequest
from addon.translate.tables import ERROR_TYPES, FINISH_REASONS, ROLES, TOOL_CHOICES, effort_for_budget
from addon.wire.tokens import usage_from_dict
from addon.wire.errors import GatewayError
from addon.wire.sse import SSEDecoder, compact_json, json_bytes

# --- declarative tables ----------------------------------------------------------------------

# models that take `reasoning_effort` (and `max_completion_tokens` instead of `max_tokens`);
# models that reason without an effort knob. Longest prefix wins; others do not reason.
REASONING_EFFORT_MODELS = ("o1", "o3", "o4", "gpt-5")
ALWAYS_REASONING_MODELS = ("deepseek-reasoner",)
# Anthropic's effort levels beyond OpenAI's
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high", "minimal": "minimal"}

# would change the answer and have no Chat Completions equivalent: 400 naming them
REJECTED = {
    "top_k": "top_k has no equivalent in the OpenAI Chat Completions API",
    "mcp_servers": "MCP servers run at Anthropic; an OpenAI-compatible provider cannot call them",
    "container": "code-execution containers exist only at Anthropic",
}
# manage context, cost or routing, not what is asked: dropped, and named
DROPPED = ("context_management", "service_tier", "inference_geo")
# copied as they are
FLAT = ("temperature", "top_p")
KNOWN = frozenset({"model", "messages", "system", "max_tokens", "stop_sequences", "stream", "tools", "tool_choice",
                   "metadata", "thinking", "output_config", *FLAT, *REJECTED, *DROPPED})
USER_BLOCKS = frozenset({"text", "image", "tool_result"})


def bad_request(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, code="unsupported_parameter", param=param)


def prefix_match(model: str, prefixes: tuple[str, ...]) -> bool:
    name = model.rpartition("/")[2]  # "openai/gpt-5" on some OpenAI-compatible routers
    return name.startswith(prefixes)


# --- request ---------------------------------------------------------------------------------


MAX_NAMED = 32


class Dropped:
    """The names of dropped or approximated parameters, each once, in the order met."""

    def __init__(self) -> None:
        self.names: dict[str, None] = {}

    def add(self, name: str) -> None:
        if len(self.names) < MAX_NAMED:  # a client's made-up parameter names: bounded, and cut short
            self.names[name[:64]] = None

    def cache_control(self, obj) -> None:
        if isinstance(obj, dict) and "cache_control" in obj:
            self.add("cache_control")


def build_request(request: dict, dropped: Dropped) -> dict:
    """Anthropic Messages request -> OpenAI chat completion request (raises GatewayError)."""
    for name, why in REJECTED.items():
        if request.get(name) is not None:
            raise bad_request(f"{name}: not supported for this virtual key's provider ({why})", name)
    model = request["model"]
    messages: list[dict] = []
    system = request.get("system")
    if system:
        messages.append({"role": "system", "content": system_text(system, "system", dropped)})
    for i, message in enumerate(request["messages"]):
        messages.extend(convert_message(message, i, dropped))
    out: dict = {"model": model, "messages": messages}
    max_tokens = request.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise bad_request("max_tokens: must be a positive integer", "max_tokens")
        out["max_completion_tokens" if prefix_match(model, REASONING_EFFORT_MODELS) else "max_tokens"] = max_tokens
    for name in FLAT:
        value = request.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad_request(f"{name}: must be a number", name)
            out[name] = value
    stops = request.get("stop_sequences")
    if stops:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad_request("stop_sequences: must be an array of strings", "stop_sequences")
        out["stop"] = stops
    if request.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # the final message_delta carries it
    convert_metadata(request.get("metadata"), out, dropped)
    tools = request.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise bad_request("tools: must be an array", "tools")
        out["tools"] = [convert_tool(tool, i, dropped) for i, tool in enumerate(tools)]
    convert_tool_choice(request.get("tool_choice"), out)
    convert_reasoning(request, model, out, dropped)
    convert_output_format(request.get("output_config"), out)
    for name in DROPPED:
        if request.get(name) is not None:
            dropped.add(name)
    for name in request:
        if name not in KNOWN:
            dropped.add(name)  # a newer Messages parameter: not silently
    return out


def system_text(system, where: str, dropped: Dropped) -> str:
    """A system prompt (string or text blocks) as one string: blocks joined by a blank line."""
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise bad_request(f"{where}: must be a string or an array of text blocks", where)
    texts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{where}[{j}]: only text blocks are supported here", f"{where}[{j}]")
        dropped.cache_control(block)
        texts.append(block["text"])
    return "\n\n".join(texts)


def convert_message(message, i: int, dropped: Dropped) -> list[dict]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where}: must be an object", where)
    role, content = message.get("role"), message.get("content")
    if role == "system":  # Claude Code's mid-conversation system messages stay where they are
        return [{"role": "system", "content": system_text(content, f"{where}.content", dropped)}]
    if role not in ("user", "assistant"):
        raise bad_request(f"{where}.role: '{role}' is not supported", f"{where}.role")
    if isinstance(content, str):
        return [{"role": ROLES.forward(role), "content": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content: must be a string or an array of blocks", f"{where}.content")
    return user_messages(content, where, dropped) if role == "user" else [assistant_message(content, where, dropped)]


def user_messages(blocks: list, where: str, dropped: Dropped) -> list[dict]:
    """A user turn -> tool messages (its tool results, in order) and user messages (the rest)."""
    out: list[dict] = []
    parts: list[dict] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block_type(block)
        if kind not in USER_BLOCKS:
            raise bad_request(f"{at}: block type '{kind}' is not supported for this virtual key's provider", at)
        dropped.cache_control(block)
        if kind == "tool_result":
            if parts:
                out.append(user_message(parts))
                parts = []
            out.append(tool_message(block, at, dropped))
        elif kind == "text":
            parts.append({"type": "text", "text": text_of(block, at)})
        else:
            parts.append(image_part(block, at))
    if parts:
        out.append(user_message(parts))
    return out


def block_type(block) -> str | None:
    """A content block's `type` when it is a string (a table key), else None (refused by name)."""
    kind = block.get("type") if isinstance(block, dict) else None
    return kind if isinstance(kind, str) else None


def user_message(parts: list[dict]) -> dict:
    if all(p["type"] == "text" for p in parts):  # plain text as a string: every provider takes it
        return {"role": "user", "content": "\n\n".join(p["text"] for p in parts)}
    return {"role": "user", "content": parts}


def text_of(block: dict, at: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise bad_request(f"{at}.text: must be a string", f"{at}.text")
    return text


def image_part(block: dict, at: str) -> dict:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        try:
            base64.b64decode(source["data"], validate=True)
        except ValueError:
            raise bad_request(f"{at}.source.data: not valid base64", f"{at}.source.data") from None
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise bad_request(f"{at}.source: an image needs a base64 or url source", f"{at}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def tool_message(block: dict, at: str, dropped: Dropped) -> dict:
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise bad_request(f"{at}.tool_use_id: required", f"{at}.tool_use_id")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else None
                raise bad_request(f"{at}.content[{k}]: '{kind}' in a tool result is not supported for this "
                                  "virtual key's provider (text only)", f"{at}.content[{k}]")
            dropped.cache_control(part)
            texts.append(text_of(part, f"{at}.content[{k}]"))
        text = "\n\n".join(texts)
    else:
        raise bad_request(f"{at}.content: must be a string or an array", f"{at}.content")
    if block.get("is_error"):
        dropped.add("tool_result.is_error")  # the result's text says so; OpenAI has no flag
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def assistant_message(blocks: list, where: str, dropped: Dropped) -> dict:
    texts: list[str] = []
    calls: list[dict] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block_type(block)
        if kind == "text":
            dropped.cache_control(block)
            texts.append(text_of(block, at))
        elif kind == "tool_use":
            dropped.cache_control(block)
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad_request(f"{at}: tool_use needs an id and a name", at)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": compact_json(block.get("input") or {})}})
        elif kind in ("thinking", "redacted_thinking"):
            dropped.add("thinking_blocks")  # earlier turns' reasoning: providers do not take it back
        else:
            raise bad_request(f"{at}: block type '{kind}' is not supported for this virtual key's provider", at)
    message: dict = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def convert_metadata(metadata, out: dict, dropped: Dropped) -> None:
    if not isinstance(metadata, dict):
        return
    for name, value in metadata.items():
        if name == "user_id" and isinstance(value, str) and value:
            out["user"] = value
        elif value is not None:
            dropped.add(f"metadata.{name}")


def convert_tool(tool, i: int, dropped: Dropped) -> dict:
    at = f"tools[{i}]"
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise bad_request(f"{at}: a tool needs a name", at)
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise bad_request(f"{at}: '{kind}' is an Anthropic server tool; this virtual key's provider cannot run it", at)
    dropped.cache_control(tool)
    function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def convert_tool_choice(choice, out: dict) -> None:
    if choice is None:
        return
    kind = block_type(choice)
    if kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif TOOL_CHOICES.forward(kind):
        out["tool_choice"] = TOOL_CHOICES.forward(kind)
    else:
        raise bad_request("tool_choice: type must be 'auto', 'any', 'tool' (with a name) or 'none'", "tool_choice")
    if choice.get("disable_parallel_tool_use") and "tools" in out:
        out["parallel_tool_calls"] = False
    if "tools" not in out and out["tool_choice"] != "none":
        raise bad_request("tool_choice: needs tools", "tool_choice")
    if "tools" not in out:
        del out["tool_choice"]


def convert_reasoning(request: dict, model: str, out: dict, dropped: Dropped) -> None:
    """thinking / output_config.effort -> reasoning_effort where the model takes it; named either
    way (reasoning_effort only approximates a thinking budget)."""
    thinking = request.get("thinking")
    config = request.get("output_config") if isinstance(request.get("output_config"), dict) else {}
    effort = EFFORTS.get(config.get("effort")) if isinstance(config.get("effort"), str) else None
    if config.get("effort") is not None:
        dropped.add("output_config.effort")
    if isinstance(thinking, dict):
        kind = thinking.get("type")
        if kind == "disabled":
            effort = None
        elif kind == "enabled" and effort is None and isinstance(thinking.get("budget_tokens"), int):
            effort = effort_for_budget(thinking["budget_tokens"])
        elif kind == "adaptive" and effort is None:
            effort = "medium"
        dropped.add("thinking")
    elif thinking is not None:
        raise bad_request("thinking: must be an object", "thinking")
    if effort is not None and prefix_match(model, REASONING_EFFORT_MODELS):
        out["reasoning_effort"] = effort


def convert_output_format(config, out: dict) -> None:
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad_request("output_config.format: only {'type': 'json_schema', 'schema': {...}} is supported",
                          "output_config.format")
    out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


# --- response --------------------------------------------------------------------------------


def message_id(chat_id) -> str:
    chat_id = chat_id if isinstance(chat_id, str) and chat_id else "gateway"
    return chat_id if chat_id.startswith("msg_") else f"msg_{chat_id}"


def delta_usage(usage) -> dict:
    """OpenAI usage -> Anthropic's (a message_delta's): input_tokens exclude the cache reads."""
    u = usage_from_dict(usage)
    prompt, cached, completion = (u.prompt_tokens, min(u.cached_tokens, u.prompt_tokens), u.completion_tokens) if u else (0, 0, 0)
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
            start = {"type": "text", "text": "", "citations": None} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
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


# --- the pair --------------------------------------------------------------------------------


class MessagesExchange:
    __slots__ = ("model", "stops")
    translates_success = True

    def __init__(self, model: str, stops: tuple[str, ...] = ()) -> None:
        self.model = model
        self.stops = stops  # the request's stop_sequences: a provider may name the one it stopped on

    def translate_body(self, status: int, body: bytes) -> bytes | None:
        if status >= 400:
            return convert_error(status, body)
        completion = json.loads(body)  # not JSON: the adapter answers 502
        if not isinstance(completion, dict):
            raise ValueError("the provider's 2xx body is not a chat.completion")
        return json_bytes(convert_completion(completion, self.model, self.stops))

    def stream_translator(self) -> MessagesStreamTranslator:
        return MessagesStreamTranslator(self.model, self.stops)


class AnthropicMessagesToOpenAIChat:
    """The pair: Anthropic Messages from the client, Chat Completions to the provider."""

    def prepare(self, request: dict) -> tuple[UpstreamRequest, MessagesExchange]:
        dropped = Dropped()
        body = build_request(request, dropped)
        # the client's query (Claude Code's ?beta=true) means nothing to a chat completions API
        upstream = UpstreamRequest(UPSTREAM_HEADERS, json_bytes(body), keep_query=False,
                                   dropped=tuple(dropped.names))
        return upstream, MessagesExchange(request["model"], tuple(body.get("stop") or ()))


UPSTREAM_HEADERS = {"content-type": "application/json"}
