"""Where each inbound API carries text a person or a tool wrote: the strings the detectors read,
each with its place (`messages[3].content[1].text`). Never images, audio, files or base64
sources, never the JSON structure (keys, roles, ids, tool definitions), never signed thinking
blocks (a changed one is refused by the provider). Each walker yields (place, holder, key):
holder[key] is the string, so masking replaces it in place."""

from __future__ import annotations

from collections.abc import Callable, Iterator

Place = tuple[str, object, object]


def _leaves(value: object, where: str) -> Iterator[Place]:
    """Every string inside a tool's input object (its values, not its keys)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str):
                yield f"{where}.{k}", value, k
            elif isinstance(v, (dict, list)):
                yield from _leaves(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, str):
                yield f"{where}[{i}]", value, i
            elif isinstance(v, (dict, list)):
                yield from _leaves(v, f"{where}[{i}]")


def _text(holder: object, key: object, where: str) -> Iterator[Place]:
    if isinstance(holder, dict) and isinstance(holder.get(key), str):
        yield where, holder, key


# OpenAI Chat Completions

def _chat_content(msg: dict, where: str) -> Iterator[Place]:
    content = msg.get("content")
    if isinstance(content, str):
        yield where + ".content", msg, "content"
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in ("text", None, "refusal"):
                yield from _text(part, "text", f"{where}.content[{j}].text")
                yield from _text(part, "refusal", f"{where}.content[{j}].refusal")
    yield from _text(msg, "refusal", where + ".refusal")
    calls = msg.get("tool_calls")
    if isinstance(calls, list):
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            yield from _text(fn, "arguments", f"{where}.tool_calls[{j}].function.arguments")
            custom = call.get("custom") if isinstance(call, dict) else None
            yield from _text(custom, "input", f"{where}.tool_calls[{j}].custom.input")
    yield from _text(msg.get("function_call"), "arguments", where + ".function_call.arguments")


def chat_request(body: dict) -> Iterator[Place]:
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, msg in enumerate(messages):
            if isinstance(msg, dict):
                yield from _chat_content(msg, f"messages[{i}]")


def chat_response(body: dict) -> Iterator[Place]:
    choices = body.get("choices")
    if isinstance(choices, list):
        for i, choice in enumerate(choices):
            msg = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(msg, dict):
                yield from _chat_content(msg, f"choices[{i}].message")


# Anthropic Messages

def _blocks(blocks: object, where: str) -> Iterator[Place]:
    if not isinstance(blocks, list):
        return
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":  # (the commonest, inline: a generator per block costs more than the block)
            if isinstance(block.get("text"), str):
                yield f"{where}[{j}].text", block, "text"
        elif kind == "tool_result":
            if isinstance(block.get("content"), str):
                yield f"{where}[{j}].content", block, "content"
            else:
                yield from _blocks(block.get("content"), f"{where}[{j}].content")
        elif kind in ("tool_use", "server_tool_use"):
            if isinstance(block.get("input"), (dict, list)):
                yield from _leaves(block["input"], f"{where}[{j}].input")
        elif kind == "document":
            at = f"{where}[{j}]"
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text":
                yield from _text(source, "data", at + ".source.data")
            elif isinstance(source, dict) and source.get("type") == "content":
                yield from _blocks(source.get("content"), at + ".source.content")
            yield from _text(block, "context", at + ".context")
        elif kind == "search_result":
            yield from _blocks(block.get("content"), f"{where}[{j}].content")


def messages_request(body: dict) -> Iterator[Place]:
    system = body.get("system")
    if isinstance(system, str):
        yield "system", body, "system"
    else:
        yield from _blocks(system, "system")
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                continue
            if isinstance(msg.get("content"), str):
                yield f"messages[{i}].content", msg, "content"
            else:
                yield from _blocks(msg.get("content"), f"messages[{i}].content")


def messages_response(body: dict) -> Iterator[Place]:
    yield from _blocks(body.get("content"), "content")


# OpenAI Responses

def _item(item: dict, where: str) -> Iterator[Place]:
    kind = item.get("type")
    if kind in ("message", None):
        content = item.get("content")
        if isinstance(content, str):
            yield where + ".content", item, "content"
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text", "refusal"):
                    yield from _text(part, "text", f"{where}.content[{j}].text")
                    yield from _text(part, "refusal", f"{where}.content[{j}].refusal")
    elif kind == "function_call":
        yield from _text(item, "arguments", where + ".arguments")
    elif kind == "custom_tool_call":
        yield from _text(item, "input", where + ".input")
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        if isinstance(output, str):
            yield where + ".output", item, "output"
        elif isinstance(output, list):
            for j, part in enumerate(output):
                if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text"):
                    yield from _text(part, "text", f"{where}.output[{j}].text")


def _items(items: object, name: str) -> Iterator[Place]:
    if isinstance(items, list):
        for i, item in enumerate(items):
            if isinstance(item, dict):
                yield from _item(item, f"{name}[{i}]")


def responses_request(body: dict) -> Iterator[Place]:
    yield from _text(body, "instructions", "instructions")
    if isinstance(body.get("input"), str):
        yield "input", body, "input"
    else:
        yield from _items(body.get("input"), "input")


def responses_response(body: dict) -> Iterator[Place]:
    yield from _items(body.get("output"), "output")
    if body.get("object") == "list":  # GET /v1/responses/{id}/input_items
        yield from _items(body.get("data"), "data")


# OpenAI embeddings

def embeddings_request(body: dict) -> Iterator[Place]:
    value = body.get("input")
    if isinstance(value, str):
        yield "input", body, "input"
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, str):  # token arrays are numbers: nothing to read
                yield f"input[{i}]", value, i


def _none(body: dict) -> Iterator[Place]:
    return iter(())


# by inbound API name (apis/): what its requests carry, and what its answers carry
REQUESTS: dict[str, Callable[[dict], Iterator[Place]]] = {
    "openai_chat": chat_request,
    "anthropic_messages": messages_request,
    "anthropic_count_tokens": messages_request,
    "openai_responses": responses_request,
    "openai_embeddings": embeddings_request,
}
RESPONSES: dict[str, Callable[[dict], Iterator[Place]]] = {
    "openai_chat": chat_response,
    "anthropic_messages": messages_response,
    "anthropic_count_tokens": _none,
    "openai_responses": responses_response,
    "openai_embeddings": _none,
}
