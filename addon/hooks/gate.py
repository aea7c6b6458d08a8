"""What a request's headers can refuse before its body is read (the Gateway's `screen` asks),
and the requests of limited keys whose bodies are being read meanwhile.

An authenticated client must not make the gateway hold a body (tens of megabytes) only to refuse
it: a key whose rpm or max_parallel is full, or whose budget or tpm is used up, is refused at the
headers (rules.admit_early; the store's `peek` counts nothing). Until a request of a limited key
is admitted or refused (`after`), or its flow ends (`leave`, from the Gateway's response and
error hooks), it counts for its key as if admitted: a burst of large bodies being read cannot
all pass the headers of an rpm-2 key. Past max_buffered_mb of request bytes held by the process
(hooks/patches/limits.py), a request whose content-length would pass it gets the 503 here too.

Per process, like the bodies it counts; not a mitmproxy addon (no hooks of its own): the Gateway
gets it at construction and calls it at the places above.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

from addon.hooks.patches.limits import held
from addon.policy import rules
from addon.policy.virtual_keys import VirtualKey


class HeadersGate:
    __slots__ = ("live", "gated", "pending")

    def __init__(self, live) -> None:
        self.live = live  # its `store`: what peek() reads
        # requests of limited keys past their headers, not yet admitted or refused (bodies being
        # read): flow id -> key fingerprint, and per fingerprint how many
        self.gated: dict[str, str] = {}
        self.pending: dict[str, int] = {}

    def screen(self, flow_id: str, key: VirtualKey, size: int) -> None:
        """At the request's headers (`size`: its declared body, 0 if unknown): raise what its
        key's limits refuse whatever the body, or the 503 of too many bytes held; else a request
        of a limited key counts as pending until `after` or `leave`."""
        limited = key.policy.limits is not None
        if limited:
            rules.admit_early(key, self.live.store, time.time(), self.pending.get(key.fingerprint, 0))
        if size and held.would_pass(size):  # the process holds too many request bytes: not this one too
            raise held.busy()
        if limited:
            self.gated[flow_id] = key.fingerprint
            self.pending[key.fingerprint] = self.pending.get(key.fingerprint, 0) + 1

    def after(self, flow, taking: Awaitable[None] | None) -> Awaitable[None] | None:
        """The request hook's result: a request still waiting for its admission (`taking`, the
        store asked over the network) stays pending until it has its answer."""
        if taking is None or flow.id not in self.gated:
            self.leave(flow)
            return taking
        return self._leave_after(flow, taking)

    async def _leave_after(self, flow, taking: Awaitable[None]) -> None:
        try:
            await taking
        finally:
            self.leave(flow)

    def leave(self, flow) -> None:
        """The request was admitted (now counted by the store) or refused, or it ended: it no
        longer counts as pending for its key."""
        fingerprint = self.gated.pop(flow.id, None)
        if fingerprint is not None:
            left = self.pending[fingerprint] - 1
            if left:
                self.pending[fingerprint] = left
            else:
                del self.pending[fingerprint]
