"""OpenAI Chat Completions in, Anthropic Messages out: the translation pair.

`prepare` maps the OpenAI request to a Messages request (or raises GatewayError(400) for what
Anthropic cannot serve faithfully); the exchange maps the Message back to a chat.completion, an
Anthropic error body to an OpenAI error, and the Anthropic event stream to chat.completion.chunk
events, incrementally. Everything here is pure: dicts and bytes in, dicts and bytes out.
Policy decisions (defaults, dropped and rejected parameters) are documented in README.md ("Anthropic (Claude) behind the OpenAI API").
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable

from addon.apis.anthropic_messages import anthropic_error
from addon.apis.openai_chat import is_openai_error, wrap_foreign_error
from addon.translate.base import UpstreamRequest
from addon.translate.tables import REASONING_BUDGETS, ROLES, TOOL_CHOICES
from addon.wire.errors import GatewayError
from addon.wire.sse import json_bytes
from addon.translate.openai_chat_anthropic_response import StreamTranslator, convert_error, convert_message

ANTHROPIC_VERSION = "2023-06-01"

# --- declarative tables --------------------------------------------------------------------

# Anthropic rejects a request without max_tokens; OpenAI clients usually omit it. Longest model
# prefix wins. Values stay below the point where Anthropic's SDKs refuse non-streaming requests
# (~21k tokens) while leaving long answers room; an answer cut short says finish_reason "length".
DEFAULT_MAX_TOKENS: dict[str, int] = {
    "claude-3-haiku": 4096,
    "claude-3-sonnet": 4096,
    "claude-3-opus": 4096,
    "claude-3-5": 8192,
    "claude-3-7": 16384,
    "claude-haiku-4": 16384,
    "claude-sonnet-4": 16384,
    "claude-opus-4": 16384,
    "claude-haiku-5": 16384,
    "claude-sonnet-5": 16384,
    "claude-opus-5": 16384,
    "claude-fable-5": 16384,
    "claude-mythos-5": 16384,
}
FALLBACK_MAX_TOKENS = 4096



# OpenAI temperature is 0..2, Anthropic's 0..1: clamp (documented), not rescale, so that the
# common 0..1 values mean what the client meant.
def _clamp_temperature(value):
    return min(max(float(value), 0.0), 1.0)


def _stop_sequences(value):
    stops = [value] if isinstance(value, str) else list(value)
    return [s for s in stops if isinstance(s, str) and s]  # Anthropic rejects empty sequences


# OpenAI parameter -> (Anthropic parameter, transform). `top_k` and `thinking` are not OpenAI
# parameters but arrive via the SDK's extra_body and mean the same thing upstream.
FLAT_PARAMS: dict[str, tuple[str, Callable]] = {
    "temperature": ("temperature", _clamp_temperature),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "stop": ("stop_sequences", _stop_sequences),
    "stream": ("stream", bool),
    "thinking": ("thinking", dict),
}

# OpenAI-only parameters that would change the answer when set to something other than their
# default: rejected rather than silently dropped. name -> values that are harmless to drop.
REJECTED_UNLESS_DEFAULT: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "audio": (None,),
    "web_search_options": (None,),
    "functions": (None, []),  # legacy function calling: use tools
    "function_call": (None,),
}

IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


# --- request ---------------------------------------------------------------------------------


def default_max_tokens(model: str) -> int:
    best = ""
    for prefix in DEFAULT_MAX_TOKENS:
        if model.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return DEFAULT_MAX_TOKENS[best] if best else FALLBACK_MAX_TOKENS


def bad_request(message: str, param: str | None = None, code: str = "unsupported_parameter") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def build_request(request: dict) -> dict:
    """OpenAI chat completion request -> Anthropic Messages request (raises GatewayError)."""
    check_unsupported(request)
    system, messages = convert_messages(request["messages"])
    out: dict = {"model": request["model"], "messages": messages, "max_tokens": max_tokens_for(request)}
    if system:
        out["system"] = system
    for name, (target, transform) in FLAT_PARAMS.items():
        value = request.get(name)
        if value is None:
            continue
        try:
            out[target] = transform(value)
        except (TypeError, ValueError):
            raise bad_request(f"'{name}' has an invalid value", name, "invalid_value") from None
    if not out.get("stop_sequences", True):
        del out["stop_sequences"]
    apply_reasoning_effort(request, out)
    output_format = convert_response_format(request.get("response_format"))
    if output_format is not None:
        out["output_config"] = {"format": output_format}
    tools = request.get("tools")
    if tools:
        out["tools"] = [convert_tool(tool, i) for i, tool in enumerate(tools)]
        tool_choice = convert_tool_choice(request.get("tool_choice"), request.get("parallel_tool_calls"))
        if tool_choice is not None:
            out["tool_choice"] = tool_choice
    elif request.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request("tool_choice needs tools", "tool_choice", "invalid_value")
    else:
        declare_history_tools(out)
    user = request.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user[:512]}
    return out


def declare_history_tools(out: dict) -> None:
    """Anthropic rejects tool_use/tool_result blocks in a request without tools, OpenAI does not
    (a follow-up turn that only summarises). Declare the tools the history used, uncallable."""
    names = [
        block["name"] for message in out["messages"] for block in message["content"] if block["type"] == "tool_use"
    ]
    if names:
        out["tools"] = [{"name": name, "input_schema": {"type": "object"}} for name in dict.fromkeys(names)]
        out["tool_choice"] = {"type": "none"}


def check_unsupported(request: dict) -> None:
    n = request.get("n")
    if n is not None and n != 1:
        raise bad_request(
            "'n' greater than 1 is not supported by the Anthropic provider (Claude returns one choice)", "n"
        )
    for name, harmless in REJECTED_UNLESS_DEFAULT.items():
        if name in request and request[name] not in harmless:
            raise bad_request(f"'{name}' is not supported by the Anthropic provider", name)
    modalities = request.get("modalities")
    if modalities and any(m != "text" for m in modalities):
        raise bad_request("only text output is supported by the Anthropic provider", "modalities")


def convert_response_format(response_format) -> dict | None:
    """json_schema -> Anthropic's native structured output (the answer is JSON text, as with
    OpenAI); models without it make Anthropic answer 400, which the client sees. json_object has
    no Anthropic equivalent that guarantees JSON: rejected rather than silently ignored."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                              "response_format", "invalid_value")
        return {"type": "json_schema", "schema": schema}
    raise bad_request(
        f"response_format '{kind}' is not supported by the Anthropic provider; use 'json_schema' with a schema",
        "response_format",
    )


