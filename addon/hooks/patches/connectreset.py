"""A provider connection task that ends without telling the HTTP layer: a connect error, not a
flow that hangs.

mitmproxy 12.3 opens a server connection in `ConnectionHandler.open_connection`, then reads the
socket's peer name and asserts that it has one. When the provider (or a load balancer in front of
it) resets the connection right after accepting it, the socket has no peer name any more, the
assertion fails inside that task, and nothing ever tells the HTTP layer: the request waits
forever (upstream_timeout cannot cut a connection whose task is gone). Seen here in about 1 of
40 requests to a server that resets every connection on accept.

This wraps `open_connection`: when it fails that way, the connection is reported to the layer as
one that could not be opened ("connection reset by the server"), so the client gets the
gateway's 502 or, for a key with several targets, the next target (hooks/patches/attempts.py).

The same for a connection task cancelled (upstream_timeout stops the connection a flow waits for,
hooks/timeouts.py) where mitmproxy does not report it: while it waits for the per-address
connection slot or runs the server_connect hook, before its connect (the connect itself mitmproxy
reports), and while the server_connected hook runs, between the connect and its report. Once the
connection is open the task reports its end itself (ConnectionClosed). A connect that failed or was
cancelled also leaves its entry in the handler's transports, with no socket: taken out.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events, server

from addon.wire.patching import Patches

log = logging.getLogger("gateway")

RESET = "connection reset by the server"
CANCELLED = "connection cancelled"  # mitmproxy's words for a connect it cancelled


async def _open_connection(self, command) -> None:
    try:
        await _handler.original["open_connection"](self, command)
    except AssertionError:
        connection = command.connection
        if connection.peername is not None or connection.error is not None:
            raise
        log.info("gateway: the connection to %s:%s was reset as it opened", *connection.address[:2])
        await _report_failed(self, command, RESET)
    except asyncio.CancelledError:
        connection = command.connection
        io = self.transports.get(connection)
        if io is not None and io.handler is asyncio.current_task():  # not through handle_connection
            if connection.error is None:  # nor reported by mitmproxy
                await _report_failed(self, command, CANCELLED)
            elif io.writer is None:
                del self.transports[connection]  # its connect failed: no socket left to close
        raise


async def _report_failed(handler, command, error: str) -> None:
    """Tell the layer that `command`'s connection could not be opened, and close what it had."""
    connection = command.connection
    connection.error = error
    connection.state = ConnectionState.CLOSED
    io = handler.transports.pop(connection, None)
    if io is not None and io.writer is not None:
        io.writer.close()
    await handler.server_event(events.OpenConnectionCompleted(command, error))


_handler = Patches(server.ConnectionHandler, open_connection=_open_connection)


class ConnectReset:
    """Installs the wrapper for the life of the addon."""

    def load(self, loader) -> None:
        _handler.install()

    def done(self) -> None:
        _handler.undo()
