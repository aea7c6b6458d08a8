"""The gateway's addons as one mitmproxy addon, their hooks called in a fixed order.

mitmproxy hands every event to every addon object it knows: per request that is eight events
(four flow hooks, each followed by an `update`) walked over each addon, and an argument list
built per hook called. Seven addon objects cost about 25 us of CPU per request more than this
one (bench/ab.py, in the running proxy). Here mitmproxy sees one object, and which concern runs
when is spelled out once, in `AddonChain(...)`.

Each part stays an ordinary mitmproxy addon (tests load them one by one). Lifecycle hooks go to
every part that has them, unguarded, so `configure` can still reject an option with
OptionsError. A flow hook that raises is logged and the parts after it still run: mitmproxy
itself would skip them, and a skipped Gateway.request would leave a request unrouted.
A part's flow hook may return an awaitable (Gateway.request does when its store is asked over
the network): the chain then returns a coroutine that awaits it and runs the later parts after
it, and mitmproxy holds the flow until that is done. A part that answers at once costs nothing
more. A part whose `active` attribute is False (Recorder without a record_file) gets no flow hooks
until a later `configure` makes it active: an idle part's calls still cost in the proxy.

Once everything is running, what start-up made (mitmproxy's and this addon's modules and tables,
the redis client) is moved out of the garbage collector's sight (`gc.freeze()`): it lives as long
as the process, and every full collection (every few hundred requests under load) walked all of
it. Measured at 64 connections: full collections cost about 100 us of CPU per request before,
about 25 after (about 170 and 20 with RedisStore, whose client adds to that heap).
"""

from __future__ import annotations

import asyncio
import gc
import logging

log = logging.getLogger("gateway")

# stopping: the gateway's own (hooks/drain.py), awaited before any part's `done`
LIFECYCLE_HOOKS = ("load", "configure", "running", "stopping", "done")
# attempt_failed: the gateway's own (hooks/patches/attempts.py), an upstream attempt that may be retried
FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error", "attempt_failed")


class AddonChain:
    def __init__(self, *parts) -> None:
        self.parts = parts
        self.hooks = {name: self._bound(name, parts) for name in LIFECYCLE_HOOKS}
        self._bind_flow_hooks()
        # mitmproxy looks hooks up by name on every event: offer only those some part has
        for name in FLOW_HOOKS:
            if not self._bound(name, parts):
                setattr(self, name, None)

    def _bind_flow_hooks(self) -> None:
        active = [part for part in self.parts if getattr(part, "active", True)]
        for name in FLOW_HOOKS:
            self.hooks[name] = self._bound(name, active)

    @staticmethod
    def _bound(name: str, parts) -> tuple:
        return tuple(getattr(part, name) for part in parts if callable(getattr(part, name, None)))

    # --- lifecycle: every part, in order; errors propagate as mitmproxy expects ---------

    def load(self, loader) -> None:
        for hook in self.hooks["load"]:
            hook(loader)

    def configure(self, updated) -> None:
        for hook in self.hooks["configure"]:
            hook(updated)
        self._bind_flow_hooks()

    def running(self) -> None:
        for hook in self.hooks["running"]:
            hook()
        gc.collect()  # (start-up's garbage is not kept forever)
        gc.freeze()

    def done(self):
        """First what a part's `stopping` returns, awaited (Drain: at a shutdown, the connections
        still open are closed while every part can still see their flows end). Then every part's
        `done`; one may return a coroutine (StoreChoice: RedisStore's close, which sends what the
        accounting's `done` counted after it). Those run once every part's `done` has, in one
        task that mitmproxy awaits before its event loop ends (it cancels what is left)."""
        stopping = [c for c in (hook() for hook in self.hooks["stopping"]) if c is not None]
        if not stopping:
            return self._done()
        try:
            return asyncio.get_running_loop().create_task(self._stop_then_done(stopping))
        except RuntimeError:  # no event loop any more: no connection can be served either
            for c in stopping:
                c.close()
            return self._done()

    async def _stop_then_done(self, stopping: list) -> None:
        await _in_order(stopping)
        closing = self._done()
        if closing is not None:
            await closing

    def _done(self):
        closing = [c for c in (hook() for hook in self.hooks["done"]) if c is not None]
        if not closing:
            return None
        try:
            return asyncio.get_running_loop().create_task(_in_order(closing))
        except RuntimeError:  # no event loop any more: nothing can be sent
            for c in closing:
                c.close()
            return None

    # --- flow hooks ----------------------------------------------------------------------

    def requestheaders(self, flow):
        return self._call("requestheaders", flow)

    def request(self, flow):
        return self._call("request", flow)

    def responseheaders(self, flow):
        return self._call("responseheaders", flow)

    def response(self, flow):
        return self._call("response", flow)

    def error(self, flow):
        return self._call("error", flow)

    def attempt_failed(self, flow):
        return self._call("attempt_failed", flow)

    def _call(self, name: str, flow):
        hooks = self.hooks[name]
        for hook in hooks:
            try:
                pending = hook(flow)
            except Exception:
                log.exception("gateway: %s hook of %s failed", name, type(hook.__self__).__name__)
                continue
            if pending is not None:  # an async part (the store asked over the network): the rest wait for it
                return self._call_after(name, hooks[hooks.index(hook) + 1:], pending, flow)
        return None

    async def _call_after(self, name: str, rest: tuple, pending, flow) -> None:
        """mitmproxy awaits what a hook returns, and holds the flow until then."""
        try:
            await pending
        except Exception:
            log.exception("gateway: %s hook failed", name)
        for hook in rest:
            try:
                pending = hook(flow)
                if pending is not None:
                    await pending
            except Exception:
                log.exception("gateway: %s hook of %s failed", name, type(hook.__self__).__name__)


async def _in_order(coroutines: list) -> None:
    for c in coroutines:
        try:
            await c
        except Exception:
            log.exception("gateway: stopping failed")