def max_tokens_for(request: dict) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
            raise bad_request(f"'{name}' must be a positive integer", name, "invalid_value")
        return int(value)
    return default_max_tokens(request["model"])


def apply_reasoning_effort(request: dict, out: dict) -> None:
    effort = request.get("reasoning_effort")
    if effort is None or "thinking" in out:
        return
    if effort == "none":
        return
    budget = REASONING_BUDGETS.reverse(effort)  # Anthropic requires >= 1024 and < max_tokens
    if not budget:
        raise bad_request(f"reasoning_effort '{effort}' is not supported", "reasoning_effort", "invalid_value")
    if out["max_tokens"] <= budget:
        if request.get("max_completion_tokens") is not None or request.get("max_tokens") is not None:
            raise bad_request(
                f"reasoning_effort '{effort}' needs max_tokens above its thinking budget of {budget}",
                "max_tokens", "invalid_value")
        out["max_tokens"] = budget + default_max_tokens(request["model"])
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    out.pop("temperature", None)  # Anthropic rejects temperature other than 1 with thinking on
    out.pop("top_k", None)


def convert_messages(messages: list) -> tuple[list[dict], list[dict]]:
    """-> (system text blocks, alternating user/assistant messages)."""
    system: list[dict] = []
    turns: list[dict] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_value")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(text_blocks(message.get("content"), i))
            continue
        anthropic_role = ROLES.reverse(role)
        if role == "user":
            blocks = user_blocks(message.get("content"), i)
        elif role == "assistant":
            blocks = assistant_blocks(message, i)
        elif role == "tool":
            blocks = [tool_result_block(message, i)]
        else:
            raise bad_request(f"messages[{i}].role '{role}' is not supported", f"messages[{i}].role", "invalid_value")
        if not blocks:
            continue  # an empty message; Anthropic rejects empty content
        if turns and turns[-1]["role"] == anthropic_role:
            turns[-1]["content"].extend(blocks)  # Anthropic wants alternating roles
        else:
            turns.append({"role": anthropic_role, "content": blocks})
    if not turns:
        raise bad_request(
            "at least one user or assistant message with content is required", "messages", "invalid_value"
        )
    for turn in turns:
        if turn["role"] == "user":  # Anthropic wants tool results before any other user content
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    last = turns[-1]
    if last["role"] == "assistant" and last["content"][-1]["type"] == "text":
        # a prefilled final assistant turn may not end in whitespace
        last["content"][-1]["text"] = last["content"][-1]["text"].rstrip()
        if not last["content"][-1]["text"]:
            last["content"].pop()
            if not last["content"]:
                turns.pop()
    return system, turns


