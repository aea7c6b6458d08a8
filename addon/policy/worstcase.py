"""A request's worst case: the most tokens and dollars it can use. A key with a budget or tpm holds
it while the request runs (policy/store.py says how), so it must be a true bound, and no larger
than it has to be, or near the end of a budget requests are refused that would have fit. Pure.

Input. The body's bytes bound its text (a token is at least one byte of UTF-8), except for what the
provider does not read as text:
- an image (a URL, inline data, a file id) costs at most its provider's documented maximum for one
  image (`Bound.image`: the provider resizes a larger one), whatever its bytes: the bytes of its
  URL or data are taken out of the count and that maximum put in. A model without a rule
  (`Bound.image` 0) counts the bytes;
- a document (a PDF inline, by URL or by file id) may carry far more text than its compressed
  bytes, and a request continuing stored state (Responses' `previous_response_id`,
  `conversation`, a stored `prompt`) carries input its body does not show: both are held at the
  model's context window;
- audio counts its bytes (a second of audio is billed far fewer tokens than its encoding's bytes).
No request is billed more input than the model's context window, so that caps the input held.

Output. The maximum the request names (lowered to the key's max_output_tokens, as the gateway
sends it), else what the gateway sends in its place or the model's own maximum output
(`Bound.output`, from providers/catalog.py), times the answers it asks for (`n`).

`Hold` keeps what the worst case was made of, so a refusal can say it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from addon.policy.virtual_keys import Bound, KeyPolicy
from addon.policy.store import NO_DEMAND, Demand
from addon.wire.tokens import Price

# a body that may hold an image or a document part has one of these bytes: only then is it walked
# (bytes.find, not a regular expression: this runs for every request of a key with a budget). `\u`:
# a JSON escape can spell "image" without them, so such a body is walked too
_MEDIA_MARKS = (b"image", b'file"', b'document"', b"\\u")


def may_hold_media(raw: bytes) -> bool:
    """Whether `raw` has one of _MEDIA_MARKS (find, not `in`: `in` takes the buffer protocol's
    slower path)."""
    find = raw.find
    for mark in _MEDIA_MARKS:
        if find(mark) >= 0:
            return True
    return False


_IMAGES = frozenset({"image_url", "input_image", "image"})  # chat, Responses, Anthropic
_DOCUMENTS = frozenset({"file", "input_file", "document"})  # chat, Responses, Anthropic
_TEXT_SOURCES = frozenset({"text", "content"})  # an Anthropic document that is text: its bytes count


_new = tuple.__new__


class Hold(NamedTuple):
    """What a worst case is made of, for the refusal's message."""

    input: int  # input tokens held
    output: int  # output tokens held per answer
    answers: int  # answers asked for (n)
    named: str | None  # the field the request set its maximum in; None: it set none
    lowered: bool  # the maximum is the key's max_output_tokens (sent instead, or a larger one lowered to it)
    images: int  # images held at `image` tokens each
    image: int
    whole_context: bool  # input held at the context window (a document, stored input)
    model: str
    field: str | None  # the API's maximum field, to name in the advice


def worst_case(policy: KeyPolicy, price: Price | None, body: dict, raw: bytes, api, bound: Bound, model: str) -> Demand:
    """The worst case of a request with the parsed `body` and its `raw` bytes, for `api` (its
    max_output_fields and choices_field), `bound` the key's Bound for `model`. NO_DEMAND for a
    key whose budget or tpm does not hold one."""
    if policy.tpm is None and not policy.has_budget:
        return NO_DEMAND
    # output
    output = answers = 0
    named = None
    lowered = False
    fields = api.max_output_fields
    if fields:
        for name in fields:
            value = count(body.get(name))
            if value:
                named, output = name, value
                if bound.cap is not None and value > bound.cap:
                    output, lowered = bound.cap, True
                break
        else:
            output, lowered = bound.output, bound.cap is not None
        answers = count(body.get(api.choices_field)) or 1 if api.choices_field else 1
    # input
    size = len(raw)
    images = 0
    whole = False
    for name in api.stored_input_fields:
        if body.get(name) is not None:
            whole = True
    if not whole and may_hold_media(raw):
        images, payload, whole = media(body)
        if images and bound.image:
            size += images * bound.image - payload
        else:
            images = 0
    context = bound.context
    held_input = context if whole and context else min(size, context) if context else size
    total = held_input + output * answers
    usd = (held_input * price.input + output * answers * price.output) / 1e6 if price is not None else 0.0
    # (tuple.__new__: a NamedTuple's own __new__ is a Python call of ten arguments, per request)
    return Demand(total, usd, _new(Hold, (held_input, output, answers, named, lowered, images, bound.image,
                                          whole and bool(context), model, fields[-1] if fields else None)))


