"""mitmweb is for looking: what a logged-in mitmweb user may do, and nothing more.

mitmweb's HTTP API hands a logged-in user the whole of mitmproxy: `POST /commands/<name>` runs
any registered command (`cut.save` writes a request body to a file of the user's choosing,
`script.run` then runs that file inside the gateway, with every key in reach), `PUT /options`
sets any option (`keys_file`, `record_file`, `scripts`, `confdir`...), `POST /flows/dump` loads
flows, `PUT /flows/<id>` rewrites a request. Refusing the known-bad ones leaves every command a
later mitmproxy adds; so everything is refused that is not on these allow-lists:

- commands that list, view, filter, mark, comment and delete flows, replay a flow through the
  gateway (the replay is routed afresh, with every check: recording/recorder.py `Snapshot`), or
  only read a count;
- options that change how the UI shows flows (`VIEW_OPTIONS`);
- routes and methods of mitmweb's API that do the same; `PUT /flows/<id>` only for `marked` and
  `comment`.

A refusal is a 403 with a JSON `error`, and one log line naming what was refused. It comes after
mitmweb's own login check: a client without the password gets mitmweb's 403 and no log line.

The guard swaps the handler classes in mitmweb's tornado routing table for subclasses whose
refused methods answer 403 (`install`, called by OptionGuard once the master exists and before
mitmweb listens). mitmdump has no web app: nothing to do there.
"""

from __future__ import annotations

import json
import logging

from addon.hooks.accesslog import value

log = logging.getLogger("gateway")

# commands a mitmweb user may run (mitmproxy 12); every other one is refused
ALLOWED_COMMANDS = frozenset({
    # look at flows
    "view.properties.inbounds", "view.properties.length", "view.properties.marked",
    "view.focus.go", "view.focus.next", "view.focus.prev", "view.settings.getval",
    # order and filter what is shown (the order is a view option; the filter a per-UI one)
    "view.order", "view.order.options", "view.order.set", "view.order.reverse", "view.properties.marked.toggle",
    # mark and comment
    "flow.mark", "flow.mark.toggle", "flow.comment",
    # delete; end a flow in flight; let an intercepted one go (intercept is set at start-up only)
    "view.flows.remove", "view.clear", "view.clear_unmarked", "flow.kill", "flow.resume",
    # replay through the gateway, and read-only counts
    "replay.client", "replay.client.count", "replay.client.stop",
    "proxyserver.active_connections", "readfile.reading",
})
# options a mitmweb user may change: how flows are shown, nothing else
VIEW_OPTIONS = frozenset({
    "view_order", "view_order_reversed", "web_columns", "web_theme", "showhost", "content_view_lines_cutoff",
})
# fields of PUT /flows/<id> a user may set (the rest rewrites a request or response)
FLOW_FIELDS = frozenset({"marked", "comment"})
# mitmweb's API (mitmproxy/tools/web/app.py handlers) -> the HTTP methods allowed on it. A
# handler not named here (a route a later mitmproxy adds) is refused whole.
ROUTES: dict[str, frozenset[str]] = {
    "IndexHandler": frozenset({"GET", "POST"}),  # POST: the login form (it renders the page)
    "FilterHelp": frozenset({"GET"}),
    "ClientConnection": frozenset({"GET"}),  # the /updates websocket: flow events, per-UI filters
    "Commands": frozenset({"GET"}),
    "ExecuteCommand": frozenset({"POST"}),  # ALLOWED_COMMANDS only
    "Events": frozenset({"GET"}),
    "Flows": frozenset({"GET"}),
    "ClearAll": frozenset({"POST"}),
    "ResumeFlows": frozenset({"POST"}),
    "KillFlows": frozenset({"POST"}),
    "FlowHandler": frozenset({"DELETE", "PUT"}),  # PUT: FLOW_FIELDS only
    "ResumeFlow": frozenset({"POST"}),
    "KillFlow": frozenset({"POST"}),
    "ReplayFlow": frozenset({"POST"}),
    "FlowContent": frozenset({"GET"}),
    "FlowContentView": frozenset({"GET"}),
    "Options": frozenset({"GET", "PUT"}),  # PUT: VIEW_OPTIONS only
    "State": frozenset({"GET"}),
    "StaticFileHandler": frozenset({"GET", "HEAD"}),
    # refused whole: DumpFlows (GET exports every flow, POST loads flows), DuplicateFlow,
    # RevertFlow, SaveOptions, ProcessList and ProcessImage (the machine's programs, a file by path)
}
WHY = "mitmweb is for looking at flows: it may list, view, filter, mark, comment, delete and replay them (docs/hardening.md)"