def text_block(text: str, part: dict | None = None) -> dict:
    block = {"type": "text", "text": text}
    if part and isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def text_blocks(content, i: int) -> list[dict]:
    """String or text parts -> non-empty text blocks (system, tool and assistant content)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [text_block(content)] if content.strip() else []
    if not isinstance(content, list):
        raise bad_request(
            f"messages[{i}].content must be a string or an array", f"messages[{i}].content", "invalid_value"
        )
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            text = part.get(kind) or ""
            if text.strip():
                blocks.append(text_block(text, part))
        else:
            raise bad_request(f"messages[{i}].content[{j}]: part type '{kind}' is not supported here",
                              f"messages[{i}].content[{j}]", "invalid_value")
    return blocks


def user_blocks(content, i: int) -> list[dict]:
    if not isinstance(content, list):
        return text_blocks(content, i)
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            blocks.append(image_block(part, f"messages[{i}].content[{j}]"))
        elif kind == "text":
            blocks.extend(text_blocks([part], i))
        else:
            raise bad_request(f"messages[{i}].content[{j}]: content part type '{kind}' is not supported by the "
                              "Anthropic provider", f"messages[{i}].content[{j}]", "invalid_value")
    return blocks


def image_block(part: dict, where: str) -> dict:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise bad_request(f"{where}.image_url.url must be a string", where, "invalid_value")
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64":
            raise bad_request(f"{where}: a data URL image must be base64-encoded", where, "invalid_value")
        if media_type not in IMAGE_MEDIA_TYPES:
            raise bad_request(f"{where}: image type '{media_type}' is not supported (use jpeg, png, gif or webp)",
                              where, "invalid_value")
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{where}: the data URL is not valid base64", where, "invalid_value") from None
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif url.startswith(("http://", "https://")):
        source = {"type": "url", "url": url}  # Anthropic fetches it; the gateway never downloads
    else:
        raise bad_request(f"{where}: image URL must be a data: or http(s) URL", where, "invalid_value")
    return {"type": "image", "source": source}


def assistant_blocks(message: dict, i: int) -> list[dict]:
    blocks = text_blocks(message.get("content"), i)
    for j, call in enumerate(message.get("tool_calls") or []):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not function.get("name") or not call.get("id"):
            raise bad_request(f"{where} needs an id and a function name", where, "invalid_value")
        arguments = function.get("arguments") or "{}"
        try:
            tool_input = json.loads(arguments)
        except (TypeError, ValueError):
            tool_input = None
        if not isinstance(tool_input, dict):
            raise bad_request(f"{where}.function.arguments (message {i}) is not a JSON object",
                              f"{where}.function.arguments", "invalid_value")
        blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"], "input": tool_input})
    return blocks


def tool_result_block(message: dict, i: int) -> dict:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise bad_request(
            f"messages[{i}].tool_call_id is required for a tool message", f"messages[{i}].tool_call_id", "invalid_value"
        )
    block: dict = {"type": "tool_result", "tool_use_id": tool_call_id}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        parts = text_blocks(content, i)
        if parts:
            block["content"] = parts
    return block


def convert_tool(tool: dict, i: int) -> dict:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not function.get("name"):
        raise bad_request(f"tools[{i}]: only function tools with a name are supported", f"tools[{i}]", "invalid_value")
    out = {"name": function["name"], "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        out["description"] = function["description"]
    return out


def convert_tool_choice(choice, parallel_tool_calls) -> dict | None:
    if choice is None:
        converted = None
    elif isinstance(choice, str) and TOOL_CHOICES.reverse(choice):
        converted = {"type": TOOL_CHOICES.reverse(choice)}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) and choice["function"].get("name"):
        converted = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise bad_request(
            "tool_choice must be 'auto', 'required', 'none' or a named function", "tool_choice", "invalid_value"
        )
    if parallel_tool_calls is False and (converted is None or converted["type"] != "none"):
        converted = converted or {"type": "auto"}
        converted["disable_parallel_tool_use"] = True
    return converted


# --- the pair -------------------------------------------------------------------------------


class AnthropicExchange:
    __slots__ = ("model", "include_usage", "created")
    translates_success = True

    def __init__(self, model: str, include_usage: bool, created: int) -> None:
        self.model = model
        self.include_usage = include_usage
        self.created = created

    def translate_body(self, status: int, body: bytes) -> bytes:
        if status >= 400:
            error = anthropic_error(body)
            if error is not None:
                return json.dumps(convert_error(error)).encode()
            return body if is_openai_error(body) else wrap_foreign_error(status, body)
        message = json.loads(body)  # not JSON: the adapter answers 502
        if not isinstance(message, dict) or message.get("type") != "message":
            raise ValueError("the provider's 2xx body is not an Anthropic message")
        return json_bytes(convert_message(message, self.created))

    def stream_translator(self) -> StreamTranslator:
        return StreamTranslator(self.created, self.model, self.include_usage)


class OpenAIChatToAnthropic:
    """The pair: OpenAI Chat Completions from the client, Anthropic Messages to the provider."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.now = now

    def prepare(self, request: dict) -> tuple[UpstreamRequest, AnthropicExchange]:
        body = build_request(request)
        stream_options = request.get("stream_options") or {}
        include_usage = bool(request.get("stream")) and bool(stream_options.get("include_usage"))
        upstream = UpstreamRequest(UPSTREAM_HEADERS, json_bytes(body))
        return upstream, AnthropicExchange(request["model"], include_usage, int(self.now()))


UPSTREAM_HEADERS = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
