"""hooks/webguard.py without a running mitmweb: every route of mitmweb's API is named in the guard,
and one it does not name (a later mitmproxy's) is refused whole. tests/e2e/test_mitmweb_guard.py
drives the real API."""

from __future__ import annotations

from mitmproxy.tools.web import app

from addon.hooks import webguard

# mitmweb's handlers the guard refuses whole (ROUTES names those it allows something on)
REFUSED_WHOLE = {"DumpFlows", "DuplicateFlow", "RevertFlow", "SaveOptions", "ProcessList", "ProcessImage"}


def test_every_route_of_mitmweb_is_named():
    names = {handler.__name__ for _, handler, *_ in app.handlers}
    named = (set(webguard.ROUTES) - {"StaticFileHandler"}) | REFUSED_WHOLE  # tornado adds the static files
    assert names == named, names ^ named


def test_a_route_nobody_named_is_refused_whole_and_a_guard_is_not_guarded_twice():
    class LaterFeature(app.RequestHandler):
        def get(self):
            pass

        def post(self):
            pass

    guard = webguard.guarded(LaterFeature)
    assert issubclass(guard, LaterFeature) and {"get", "post"} <= set(vars(guard))
    again = webguard.guarded(guard)  # a script reload guards mitmweb's class, not the guard
    assert again.__mro__[1] is LaterFeature
    assert webguard.guarded(app.Flows) is app.Flows  # nothing refused: left as it is
    assert webguard.guarded(app.FlowHandler).__name__ == "GuardedFlowHandler"  # PUT checks its fields


def test_the_allow_lists_hold_no_command_that_writes_runs_or_exports():
    for name in ("cut.save", "save.file", "export.file", "script.run", "set", "options.load", "view.flows.load",
                 "replay.server", "replay.client.file", "browser.start", "flow.set", "eventstore.clear"):
        assert name not in webguard.ALLOWED_COMMANDS
    assert not {"keys_file", "record_file", "scripts", "confdir", "view_filter", "intercept"} & webguard.VIEW_OPTIONS
