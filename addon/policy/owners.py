"""Stored responses belong to the virtual key that made them.

OpenAI keeps a response made with `store` (the default) under its provider key: any virtual key
routed to that provider key could read it (GET /v1/responses/{id}, /input_items), delete it, or
continue from it (`previous_response_id`). So the gateway records which virtual key (its
fingerprint) created each response id, in the UsageStore (`note_owner` / `owner_of`: MemoryStore
in this process, RedisStore shared by a fleet, kept store.OWNER_TTL), and a request that names an id
its key did not create gets a 404, in OpenAI's words, and is never forwarded. An id the gateway
has no record of (made before this, directly at the provider, or past the TTL) is nobody's: 404.

`check()` runs in the Gateway before admission; `ResponseOwners` (hooks/owners.py, a part after the
Gateway) records the id of each stored response as it arrives: a whole body in `response` (the
client gets the body only once the record is written), a stream from its first event
(`response.created`, which carries the id the client may poll with).

A response lives at the target (provider account) that made it. For a key with several targets
the record also names that target (its `Target.id`: "<fingerprint>/<target id>"), and `check()`
returns it: the Gateway sends the request there and nowhere else (Gateway.pin). A record of a
single-target key, or one written before targets were recorded, is the bare fingerprint.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable

from addon.policy.store import StoreUnavailable
from addon.wire.errors import GatewayError


OWNED_API = "openai_responses"  # the API whose created objects are recorded
# what a recorded id looks like (an id a path may name: apis/openai_responses.RESOURCE): any other
# id is nobody's, and is answered 404 without asking the store (Redis keys are bytes: a string
# with no UTF-8 form, or a megabyte of one, never reaches it)
STORED_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
FIRST_EVENT_MAX = 1024 * 1024  # bytes of a stream read for its first event at most


# the request field naming a stored object -> how OpenAI's 404 names it
NOUNS = {None: "Response", "previous_response_id": "Previous response", "conversation": "Conversation"}


def not_found(resource_id: str, param: str | None) -> GatewayError:
    """OpenAI's own 404 for an unknown object: a key cannot tell another key's id from none."""
    shown = resource_id if len(resource_id) <= 64 else resource_id[:64] + "..."
    return GatewayError(404, f"{NOUNS.get(param, 'Object')} with id '{shown}' not found.", param=param,
                        type="invalid_request_error")


def refers(api, body: dict | None, tail: str) -> tuple[tuple[str, str | None], ...]:
    """The stored objects a request names ((id, field) pairs), for an API that has any
    (`stored_ids`: apis/openai_responses.py); () for the others."""
    stored_ids = getattr(api, "stored_ids", None)
    return stored_ids(body, tail) if stored_ids is not None else ()


def record(key: str, target_id: str | None) -> str:
    """What the store keeps for a response `key` (a fingerprint) created at target `target_id`."""
    return f"{key}/{target_id}" if target_id else key


def check(
    store, refers: tuple[tuple[str, str | None], ...], key: str, now: float
) -> str | None | Awaitable[str | None]:
    """Raise the 404 for the first of `refers` ((id, param) pairs) that `key` did not create;
    else the id of the target holding them (None: not recorded). An awaitable of that when the
    store does I/O (RedisStore: raises StoreUnavailable there)."""
    for resource_id, param in refers:
        if STORED_ID.fullmatch(resource_id) is None:
            raise not_found(resource_id, param)
    owners = [store.owner_of(resource_id, now) for resource_id, _ in refers]
    if not any(inspect.isawaitable(owner) for owner in owners):
        return _judge(refers, owners, key)
    return _check_later(refers, owners, key)


async def _check_later(refers, owners: list, key: str) -> str | None:
    try:
        known = [await owner if inspect.isawaitable(owner) else owner for owner in owners]
    except StoreUnavailable:
        raise GatewayError(503, "the gateway cannot check who created this stored response right now (its usage "
                                "store is unreachable); retry shortly", code="store_unavailable",
                           headers={"retry-after": "1"}) from None
    return _judge(refers, known, key)


def _judge(refers, owners: list, key: str) -> str | None:
    holder = None
    for (resource_id, param), owner in zip(refers, owners):
        creator, _, target_id = owner.partition("/") if owner else (None, "", "")
        if creator != key:
            raise not_found(resource_id, param)
        holder = holder or target_id or None
    return holder


def created(body: object) -> str | None:
    """The id of a stored Response object, None for one made with `store: false` (or no id)."""
    if not isinstance(body, dict):
        return None
    resource_id = body.get("id")
    if (not isinstance(resource_id, str) or not resource_id.startswith("resp_") or body.get("store") is False
            or STORED_ID.fullmatch(resource_id) is None):
        return None
    return resource_id


class FirstEvent:
    """Collects a stream's bytes up to its first event (`response.created`) and hands that
    event's Response object to `found`, once; after that, and past FIRST_EVENT_MAX, it only
    passes pieces on."""

    __slots__ = ("buf", "found")

    def __init__(self, found: Callable[[dict], None]) -> None:
        self.buf: bytearray | None = bytearray()
        self.found = found

    def feed(self, piece: bytes) -> None:
        buf = self.buf
        if buf is None:
            return
        buf += piece
        end = min((i for i in (buf.find(b"\n\n"), buf.find(b"\r\n\r\n")) if i >= 0), default=-1)
        if end < 0 and piece and len(buf) <= FIRST_EVENT_MAX:
            return
        self.buf = None
        event = bytes(buf if end < 0 else buf[:end])
        payload = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:"))
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if isinstance(data, dict) and isinstance(data.get("response"), dict):
            self.found(data["response"])
