"""hooks/patches/: a patch of mitmproxy taken out under a live connection leaves it working.

An HTTP/1 connection keeps its current reader as a bound method (`Http1Server.state`): the
gateway's wrapper, once the patch was installed when the connection opened. Taking the patch out
(a stop's `done`, a script reload) while such a connection is open must leave that wrapper able
to reach mitmproxy's own reader: it used to find it gone (`KeyError: 'read_headers'`, a
"mitmproxy has crashed!" traceback per open connection at every Ctrl-C)."""

from __future__ import annotations

import importlib
import pkgutil

from mitmproxy import options
from mitmproxy.connection import Client
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import RequestHeaders, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

import addon.hooks.patches as patches_package
from addon.wire.patching import Patches
from addon.hooks.patches import limits as limits_module
from addon.hooks.patches.limits import RequestLimits


def every_patch() -> list[Patches]:
    found = []
    for info in pkgutil.iter_modules(patches_package.__path__):
        module = importlib.import_module(f"addon.hooks.patches.{info.name}")
        found += [value for value in vars(module).values() if isinstance(value, Patches)]
    return found


def test_a_connection_opened_under_the_patch_reads_on_after_it_is_taken_out():
    limits = RequestLimits()
    client = Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080), timestamp_start=0)
    limits.load(options.Options())  # (the loader only needs add_option)
    try:
        server = _http1.Http1Server(Context(client, options.Options()))
        list(server.handle_event(events.Start()))
        assert server.state.__func__ is limits_module._read_headers  # the gateway's reader, bound
    finally:
        limits.done()  # the stop's done, with this connection still open
    assert _http1.Http1Server.read_headers.__module__.startswith("mitmproxy")  # mitmproxy's own is back
    commands = list(server.handle_event(events.DataReceived(client, b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")))
    received = [c.event for c in commands if isinstance(c, ReceiveHttp)]
    assert received and isinstance(received[0], RequestHeaders) and received[0].request.path == "/health"


def test_every_patch_is_taken_out_whole_and_keeps_what_it_wraps():
    patches = every_patch()
    assert len(patches) >= 7  # attempts, connectreset, errorpages (3), limits (2), wirekeys (2)
    for p in patches:
        before = {name: getattr(p.owner, name) for name in p.wrappers}
        p.install()
        assert p.installed()
        p.undo()
        for name in p.wrappers:
            assert getattr(p.owner, name) is before[name] or before[name] is p.wrappers[name]
            assert p.original[name] is not p.wrappers[name]  # what a wrapper still open calls