def count(value: object) -> int:
    """A positive number as a whole count (rounded up: a provider that takes 19.5 must not be
    held 19), else 0."""
    if type(value) is int:
        return value if value > 0 else 0
    if type(value) is float and value > 0:
        return math.ceil(value)
    return 0


def media(body: dict) -> tuple[int, int, bool]:
    """(images, characters of their URLs or inline data, a document or file) anywhere in `body`:
    message parts, tool results, Responses items, each API's shape."""
    images = payload = 0
    document = False
    stack: list = [body]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            kind = node.get("type")
            if type(kind) is str:
                if kind in _IMAGES:
                    images += 1
                    payload += image_payload(kind, node)
                elif kind in _DOCUMENTS:
                    source = node.get("source")
                    document = document or not (kind == "document" and type(source) is dict
                                                and source.get("type") in _TEXT_SOURCES)
            stack.extend(v for v in node.values() if type(v) is dict or type(v) is list)
        else:
            stack.extend(v for v in node if type(v) is dict or type(v) is list)
    return images, payload, document


def image_payload(kind: str, node: dict) -> int:
    """The characters of an image part's URL or data (all of them are bytes of the body)."""
    if kind == "image":  # Anthropic: {"source": {"type": "base64", "data"} | {"type": "url", "url"}}
        source = node.get("source")
        value = (source.get("data") or source.get("url")) if type(source) is dict else None
    else:
        value = node.get("image_url")  # Responses: a string; chat: {"url": ...}
        if type(value) is dict:
            value = value.get("url")
    return len(value) if type(value) is str else 0


def made_of(hold: Hold | None) -> str:
    """`hold` in words, with what the client can do about it: "input up to 130 tokens;
    max_tokens 19 x n 100 = 1,900 output tokens; lower max_tokens or n to fit"."""
    if hold is None:
        return ""
    parts = [f"input up to {hold.input:,} tokens"]
    if hold.whole_context:
        parts[0] += " (the model's context window: a document, or input stored at the provider)"
    elif hold.images:
        parts[0] += f" ({hold.images} image{'s' if hold.images != 1 else ''} at {hold.image:,} each)"
    if hold.field is None:
        return "; ".join(parts)
    times = f" x n {hold.answers} = {hold.output * hold.answers:,}" if hold.answers > 1 else ""
    if hold.named is not None:
        value = f"{hold.output:,} (the key's max_output_tokens)" if hold.lowered else f"{hold.output:,}"
        parts.append(f"{hold.named} {value}{times} output tokens")
        parts.append(f"lower {hold.named}{' or n' if hold.answers > 1 else ''} to fit")
    elif hold.lowered:
        parts.append(f"no {hold.field}: {hold.output:,} output tokens held (the key's max_output_tokens){times}")
        parts.append(f"set a lower {hold.field}{' or n' if hold.answers > 1 else ''} to fit")
    else:
        parts.append(f"no {hold.field}: {hold.output:,} output tokens held for {hold.model}{times}")
        parts.append(f"set {hold.field} or the key's max_output_tokens")
    return "; ".join(parts)


def cap_output(body: dict, api, provider: str, cap: int | None) -> bool:
    """Make `body` (the request as the client wrote it) ask for at most `cap` output tokens (a
    key's or target's max_output_tokens, VirtualKey.output_cap): set in the API's field for
    `provider` when it names no maximum, a larger one lowered to it. True when `body` changed
    (it must be sent anew). The provider then stops there: the cap bounds the spend, not only
    the hold."""
    if cap is None or not api.max_output_fields:
        return False
    named = changed = False
    for name in api.max_output_fields:
        value = count(body.get(name))
        if value:
            named = True
            if value > cap:
                body[name] = cap
                changed = True
    if not named:
        field = api.output_field(provider)
        if field is not None:
            body[field] = cap
            changed = True
    return changed
