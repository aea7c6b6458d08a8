"""What the gateway's parts share while it runs: one small holder, handed to each part that needs
it when addon/gateway.py builds the list of parts (no part sets another's attributes).

- `keys`: the KeyStore in force. The Gateway loads it at start-up; KeysReloader replaces it
  whole when the file changes (never mutated: a request keeps the one it started with).
- `store`: the UsageStore (limits, budgets, cooldowns, owners). StoreChoice puts RedisStore in
  its place while the options are configured, before any request; it then stays.
- `in_flight`: the ids of the flows forwarded to a provider and not ended yet (Drain waits for
  them at a stop).
"""

from __future__ import annotations

from addon.policy.virtual_keys import KeyStore
from addon.policy.memory_store import MemoryStore
from addon.policy.store import UsageStore


class Live:
    __slots__ = ("keys", "store", "in_flight")

    def __init__(self, store: UsageStore | None = None, keys: KeyStore | None = None) -> None:
        self.keys = keys
        self.store: UsageStore = store if store is not None else MemoryStore()
        self.in_flight: set[str] = set()
