"""mitmweb's flow list, as the gateway's user reads it.

- **The Path column** shows what the client called, at the gateway's address
  (`http://127.0.0.1:8080/v1/chat/completions`): not the provider's URL a routed request was
  rewritten to, nor reverse mode's unreachable placeholder (`http://127.0.0.1:1/...`) that a
  request the gateway answered itself (`/health`, `/v1/models`, a refusal) never went to. Only
  what mitmweb is sent changes (`flow_to_json`, its one serialiser for the list, the updates and
  the detail's first line): the flow itself stays the upstream request, as recordings, replays
  and the gateway view (its "GATEWAY → PROVIDER" side) need it.
- **The Comment column** says which key went to which provider and model, and how it ended
  (hooks/answers.py `row_comment`). mitmweb gives it 150 px, about 20 characters: its page gets a
  style giving it 40% of the table's width (a user's own resizing still wins).

Installed only in mitmweb (mitmdump never imports mitmweb's modules), for the life of the addon.
"""

from __future__ import annotations

import sys

from mitmproxy import http

from addon.routing.state import state_of
from addon.wire.patching import Patches

WEB_APP = "mitmproxy.tools.web.app"
INDEX = "../index.html"  # the page IndexHandler renders (login.html: the password form)
COMMENT_WIDTH = "40%"
# the table's <col> sets the width (table-layout: fixed); mitmweb puts a width the user dragged
# on it inline, which still wins over this
STYLE = f"<style>.flow-table col.col-comment, .flow-table th.col-comment {{ width: {COMMENT_WIDTH}; }}</style>".encode()


def as_called(flow: http.HTTPFlow) -> dict | None:
    """The request line's parts as the client called them (scheme, host, port, path,
    pretty_host), for a flow the gateway routed or answered; None for any other flow."""
    request = flow.request
    state = state_of(flow)
    path = state.client_path if state is not None else None
    if path is None:
        if request.port != 1:  # not reverse mode's placeholder: not a flow the gateway answered
            return None
        path = request.path
    address = flow.client_conn.sockname if flow.client_conn is not None else None
    if not address or not address[0]:
        return None
    host, port = address[0], address[1]
    return {"scheme": "https" if flow.client_conn.tls_established else "http", "host": host, "port": port,
            "path": path, "pretty_host": f"[{host}]" if ":" in host else host}


def called_url(flow: http.HTTPFlow) -> str:
    """The URL the client called (as mitmweb lists it), else the flow's own."""
    shown = as_called(flow)
    if shown is None:
        return flow.request.pretty_url
    default = {"http": 80, "https": 443}[shown["scheme"]]
    port = "" if shown["port"] == default else f":{shown['port']}"
    return f"{shown['scheme']}://{shown['pretty_host']}{port}{shown['path']}"


def _flow_to_json(flow) -> dict:
    out = _patches[0].original["flow_to_json"](flow)
    if isinstance(flow, http.HTTPFlow) and "request" in out:
        shown = as_called(flow)
        if shown is not None:
            out["request"].update(shown)
    return out


def _render_string(self, template_name: str, **kwargs) -> bytes:
    """mitmweb's page, with the style that widens the comment column (its CSP allows inline
    styles, not scripts). Not its `get`: mitmweb wraps each handler method with its password
    check when the class is made, and a replaced `get` would serve the page without it."""
    page = _patches[1].original["render_string"](self, template_name, **kwargs)
    return page.replace(b"</head>", STYLE + b"</head>", 1) if template_name == INDEX else page


_patches: list[Patches] = []  # mitmweb's serialiser and page, once mitmweb is seen


class WebListing:
    """Installs the list's presentation when running in mitmweb."""

    def load(self, loader) -> None:
        app = sys.modules.get(WEB_APP)
        if app is None:  # mitmdump
            return
        if not _patches:
            _patches.extend(
                [Patches(app, flow_to_json=_flow_to_json), Patches(app.IndexHandler, render_string=_render_string)]
            )
        for patches in _patches:
            patches.install()

    def done(self) -> None:
        for patches in _patches:
            patches.undo()