def refuse(handler, what: str) -> None:
    """403 and one log line (after mitmweb's login check, which wraps every handler method)."""
    log.warning("gateway: mitmweb refused %s from %s: %s", what, handler.request.remote_ip, WHY)
    handler._gateway_refused = True  # (tornado's own "403 POST /commands/..." line would be a second)
    handler.set_status(403)
    handler.set_header("Content-Type", "application/json")
    handler.finish(json.dumps({"error": f"refused: {what}. {WHY}"}))


def _refused_method(method: str):
    def refused(self, *args, **kwargs):
        refuse(self, f"{method} {value(self.request.path)}")
    refused.__name__ = method.lower()
    return refused


def _body(handler) -> object:
    try:
        return json.loads(handler.request.body or b"null")
    except ValueError:
        return None


def _execute_command(original):
    def post(self, cmd: str):
        if cmd not in ALLOWED_COMMANDS:
            return refuse(self, f"command {value(cmd)}")
        return original(self, cmd)
    return post


def _put_options(original):
    def put(self):
        update = _body(self)
        names = sorted(update) if isinstance(update, dict) else []
        refused = [n for n in names if n not in VIEW_OPTIONS]
        if refused or not names:
            return refuse(self, "options " + (",".join(value(n) for n in refused) or "(none named)"))
        return original(self)
    return put


def _put_flow(original):
    def put(self, flow_id):
        update = _body(self)
        fields = sorted(update) if isinstance(update, dict) else []
        refused = [f for f in fields if f not in FLOW_FIELDS]
        if refused or not fields:
            return refuse(self, f"flow edit {','.join(value(f) for f in refused) or '(no field)'}")
        return original(self, flow_id)
    return put


# handler methods that check their request before mitmweb's own method runs
CHECKED = {("ExecuteCommand", "POST"): _execute_command, ("Options", "PUT"): _put_options,
           ("FlowHandler", "PUT"): _put_flow}


def guarded(target: type) -> type:
    """A subclass of mitmweb's handler `target` that refuses what ROUTES does not allow (mitmweb's
    login check wraps the new methods too: its __init_subclass__ does that for every handler)."""
    import tornado.web

    original = getattr(target, "_gateway_original", target)
    name = original.__name__
    allowed = ROUTES.get(name, frozenset())
    methods = {}
    for method in original.SUPPORTED_METHODS:
        impl = getattr(original, method.lower(), None)
        if impl is None or impl is tornado.web.RequestHandler._unimplemented_method:
            continue
        if method not in allowed:
            methods[method.lower()] = _refused_method(method)
        elif (name, method) in CHECKED:
            methods[method.lower()] = CHECKED[(name, method)](impl)
    if not methods:
        return original

    def _log(self) -> None:
        """tornado's per-request access line, except for a refusal: that has its own line."""
        if not getattr(self, "_gateway_refused", False):
            original._log(self)

    return type(f"Guarded{name}", (original,), {**methods, "_gateway_original": original, "_log": _log})


def install(master) -> bool:
    """Guard mitmweb's routes on `master` (a WebMaster); False when it has no web app (mitmdump).
    Idempotent: a script reload guards mitmweb's original handlers again, not the last guard's."""
    app = getattr(master, "app", None)
    router = getattr(app, "wildcard_router", None)
    if router is None:
        return False
    for rule in router.rules:
        if isinstance(rule.target, type):
            rule.target = guarded(rule.target)
    return True
