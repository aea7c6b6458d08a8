"""A stop that lets requests in flight finish: option `drain_s` (run.sh: GATEWAY_DRAIN_S).

mitmdump stops at SIGTERM or Ctrl-C at once and cuts every request in flight, a stream
mid-answer included. With `drain_s` above 0 the first SIGTERM or SIGINT instead:

1. closes the listening sockets: new connections are refused, so a load balancer or a
   Kubernetes Service moves on (connections already open stay, and are served);
2. waits until no request the gateway forwarded is in flight (`Live.in_flight`, hooks/live.py; a stream
   leaves it when it ends), for at most `drain_s` seconds;
3. shuts down as mitmproxy would have: the usage ledger writes its pending rows in `done`.

A second signal shuts down at once. No flow hook: nothing is added to a request's path.

Whatever the stop (a signal, drained or not; mitmweb's quit), the connections still open when
mitmproxy shuts down (idle keep-alive clients, what every SDK and HAProxy keep; half-sent
requests; requests cut by a stop without drain) are closed by `stopping`, before any part's
`done` (hooks/chain.py): each ends as a client hang-up does, its flows seen by every part
(the ledger counts what was cut) while the parts can still see them. Left open, mitmproxy's
event loop would cancel their tasks after `done`: a traceback per connection (Python 3.12's
asyncio logs each cancelled connection task), and events reaching parts already done.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from mitmproxy import ctx, exceptions

log = logging.getLogger("gateway")

POLL = 0.05  # seconds between two looks at the requests in flight while draining
CLOSE_S = 5.0  # at most this long for the connections still open at a stop to end


def requests(n: int) -> str:
    return f"{n} request{'' if n == 1 else 's'}"


class Drain:
    def __init__(self, live) -> None:
        self.live = live  # its `in_flight`: the forwarded requests not ended yet
        self.seconds = 0.0
        self.task: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(  # a str: mitmproxy options cannot be floats
            "drain_s", str, "0",
            "At SIGTERM or Ctrl-C: stop taking connections and let requests in flight (streams) "
            "finish, for at most this many seconds, then stop. 0: stop at once. A second signal stops at once.",
        )

    def configure(self, updated) -> None:
        if "drain_s" not in updated:
            return
        value = ctx.options.drain_s
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise exceptions.OptionsError(f"drain_s must be a number of seconds (0 or more), not {value!r}")
        self.seconds = seconds

    def running(self) -> None:
        if self.seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:  # replaces mitmproxy's own handler (tools/main.py), set before `running`
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError, ValueError):  # no Unix signals here: mitmproxy's stays
                return

    def stopping(self):
        """Before any part's `done` (hooks/chain.py): at a shutdown, every connection still open is
        closed; None when there is none (or this is a script reload: connections stay)."""
        master = getattr(ctx, "master", None)
        proxyserver = master.addons.get("proxyserver") if master is not None else None
        if proxyserver is None or not master.should_exit.is_set() or not proxyserver.connections:
            return None
        return close_connections(proxyserver)

    def stop(self) -> None:
        if self.task is not None:  # the second signal
            log.info("gateway: stopping now")
            ctx.master.shutdown()
            return
        self.task = asyncio.get_running_loop().create_task(self.drain(self.seconds))

    async def drain(self, seconds: float) -> None:
        try:
            proxyserver = ctx.master.addons.get("proxyserver")
            if proxyserver is not None:
                await proxyserver.servers.update([])  # listening sockets closed; open connections stay
            in_flight = self.live.in_flight
            if in_flight:
                log.info("gateway: stopping: no new connections; waiting up to %g s for %s in flight",
                         seconds, requests(len(in_flight)))
            else:
                log.info("gateway: stopping: no new connections, nothing in flight")
            deadline = time.monotonic() + seconds
            while in_flight and time.monotonic() < deadline:
                await asyncio.sleep(POLL)
            if in_flight:
                n = len(in_flight)
                log.warning(
                    "gateway: %s still in flight after %g s %s cut", requests(n), seconds, "is" if n == 1 else "are"
                )
        except Exception:
            log.exception("gateway: could not drain; stopping now")
        finally:
            ctx.master.shutdown()


async def close_connections(proxyserver, timeout: float = CLOSE_S) -> None:
    """Stop listening, then close every client connection still open the way mitmproxy ends one
    whose client hung up (its task cancelled: the layers see the connection closed, the flows on
    it end with an error, its provider connections are closed), and wait until mitmproxy has
    finished each (at most `timeout` seconds)."""
    try:
        await proxyserver.servers.update([])  # no new connection meanwhile
    except Exception:
        log.exception("gateway: could not stop listening")
    closed: set[asyncio.Task] = set()
    deadline = time.monotonic() + timeout
    while proxyserver.connections and time.monotonic() < deadline:
        for handler in list(proxyserver.connections.values()):
            io = handler.transports.get(handler.client)
            task = io.handler if io is not None else None  # None: still in its client_connected hook
            if task is not None and task not in closed:
                task.cancel()
                closed.add(task)
        await asyncio.sleep(0.01)
    if proxyserver.connections:
        n = len(proxyserver.connections)
        log.warning(
            "gateway: %d connection%s still open after %g s; stopping anyway", n, "" if n == 1 else "s", timeout
        )
