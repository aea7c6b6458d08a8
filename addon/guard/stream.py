"""Masking a streamed answer as it passes, in the client's API's events.

Each text channel (a choice's content, a tool call's arguments, a content block, an output
item's text) has a `TextMasker`: it releases what no detector could still be matching and holds
back only the end that could be the start of a match (detector.pending: partial matches), so a
secret split across chunks is caught and a chunk's text waits at most until the next one comes,
unless the two together still look like the start of a match (bounded by the detectors'
max_len). At a channel's end the rest is released, masked. Explicit state, no I/O: the hook feeds
it SSE bytes (StreamGuard.feed) and sends what it returns."""

from __future__ import annotations

import json

from addon.guard import places
from addon.guard.scan import Scanner, guard_body
from addon.wire.sse import SSEDecoder

# released characters kept for the lookbehinds and \b in front of held text (what could still
# begin a match is held, not released, so a few suffice)
_CONTEXT = 8


class TextMasker:
    __slots__ = ("scanner", "held", "context", "counts")

    def __init__(self, scanner: Scanner, counts: dict[str, int]) -> None:
        self.scanner = scanner
        self.held = ""
        self.context = ""
        self.counts = counts

    def feed(self, delta: str, final: bool = False) -> str:
        """What of the channel's text so far can be sent now, masked."""
        base = len(self.context)
        full = self.context + self.held + delta
        end = len(full)
        if final:
            cut, whole = end, True
        else:
            cut, whole = self.scanner.pending(full, base)
        spans = self.scanner.spans(full) if whole else ()
        out = []
        pos = base
        for start, stop, name in spans:
            if stop <= base:
                continue  # (masked when it was released)
            if stop > cut and not final:
                cut = max(base, min(cut, start))
                break
            start = max(start, base)
            out.append(full[pos:start])
            out.append(self.scanner.marks.get(name, f"[REDACTED:{name}]"))
            self.counts[name] = self.counts.get(name, 0) + 1
            pos = stop
        if pos < cut:
            out.append(full[pos:cut])
        released_to = max(pos, cut)
        self.held = full[released_to:]
        if released_to > base:
            self.context = full[max(0, released_to - _CONTEXT):released_to]
        return "".join(out)

    def flush(self) -> str:
        return self.feed("", final=True) if self.held else ""


def _sse(event: str | None, data: str) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + data.replace("\n", "\ndata: ") + "\n\n").encode()


