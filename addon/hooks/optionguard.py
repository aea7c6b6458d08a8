"""Options that guard secrets or routing cannot be changed while the gateway runs.

mitmweb lets a logged-in user change any option (`PUT /options`, the `set` command). Some of
them decide who sees flows (`view_filter`), who may edit a request after the gateway routed it
(`intercept`), where flows are written (`save_stream_file`), whether the provider's certificate
is checked (`ssl_insecure`, ...) or where requests may go (`mode`, `connection_strategy`,
`ignore_hosts`, ...). Their start-up values stand; a later change is refused with OptionsError
(mitmproxy then rolls it back). `stream_large_bodies` is refused at any time: a streamed request
body would bypass the gateway's checks of it.

mitmweb's own API is narrowed further by hooks/webguard.py (installed here, at load: this is the
part that guards what may change while the gateway runs): a logged-in user may change only the
options that decide how flows are shown, and run only the commands that look at flows. This list
stays for what reaches the options another way.
"""

from __future__ import annotations

import copy

from mitmproxy import ctx, exceptions

from addon.hooks import webguard

GUARDED = (
    "view_filter", "intercept", "intercept_active", "save_stream_file", "save_stream_filter",
    "stream_large_bodies", "body_size_limit", "ssl_insecure", "ssl_verify_upstream_trusted_ca",
    "ssl_verify_upstream_trusted_confdir", "upstream_cert", "mode", "connection_strategy",
    "keep_host_header", "ignore_hosts", "allow_hosts", "tcp_hosts", "rawtcp", "upstream_auth",
    "modify_headers", "modify_body", "map_remote", "map_local", "scripts",
    "max_request_mb", "max_request_header_kb",
    "usage_db",  # env:NAME reads the environment: never a variable chosen after start-up
    # files the gateway reads or writes: the keys, recordings, mitmproxy's CA and flows
    "keys_file", "record_file", "confdir", "rfile", "hardump", "web_static_viewer", "server_replay", "client_replay",
)


class OptionGuard:
    def __init__(self) -> None:
        self.frozen: dict | None = None  # guarded option -> start-up value, from `running`

    def load(self, loader) -> None:
        webguard.install(ctx.master)  # mitmweb made its web app already; it listens after the scripts load

    def running(self) -> None:
        webguard.install(ctx.master)
        known = set(ctx.options.keys())
        self.frozen = {name: copy.deepcopy(getattr(ctx.options, name)) for name in GUARDED if name in known}

    def configure(self, updated) -> None:
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            raise exceptions.OptionsError(
                "stream_large_bodies is not supported by the gateway: request bodies are checked whole "
                "(use max_request_mb to bound them)")
        if self.frozen is None:
            return
        changed = sorted(
            name for name in updated if name in self.frozen and getattr(ctx.options, name) != self.frozen[name]
        )
        if changed:
            raise exceptions.OptionsError(
                f"{', '.join(changed)} cannot be changed while the gateway runs (it guards keys or routing); "
                "restart with --set instead")
