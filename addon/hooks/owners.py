"""Records who created each stored response, as it arrives (the rules: policy/owners.py).

A whole body is recorded in `response` (the client gets the body only once the record is written),
a stream from its first event (`response.created`, which carries the id the client may poll with).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable

from mitmproxy import ctx, exceptions, http

from addon.hooks.messages import plain_content
from addon.policy.owners import OWNED_API, FirstEvent, created, record
from addon.policy.store import OWNERS_PER_KEY
from addon.routing.state import state_of

log = logging.getLogger("gateway")


class ResponseOwners:
    """Records who created each stored response (see the module's docstring) in the shared
    store (hooks/live.py)."""

    def __init__(self, live) -> None:
        self.live = live

    def load(self, loader) -> None:
        loader.add_option(
            "owners_per_key", int, OWNERS_PER_KEY,
            "Stored responses (Responses API) whose creator the in-process store keeps per virtual key, "
            "for 30 days each: past it the key's own oldest record goes (its id then answers 404), never "
            "another key's. With a usage ledger they are read back at start-up. Redis keeps each for 30 days.",
        )

    def configure(self, updated) -> None:
        if "owners_per_key" in updated:
            if ctx.options.owners_per_key < 1:
                raise exceptions.OptionsError(f"owners_per_key must be 1 or more, not {ctx.options.owners_per_key}")
            store = self.live.store
            if hasattr(store, "owners_per_key"):  # MemoryStore (RedisStore has no cap: a TTL per record)
                store.owners_per_key = ctx.options.owners_per_key

    @staticmethod
    def creating(flow: http.HTTPFlow) -> str | None:
        """The creating key's fingerprint when the flow is a 200 to a Responses create."""
        state = state_of(flow)
        response = flow.response
        if (state is None or state.api != OWNED_API or state.resource or state.answered is not None
                or response is None or response.status_code != 200):
            return None
        return state.fingerprint

    def note(self, flow: http.HTTPFlow, key: str, body: object):
        state = state_of(flow)
        if isinstance(body, dict) and body.get("background") is True and isinstance(body.get("id"), str):
            state.background = body["id"]  # its usage comes later: hooks/accounting.py holds its worst case
        resource_id = created(body)
        if resource_id is not None:
            state.created = resource_id
            return self.live.store.note_owner(resource_id, record(key, state.target_id), time.time())
        return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        key = self.creating(flow)
        response = flow.response
        if key is None or not response.stream:
            return
        inner = response.stream
        watch = FirstEvent(lambda body: self.note(flow, key, body)).feed

        def stream(piece: bytes):
            try:
                watch(piece)
            except Exception:  # never in the way of the stream
                log.exception("gateway: could not record a stored response's owner")
            return inner(piece) if callable(inner) else piece

        response.stream = stream

    def response(self, flow: http.HTTPFlow) -> Awaitable | None:
        key = self.creating(flow)
        if key is None or flow.response.stream or state_of(flow).created is not None:
            return None
        try:
            body = json.loads(plain_content(flow.response))
        except (ValueError, RecursionError):
            return None
        return self.note(flow, key, body)  # RedisStore: the body goes out once the record is written
