"""A provider connection reset at once after it opened: a connect error, not a flow that hangs.

mitmproxy 12.3 opens a server connection in `ConnectionHandler.open_connection`, then reads the
socket's peer name and asserts that it has one. When the provider (or a load balancer in front of
it) resets the connection right after accepting it, the socket has no peer name any more, the
assertion fails inside that task, and nothing ever tells the HTTP layer: the request waits
forever (upstream_timeout cannot cut a connection whose task is gone). Seen here in about 1 of
40 requests to a server that resets every connection on accept.

This wraps `open_connection`: when it fails that way, the connection is reported to the layer as
one that could not be opened ("connection reset by the server"), so the client gets the
gateway's 502 or, for a key with several targets, the next target (hooks/patches/attempts.py).
"""

from __future__ import annotations

import logging

from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events, server

from addon.wire.patching import Patches

log = logging.getLogger("gateway")

RESET = "connection reset by the server"


async def _open_connection(self, command) -> None:
    try:
        await _handler.original["open_connection"](self, command)
    except AssertionError:
        connection = command.connection
        if connection.peername is not None or connection.error is not None:
            raise
        log.info("gateway: the connection to %s:%s was reset as it opened", *connection.address[:2])
        connection.error = RESET
        connection.state = ConnectionState.CLOSED
        io = self.transports.pop(connection, None)
        if io is not None and io.writer is not None:
            io.writer.close()
        await self.server_event(events.OpenConnectionCompleted(command, RESET))


_handler = Patches(server.ConnectionHandler, open_connection=_open_connection)


class ConnectReset:
    """Installs the wrapper for the life of the addon."""

    def load(self, loader) -> None:
        _handler.install()

    def done(self) -> None:
        _handler.undo()