class StreamGuard:
    """An SSE stream of one inbound API masked event by event (`feed` bytes, `end` at the end)."""

    def __init__(self, api: str, scanner: Scanner) -> None:
        self.api = api
        self.scanner = scanner
        self.counts: dict[str, int] = {}
        self.decoder = SSEDecoder()
        self.channels: dict[object, TextMasker] = {}
        self.shift = 0  # Responses events renumbered after one the guard added
        self.template: dict | None = None  # a chat chunk's id/model fields, for a chunk the guard adds
        self.kinds: dict[object, str] = {}  # Anthropic: each block's type (text or tool_use)
        self.rewrite = {"openai_chat": self._chat, "anthropic_messages": self._messages,
                        "openai_responses": self._responses}.get(api)

    def channel(self, key: object) -> TextMasker:
        masker = self.channels.get(key)
        if masker is None:
            masker = self.channels[key] = TextMasker(self.scanner, self.counts)
        return masker

    def feed(self, piece: bytes) -> bytes:
        if self.rewrite is None:
            return piece
        return self._out(self.decoder.feed(piece))

    def end(self) -> bytes:
        """At the stream's end: what the decoder and the channels still hold."""
        if self.rewrite is None:
            return b""
        out = self._out(self.decoder.flush())
        rest = [(k, m.flush()) for k, m in self.channels.items() if m.held]
        if rest and self.api == "openai_chat":
            out += b"".join(_sse(None, json.dumps(self._chat_flush_chunk(k, t))) for k, t in rest if t)
        return out

    def _out(self, events) -> bytes:
        out = []
        for event, data in events:
            for ev, d in self.rewrite(event, data):
                out.append(_sse(ev, d))
        return b"".join(out)

    # OpenAI Chat Completions: choices[i].delta.content / .refusal / .tool_calls[t].function.arguments

    def _chat_flush_chunk(self, key, text: str) -> dict:
        chunk = dict(self.template or {"object": "chat.completion.chunk"})
        i = key[0]
        if key[1] == "tool":
            delta = {"tool_calls": [{"index": key[2], "function": {"arguments": text}}]}
        else:
            delta = {key[1]: text}
        chunk["choices"] = [{"index": i, "delta": delta, "finish_reason": None}]
        return chunk

    def _chat(self, event, data):
        if data.strip() == "[DONE]":
            for key, masker in self.channels.items():
                text = masker.flush()
                if text:
                    yield None, json.dumps(self._chat_flush_chunk(key, text))
            yield event, data
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            yield event, data
            return
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list) or not choices:
            yield event, data
            return
        if self.template is None:
            self.template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        changed = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            i = choice.get("index", 0)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            final = choice.get("finish_reason") is not None
            for field in ("content", "refusal"):
                if isinstance(delta.get(field), str) or (final and (i, field) in self.channels):
                    masker = self.channel((i, field))
                    new = masker.feed(delta.get(field) or "", final)
                    if new != delta.get(field):
                        delta[field] = new
                        changed = True
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        masker = self.channel((i, "tool", call.get("index", 0)))
                        new = masker.feed(fn["arguments"], final)
                        if new != fn["arguments"]:
                            fn["arguments"] = new
                            changed = True
            if final:
                for key, masker in self.channels.items():
                    if key[0] == i and key[1] == "tool" and masker.held:
                        rest = masker.flush()
                        delta.setdefault("tool_calls", []).append({"index": key[2], "function": {"arguments": rest}})
                        changed = True
        yield event, (json.dumps(chunk) if changed else data)

    # Anthropic Messages: content_block_delta text_delta / input_json_delta, by block index

    def _messages(self, event, data):
        try:
            obj = json.loads(data)
        except ValueError:
            yield event, data
            return
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            field = {"text_delta": "text", "input_json_delta": "partial_json"}.get(delta.get("type"))
            if field and isinstance(delta.get(field), str):
                new = self.channel(obj.get("index")).feed(delta[field])
                if new != delta[field]:
                    delta[field] = new
                    data = json.dumps(obj)
        elif kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "text" and block.get("text"):
                block["text"] = self.channel(obj.get("index")).feed(block["text"])
                data = json.dumps(obj)
            self.kinds[obj.get("index")] = block.get("type")
        elif kind == "content_block_stop":
            yield from self._messages_flush(obj.get("index"))
        elif kind in ("message_delta", "message_stop"):
            for index in list(self.channels):
                yield from self._messages_flush(index)
        yield event, data

    def _messages_flush(self, index):
        masker = self.channels.get(index)
        if masker is None or not masker.held:
            return
        text = masker.flush()
        tool = self.kinds.get(index) in ("tool_use", "server_tool_use")
        kind, field = ("input_json_delta", "partial_json") if tool else ("text_delta", "text")
        yield "content_block_delta", json.dumps({"type": "content_block_delta", "index": index,
                                                 "delta": {"type": kind, field: text}})

    # OpenAI Responses: output_text / refusal / function_call_arguments deltas, and the whole
    # texts of the .done events and the final response

    def _responses(self, event, data):
        try:
            obj = json.loads(data)
        except ValueError:
            yield event, data
            return
        if not isinstance(obj, dict):
            yield event, data
            return
        kind = obj.get("type") or event or ""
        changed = False
        if kind.endswith(".delta") and kind in _RESPONSES_DELTAS and isinstance(obj.get("delta"), str):
            key = (obj.get("output_index"), obj.get("content_index"), kind)
            new = self.channel(key).feed(obj["delta"])
            if new != obj["delta"]:
                obj["delta"] = new
                changed = True
        elif kind in _RESPONSES_DONE:
            delta_kind = kind[:-len("done")] + "delta"
            key = (obj.get("output_index"), obj.get("content_index"), delta_kind)
            masker = self.channels.get(key)
            if masker is not None and masker.held:
                rest = masker.flush()
                added = {k: obj[k] for k in ("item_id", "output_index", "content_index") if k in obj}
                added["type"] = delta_kind
                added["delta"] = rest
                if "sequence_number" in obj:
                    added["sequence_number"] = obj["sequence_number"] + self.shift
                    self.shift += 1
                yield delta_kind, json.dumps(added)
            field = _RESPONSES_DONE[kind]
            if isinstance(obj.get(field), str):
                masked = self.scanner.mask(obj[field])
                if masked is not None:
                    obj[field] = masked
                    changed = True
        elif kind == "response.content_part.done" and isinstance(obj.get("part"), dict):
            for where, holder, key in places._item({"type": "message", "content": [obj["part"]]}, ""):
                masked = self.scanner.mask(holder[key])
                if masked is not None:
                    holder[key] = masked
                    changed = True
        elif kind == "response.output_item.done" and isinstance(obj.get("item"), dict):
            changed = self._mask_whole(places._item(obj["item"], "")) or changed
        elif kind in ("response.completed", "response.incomplete", "response.failed") and isinstance(
                obj.get("response"), dict):
            changed = self._mask_whole(places.responses_response(obj["response"])) or changed
        if self.shift and "sequence_number" in obj:
            obj["sequence_number"] += self.shift
            changed = True
        yield event, (json.dumps(obj) if changed else data)

    def _mask_whole(self, found) -> bool:
        changed = False
        for _, holder, key in found:
            masked = self.scanner.mask(holder[key])  # (counted once, in the deltas)
            if masked is not None:
                holder[key] = masked
                changed = True
        return changed


_RESPONSES_DELTAS = {"response.output_text.delta", "response.refusal.delta",
                     "response.function_call_arguments.delta", "response.custom_tool_call_input.delta"}
_RESPONSES_DONE = {"response.output_text.done": "text", "response.refusal.done": "refusal",
                   "response.function_call_arguments.done": "arguments",
                   "response.custom_tool_call_input.done": "input"}


def mask_answer(api: str, body: dict, scanner: Scanner, counts: dict[str, int]) -> bool:
    """A whole answer's texts masked in place; True when anything was."""
    walk = places.RESPONSES.get(api)
    if walk is None:
        return False
    outcome = guard_body(scanner, walk(body), mask=True)
    for name, n in outcome.counts.items():
        counts[name] = counts.get(name, 0) + n
    return bool(outcome)
