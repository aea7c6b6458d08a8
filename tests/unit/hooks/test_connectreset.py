"""hooks/patches/connectreset.py: a provider connection reset as it opened is a connect error, not a hang.

The race itself (the socket reset between connect and getpeername) happens about once in 300
connections to a server that resets on accept, so it is not reproduced here: mitmproxy's task
is stood in for by one that fails the way it does (its peer-name assertion), and the test checks
what the HTTP layer is told."""

from __future__ import annotations

import asyncio
import types

import pytest
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.proxy import commands, events

from addon.hooks.patches import connectreset
class Handler:
    """The parts of mitmproxy's ConnectionHandler the wrapper uses."""

    def __init__(self) -> None:
        self.transports: dict = {}
        self.events: list = []

    async def server_event(self, event) -> None:
        self.events.append(event)


async def reset_as_it_opened(handler, command):
    command.connection.state = ConnectionState.OPEN
    assert command.connection.peername  # what mitmproxy 12.3 asserts, the socket's peer name gone


def test_a_connection_reset_as_it_opened_is_reported_as_a_connect_error(monkeypatch):
    monkeypatch.setitem(connectreset._handler.original, "open_connection", reset_as_it_opened)
    handler, server = Handler(), Server(address=("127.0.0.1", 9))
    command = commands.OpenConnection(server)
    handler.transports[server] = types.SimpleNamespace(writer=None, handler=None)
    asyncio.run(connectreset._open_connection(handler, command))
    [completed] = handler.events
    assert isinstance(completed, events.OpenConnectionCompleted)
    assert completed.command is command and completed.reply == connectreset.RESET
    assert server.error == connectreset.RESET and server.state is ConnectionState.CLOSED
    assert server not in handler.transports


def test_other_assertion_failures_are_not_hidden(monkeypatch):
    async def also_failing(handler, command):
        command.connection.peername = ("127.0.0.1", 9)  # connected, and then something else failed
        raise AssertionError("something else")

    monkeypatch.setitem(connectreset._handler.original, "open_connection", also_failing)
    handler = Handler()
    with pytest.raises(AssertionError, match="something else"):
        asyncio.run(connectreset._open_connection(handler, commands.OpenConnection(Server(address=("127.0.0.1", 9)))))
    assert handler.events == []


def test_the_installed_mitmproxy_still_fails_this_way():
    """If a mitmproxy release stops asserting the peer name, this wrapper can go."""
    import inspect

    from mitmproxy.proxy import server

    original = connectreset._handler.original.get("open_connection", server.ConnectionHandler.open_connection)
    assert "assert command.connection.peername" in inspect.getsource(original)


# -- a connection task cancelled (upstream_timeout stops the connection a flow waits for) --------
# mitmproxy's own open_connection and handle_connection run here, in a handler whose layer is a
# list of the events it would be told: what matters is that it hears the end of every connection.

import collections
import socket

from mitmproxy.connection import Client
from mitmproxy.proxy import server, server_hooks


class Recording(server.ConnectionHandler):
    """mitmproxy's ConnectionHandler without a layer: events are recorded, hooks may block."""

    def __init__(self, blocking_hook: type | None = None) -> None:  # (not the base's: no layer)
        self.client = Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080), timestamp_start=0)
        self.transports = {}
        self.max_conns = collections.defaultdict(lambda: asyncio.Semaphore(5))
        self._server_event_lock = asyncio.Lock()
        self._drain_lock = asyncio.Lock()
        self.events: list = []
        self.blocking_hook = blocking_hook

    async def handle_hook(self, hook) -> None:
        if isinstance(hook, self.blocking_hook or ()):
            await asyncio.Event().wait()

    async def server_event(self, event) -> None:
        self.events.append(event)


@pytest.fixture
def installed():
    """The wrapper around mitmproxy's own open_connection, as the gateway runs it."""
    connectreset._handler.install()
    yield
    connectreset._handler.undo()


def listening(backlog: int = 8) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


async def cancel_while(handler: Recording, server_: Server, stage) -> BaseException | None:
    """Open `server_` as mitmproxy does (its task in the transports), wait for `stage()`, cancel."""
    command = commands.OpenConnection(server_)
    task = asyncio.get_running_loop().create_task(connectreset._open_connection(handler, command))
    handler.transports[server_] = server.ConnectionIO(handler=task)  # as ConnectionHandler.server_event does
    for _ in range(500):
        if stage():
            break
        await asyncio.sleep(0.01)
    assert stage(), "the task did not get there"
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "the task did not end"
    return command


def told(handler: Recording, command) -> list:
    return [e.reply for e in handler.events if isinstance(e, events.OpenConnectionCompleted) and e.command is command]


def test_a_connection_cancelled_waiting_for_its_slot_is_reported_as_not_opened(installed):
    """mitmproxy opens at most 5 connections to an address per client connection at a time: a
    sixth waits, and cancelled there its task ends without a word to the layer (the flow hangs)."""
    async def run():
        handler = Recording()
        server_ = Server(address=("127.0.0.1", 9))
        handler.max_conns[server_.address] = asyncio.Semaphore(0)  # no slot comes free
        command = await cancel_while(handler, server_, lambda: handler.max_conns[server_.address]._waiters)
        assert told(handler, command) == [connectreset.CANCELLED]
        assert server_.error == connectreset.CANCELLED and server_ not in handler.transports
    asyncio.run(run())


def test_a_connection_cancelled_in_the_server_connected_hook_is_reported_and_closed(installed):
    async def run():
        handler = Recording(blocking_hook=server_hooks.ServerConnectedHook)
        provider = listening()
        server_ = Server(address=provider.getsockname())
        command = await cancel_while(handler, server_, lambda: server_.peername is not None)
        assert told(handler, command) == [connectreset.CANCELLED]
        assert server_ not in handler.transports and server_.state is ConnectionState.CLOSED
        accepted, _ = provider.accept()
        accepted.settimeout(5)
        assert accepted.recv(10) == b""  # the socket the gateway had opened is closed
        accepted.close()
        provider.close()
    asyncio.run(run())


def test_a_connect_cancelled_as_it_waits_for_the_syn_ack_is_reported_once_and_forgotten(installed):
    async def run():
        handler = Recording()
        provider = listening(0)
        fillers = [socket.socket() for _ in range(4)]  # a full accept queue: the next SYN is dropped
        for filler in fillers:
            filler.setblocking(False)
            try:
                filler.connect(provider.getsockname())
            except BlockingIOError:
                pass
        server_ = Server(address=provider.getsockname())
        await asyncio.sleep(0.1)
        command = await cancel_while(handler, server_, lambda: server_.timestamp_start is not None)
        assert told(handler, command) == ["connection cancelled"]  # mitmproxy's own report, and no other
        assert server_ not in handler.transports  # the entry it left, with no socket, is gone
        for s in [provider, *fillers]:
            s.close()
    asyncio.run(run())


def test_an_open_connection_cancelled_is_closed_by_mitmproxy_alone(installed):
    """Once open (a TLS handshake under way on it), the task tells the layer itself: closed."""
    async def run():
        handler = Recording()
        provider = listening()
        server_ = Server(address=provider.getsockname())
        command = await cancel_while(handler, server_, lambda: any(isinstance(e, events.OpenConnectionCompleted)
                                                                   for e in handler.events))
        assert told(handler, command) == [None]
        assert [type(e) for e in handler.events] == [events.OpenConnectionCompleted, events.ConnectionClosed]
        assert server_ not in handler.transports
        provider.close()
    asyncio.run(run())
