"""Provider timeout: a routed request that has no response headers after `upstream_timeout`
seconds is abandoned and the client gets an OpenAI-shaped 504.

mitmproxy itself only has an inactivity timeout (tcp_timeout, 10 min by default). This addon
cancels the flow's server connection task; mitmproxy then reports the flow as failed and
errorpages renders the 504 (it cannot see the flow, so the error hook hands it the message).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, exceptions, http

from addon.wire import errorpages

log = logging.getLogger("gateway")


class UpstreamTimeout:
    def __init__(self) -> None:
        # flow id -> (deadline, flow), in arrival order, which is deadline order: one sweep task
        # instead of a timer per request (a TimerHandle costs more than a dict entry)
        self.waiting: dict[str, tuple[float, http.HTTPFlow]] = {}
        self.expired: set[str] = set()
        self.seconds = 600.0
        self.sweeper: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "upstream_timeout", str, "600",
            "Seconds a provider may take to start answering a routed request before the "
            "gateway gives up and answers 504. Streams are not cut once they have started.",
        )

    def configure(self, updated) -> None:
        if "upstream_timeout" in updated:
            try:
                seconds = float(ctx.options.upstream_timeout)
            except ValueError:
                seconds = 0
            if not seconds > 0:
                raise exceptions.OptionsError(
                    f"upstream_timeout must be a positive number of seconds, not {ctx.options.upstream_timeout!r}"
                )
            self.seconds = seconds

    def running(self) -> None:
        self.sweeper = asyncio.get_running_loop().create_task(self.sweep())

    def done(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.seconds / 4))
            now = time.monotonic()
            while self.waiting:
                flow_id, (deadline, flow) = next(iter(self.waiting.items()))
                if deadline > now:
                    break  # (after a runtime change of upstream_timeout, order is approximate)
                del self.waiting[flow_id]
                self._expire(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or "provider" not in flow.metadata.get("gateway", {}):
            return
        self.waiting[flow.id] = (time.monotonic() + self.seconds, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)
        if flow.id in self.expired:
            self.expired.discard(flow.id)
            flow.metadata.setdefault("gateway", {})["timeout"] = True
            if flow.error:
                errorpages.answer_next_as_timeout(
                    flow.error.msg, f"provider did not answer within {self.seconds:g}s"
                )

    def _cancel(self, flow: http.HTTPFlow) -> None:
        self.waiting.pop(flow.id, None)

    def _expire(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
        io = handler.transports.get(flow.server_conn) if handler else None
        if io is None or io.handler is None:
            return  # not connected through a transport we can stop; tcp_timeout still applies
        log.warning("gateway: %s timed out after %gs", flow.request.pretty_url, self.seconds)
        self.expired.add(flow.id)
        io.handler.cancel()
