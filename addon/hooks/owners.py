"""Records who created each stored response, as it arrives (the rules: policy/owners.py).

A whole body is recorded in `response` (the client gets the body only once the record is written),
a stream from its first event (`response.created`, which carries the id the client may poll with).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable

from mitmproxy import http

from addon.hooks.messages import plain_content
from addon.policy.owners import OWNED_API, FirstEvent, created, record

log = logging.getLogger("gateway")


class ResponseOwners:
    """Records who created each stored response (see the module's docstring). `store` is
    swapped for RedisStore by StoreChoice, as the Gateway's is."""

    def __init__(self, store) -> None:
        self.store = store

    @staticmethod
    def creating(flow: http.HTTPFlow) -> str | None:
        """The creating key's fingerprint when the flow is a 200 to a Responses create."""
        meta = flow.metadata.get("gateway")
        response = flow.response
        if (meta is None or meta.get("api") != OWNED_API or meta.get("resource") or "answered" in meta
                or response is None or response.status_code != 200):
            return None
        return meta.get("fingerprint")

    def note(self, flow: http.HTTPFlow, key: str, body: object):
        resource_id = created(body)
        if resource_id is not None:
            meta = flow.metadata["gateway"]
            meta["created"] = resource_id
            return self.store.note_owner(resource_id, record(key, meta.get("target_id")), time.time())
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
        if key is None or flow.response.stream or "created" in flow.metadata["gateway"]:
            return None
        try:
            body = json.loads(plain_content(flow.response))
        except (ValueError, RecursionError):
            return None
        return self.note(flow, key, body)  # RedisStore: the body goes out once the record is written
