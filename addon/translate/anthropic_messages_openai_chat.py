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

from addon.translate.base import UpstreamRequest
from addon.translate.tables import ROLES, TOOL_CHOICES, effort_for_budget
from addon.wire.errors import GatewayError
from addon.wire.sse import compact_json, json_bytes
from addon.translate.anthropic_messages_openai_chat_response import (
    MessagesStreamTranslator,
    convert_completion,
    convert_error,
)

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
