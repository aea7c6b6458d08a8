"""mitmweb is for looking: a logged-in user of `./run.sh web` may list, view, filter, mark, comment,
delete and replay flows, and nothing else (addon/hooks/webguard.py).

Driven over mitmweb's real HTTP API, as the password's holder, against `./run.sh web`. Every
command and option mitmproxy registers is named in the tables below, allowed or refused: a
command or option that a new mitmproxy (or a new gateway option) adds fails the test until it
is classified here. The second hardening round's attack is reproduced: `cut.save` of a request
body into a .py file, then `script.run` of it (it read every key); `PUT /options` of `keys_file`
and `record_file`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest

from tests import rawhttp
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e

PASSWORD = "pw-webguard-test-5150"
VK = "vk_webguard_client_8080"
VK_RPM = "vk_webguard_rpm2_443"  # 2 requests a minute: a replay is checked like any request
REAL = "sk-webguard-real-key-4096"
XSRF = "webguard0123456789"

# commands a logged-in user may run (addon/hooks/webguard.py ALLOWED_COMMANDS)
ALLOWED_COMMANDS = {
    "view.properties.inbounds", "view.properties.length", "view.properties.marked",
    "view.focus.go", "view.focus.next", "view.focus.prev", "view.settings.getval",
    "view.order", "view.order.options", "view.order.set", "view.order.reverse", "view.properties.marked.toggle",
    "flow.mark", "flow.mark.toggle", "flow.comment",
    "view.flows.remove", "view.clear", "view.clear_unmarked", "flow.kill", "flow.resume",
    "replay.client", "replay.client.count", "replay.client.stop",
    "proxyserver.active_connections", "readfile.reading",
}
# every other command mitmproxy 12 registers in mitmweb with the gateway loaded: each refused
REFUSED_COMMANDS = {
    "browser.start",  # starts a program
    "commands.history.add", "commands.history.clear", "commands.history.filter", "commands.history.get",
    "commands.history.next", "commands.history.prev",  # the history file in confdir
    "cut", "cut.clip", "cut.save",  # cut.save writes any part of a flow to any path
    "eventstore.clear",  # the event log holds these refusals
    "export", "export.clip", "export.file", "export.formats",
    "flow.decode", "flow.encode", "flow.encode.options", "flow.encode.toggle", "flow.revert", "flow.set",
    "flow.set.options",  # edit flows
    "inject.tcp", "inject.udp", "inject.websocket",  # send into connections
    "options.load", "options.reset", "options.reset.one", "options.save", "set",  # options, files
    "replay.client.file", "replay.server", "replay.server.add", "replay.server.count", "replay.server.file",
    "replay.server.stop",  # files; answering clients from recorded flows
    "save.file", "save.har",  # write flows to any path
    "script.run",  # runs a file inside the gateway
    "view.filter.set",  # view_filter hides flows in flight (an option, frozen)
    "view.flows.create", "view.flows.duplicate", "view.flows.load",  # new flows; a file
    "view.flows.resolve",  # returns flows, which mitmweb cannot send (a 500): of no use here
    "view.settings.setval", "view.settings.setval.toggle",
}
# options a user may change: how flows are shown (addon/hooks/webguard.py VIEW_OPTIONS)
VIEW_OPTIONS = {
    "view_order",
    "view_order_reversed",
    "web_columns",
    "web_theme",
    "showhost",
    "content_view_lines_cutoff",
}
# every other option: read-only from the UI
READ_ONLY_OPTIONS = {
    # the gateway's
    "access_log",
    "auth_cooldown_s",
    "background_hold",
    "cooldown_s",
    "drain_s",
    "endpoint_line",
    "keys_file",
    "keys_reload_ms",
    "max_attempts",
    "max_buffered_mb",
    "max_request_header_kb",
    "max_request_mb",
    "metrics_host",
    "metrics_port",
    "metrics_token",
    "owners_per_key",
    "spend_check",
    "record_file",
    "redis_prefix",
    "redis_url",
    "replayable_flows",
    "reservation_lease",
    "stream_idle_timeout",
    "upstream_timeout",
    "usage_db",
    # mitmproxy's
    "add_upstream_certs_to_client_chain",
    "allow_hosts",
    "anticache",
    "anticomp",
    "block_global",
    "block_list",
    "block_private",
    "body_size_limit",
    "cert_passphrase",
    "certs",
    "ciphers_client",
    "ciphers_server",
    "client_certs",
    "client_replay",
    "client_replay_concurrency",
    "command_history",
    "confdir",
    "connect_addr",
    "connection_strategy",
    "console_focus_follow",
    "dns_name_servers",
    "dns_use_hosts_file",
    "emudhra",
    "emudhra_old",
    "export_preserve_original_ip",
    "hardump",
    "http2",
    "http2_ping_keepalive",
    "http3",
    "http_connect_send_host_header",
    "ignore_hosts",
    "intercept",
    "intercept_active",
    "keep_alt_svc_header",
    "keep_host_header",
    "key_size",
    "listen_host",
    "listen_port",
    "map_local",
    "map_remote",
    "mode",
    "modify_body",
    "modify_headers",
    "normalize_outbound_headers",
    "onboarding",
    "onboarding_host",
    "protobuf_definitions",
    "proxy_debug",
    "proxyauth",
    "rawtcp",
    "readfile_filter",
    "request_client_cert",
    "rfile",
    "save_stream_file",
    "save_stream_filter",
    "scripts",
    "server",
    "server_replay",
    "server_replay_extra",
    "server_replay_ignore_content",
    "server_replay_ignore_host",
    "server_replay_ignore_params",
    "server_replay_ignore_payload_params",
    "server_replay_ignore_port",
    "server_replay_kill_extra",
    "server_replay_nopop",
    "server_replay_refresh",
    "server_replay_reuse",
    "server_replay_use_headers",
    "show_ignored_hosts",
    "ssl_insecure",
    "ssl_verify_upstream_trusted_ca",
    "ssl_verify_upstream_trusted_confdir",
    "stickyauth",
    "stickycookie",
    "store_streamed_bodies",
    "stream_large_bodies",
    "strip_ech",
    "tcp_hosts",
    "tcp_timeout",
    "termlog_verbosity",
    "tls_ecdh_curve_client",
    "tls_ecdh_curve_server",
    "tls_version_client_max",
    "tls_version_client_min",
    "tls_version_server_max",
    "tls_version_server_min",
    "udp_hosts",
    "upstream_auth",
    "upstream_cert",
    "validate_inbound_headers",
    "view_filter",
    "web_debug",
    "web_host",
    "web_open_browser",
    "web_password",
    "web_port",
    "web_static_viewer",
    "websocket",
}
ROUTABLE = re.compile(r"[a-z.]+")  # mitmweb's route for POST /commands/<name>: others cannot be called


class RunShWeb:
    """`./run.sh web` with a password, its output read on a thread."""

    def __init__(self, tmp: Path, provider_url: str) -> None:
        self.tmp = tmp
        keys = tmp / "keys.json"
        keys.write_text(json.dumps({
            "providers": {"openai": {"base_url": provider_url + "/v1"}},
            "virtual_keys": {VK: {"provider": "openai", "api_key": REAL, "name": "looker"},
                             VK_RPM: {"provider": "openai", "api_key": REAL, "name": "limited", "rpm": 2}}}))
        self.port, self.web_port = free_port(), free_port()
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "KEYS_FILE": str(keys), "GATEWAY_PORT": str(self.port),
               "WEB_PORT": str(self.web_port), "WEB_PASSWORD": PASSWORD, "USAGE_DB": str(tmp / "usage.sqlite3"),
               "PYTHONUNBUFFERED": "1"}  # mitmweb's log is block-buffered on a pipe otherwise
        self.proc = subprocess.Popen([str(ROOT / "run.sh"), "web"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.output = bytearray()
        timer = threading.Timer(60, self.stop)  # readline blocks: a start that hangs is stopped
        timer.start()
        for line in self.proc.stdout:
            self.output += line
            if b"OpenAI-compatible endpoint" in line:
                break
        timer.cancel()
        if b"OpenAI-compatible endpoint" not in self.output:
            self.stop()
            raise RuntimeError("./run.sh web did not start:\n" + self.output.decode(errors="replace"))
        threading.Thread(target=self._drain, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.web_port}"
        # the password as a Bearer token; tornado's XSRF double submit (the same token as cookie and header)
        self.headers = {"authorization": f"Bearer {PASSWORD}", "cookie": f"_mitmproxy_xsrf={XSRF}", "x-xsrftoken": XSRF}

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output += line

    def log(self) -> str:
        time.sleep(0.3)  # a line logged just before the answer may still be in the pipe
        return self.output.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def call(
        self, method: str, path: str, body=None, *, content: bytes | None = None, headers=None
    ) -> rawhttp.RawResponse:
        return rawhttp.request(self.base, method, path, json=body, content=content,
                               headers={**self.headers, **(headers or {})}, timeout=20)

    def command(self, name: str, *args: str) -> rawhttp.RawResponse:
        return self.call("POST", f"/commands/{name}", {"arguments": list(args)})

    def options(self) -> dict:
        return self.call("GET", "/options").json()

    def flows(self) -> list[dict]:
        return self.call("GET", "/flows").json()

    def client(self, key: str = VK) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def web(tmp_path_factory, provider_server):
    proc = RunShWeb(tmp_path_factory.mktemp("webguard"), provider_server.url)
    yield proc
    proc.stop()


def refusals(web: RunShWeb, what: str) -> int:
    return sum(1 for line in web.log().splitlines() if f"gateway: mitmweb refused {what} from" in line)


def test_the_attack_cut_save_then_script_run_is_refused(web, provider_server):
    """The round-two attack: the user's own request body (Python) cut into a file, then run."""
    pwned = web.tmp / "pwned"
    script = web.tmp / "x.py"
    # a body that is Python, not JSON: the gateway answers 400 and the flow keeps the body
    code = f"import os\nopen({str(pwned)!r}, 'w').write(repr(dict(os.environ)))\n# MARK\n".encode()
    answer = rawhttp.request(f"http://127.0.0.1:{web.port}", "POST", "/v1/chat/completions", content=code,
                             headers={"authorization": f"Bearer {VK}", "content-type": "application/json"})
    assert answer.status_code == 400
    deadline = time.monotonic() + 10
    while not any(f["request"]["contentLength"] == len(code) for f in web.flows()) and time.monotonic() < deadline:
        time.sleep(0.1)

    cut = web.command("cut.save", "~bq MARK", "request.content", str(script))
    assert cut.status_code == 403, cut.content
    assert "refused: command cut.save" in cut.json()["error"]
    assert not script.exists()
    # and a script already on the disk (one the user got there another way) is not run either
    script.write_text(f"open({str(pwned)!r}, 'w').write('ran')\n")
    run = web.command("script.run", "@all", str(script))
    assert run.status_code == 403, run.content
    time.sleep(0.5)
    assert not pwned.exists()
    assert refusals(web, "command cut.save") == 1 and refusals(web, "command script.run") == 1
    # the keys file and the recording file are read-only: keys_file pointed at the user's own
    # file would send env: secrets to their host, and record_file could write anywhere
    evil_keys = web.tmp / "evil-keys.json"
    evil_keys.write_text(
        json.dumps({"virtual_keys": {"vk_evil_00000000": {"provider": "openai", "api_key": "env:PATH"}}})
    )
    for change in ({"keys_file": str(evil_keys)}, {"record_file": str(web.tmp / "anywhere.mitm")},
                   {"scripts": [str(script)]}, {"confdir": str(web.tmp)}):
        resp = web.call("PUT", "/options", change)
        assert resp.status_code == 403, (change, resp.content)
    assert not (web.tmp / "anywhere.mitm").exists()
    assert web.options()["keys_file"]["value"] != str(evil_keys)
    assert web.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert provider_server.received[-1].headers["authorization"] == f"Bearer {REAL}"  # the original keys still serve
    assert not pwned.exists()


def test_every_command_is_classified_and_only_the_allowed_ones_run(web, provider_server):
    registered = set(web.call("GET", "/commands").json())
    unknown = registered - ALLOWED_COMMANDS - REFUSED_COMMANDS
    assert not unknown, (
        f"commands nobody classified (allow in addon/hooks/webguard.py, or refuse here): {sorted(unknown)}"
    )
    assert not (ALLOWED_COMMANDS | REFUSED_COMMANDS) - registered, "classified commands mitmproxy no longer has"

    log = web.log()
    before = {name: log.count(f"gateway: mitmweb refused command {name} from") for name in REFUSED_COMMANDS}
    for name in sorted(REFUSED_COMMANDS):
        resp = web.command(name)
        if ROUTABLE.fullmatch(name):
            assert resp.status_code == 403, (name, resp.status_code, resp.content)
            assert resp.json()["error"].startswith(f"refused: command {name}."), resp.content
        else:
            assert resp.status_code == 404, name  # mitmweb has no route to it
    log = web.log()
    for name in REFUSED_COMMANDS:  # one line each
        assert log.count(f"gateway: mitmweb refused command {name} from") - before[name] == \
            (1 if ROUTABLE.fullmatch(name) else 0), name

    # the allowed ones do what they are for: a flow to look at, then each command on it
    provider_server.reset()
    web.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "look at me"}])
    deadline = time.monotonic() + 10
    while (
        not [f for f in web.flows() if f["response"] and f["response"]["status_code"] == 200]
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    args = {
        "view.properties.inbounds": ["0"], "view.focus.go": ["0"],
        "view.settings.getval": ["@focus", "fullcontents", "false"], "view.order.set": ["time"],
        "view.order.reverse": ["false"], "flow.mark": ["~c 200", ":star:"], "flow.mark.toggle": ["~c 400"],
        "flow.comment": ["~c 200", "seen by the test"], "flow.kill": ["@all"], "flow.resume": ["@all"],
        "view.flows.remove": ["~c 400"], "replay.client": ["~c 200"],
    }
    last = {"view.clear", "view.clear_unmarked"}  # they empty the list the others look at
    for name in sorted(ALLOWED_COMMANDS - last) + sorted(last):
        if name == "view.properties.marked.toggle":
            for _ in range(2):  # "show only marked" and back
                assert web.command(name).status_code == 200
            continue
        resp = web.command(name, *args.get(name, []))
        if not ROUTABLE.fullmatch(name):
            assert resp.status_code == 404, name
            continue
        assert resp.status_code == 200, (name, resp.content)
        assert "error" not in resp.json(), (name, resp.json())
        if name == "flow.comment":
            assert any(f["comment"] == "seen by the test" for f in web.flows())
        if name == "replay.client":  # through the gateway: routed afresh, the real key on the wire
            assert provider_server.wait_received(2, timeout=15)
            assert provider_server.received[-1].headers["authorization"] == f"Bearer {REAL}"
    assert web.flows() == []  # view.clear
    log = web.log()
    assert not [name for name in ALLOWED_COMMANDS if f"gateway: mitmweb refused command {name} from" in log]


def changed(option: dict):
    """A valid value other than the option's current one."""
    kind, current, choices = option["type"], option["value"], option.get("choices")
    if choices:
        return next(c for c in choices if c != current)
    if kind == "bool":
        return not current
    if kind in ("int", "optional int"):
        return (current or 0) + 1
    if kind.startswith("sequence"):
        return ["method", "path"] if current != ["method", "path"] else ["path"]
    return (current or "") + "-changed"


def test_every_option_is_classified_and_only_view_options_change(web):
    options = web.options()
    unknown = set(options) - VIEW_OPTIONS - READ_ONLY_OPTIONS
    assert not unknown, (
        f"options nobody classified (a view option in addon/hooks/webguard.py, or read-only here): {sorted(unknown)}"
    )
    assert not (VIEW_OPTIONS | READ_ONLY_OPTIONS) - set(options), "classified options that no longer exist"
    before = {name: option["value"] for name, option in options.items()}

    for name in sorted(READ_ONLY_OPTIONS):
        resp = web.call("PUT", "/options", {name: changed(options[name])})
        assert resp.status_code == 403, (name, resp.status_code, resp.content)
    # one refused name refuses the whole update, the view option in it too
    assert (
        web.call("PUT", "/options", {"web_theme": changed(options["web_theme"]), "keys_file": "/tmp/x"}).status_code
        == 403
    )
    after = {name: option["value"] for name, option in web.options().items()}
    assert after == before
    log = web.log()
    for name in READ_ONLY_OPTIONS:
        assert f"gateway: mitmweb refused options {name} from" in log, name

    for name in sorted(VIEW_OPTIONS):
        resp = web.call("PUT", "/options", {name: changed(options[name])})
        assert resp.status_code == 200, (name, resp.content)
    after = {name: option["value"] for name, option in web.options().items()}
    assert {name for name in after if after[name] != before[name]} == VIEW_OPTIONS
    for name in VIEW_OPTIONS:  # back as they were
        assert web.call("PUT", "/options", {name: before[name]}).status_code == 200


def test_the_api_routes_beyond_commands_look_only(web, provider_server):
    provider_server.reset()
    web.client(VK_RPM).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "routes"}])
    deadline = time.monotonic() + 10
    flows = []
    while not flows and time.monotonic() < deadline:
        flows = [f for f in web.flows() if f["response"] and f["response"]["status_code"] == 200]
        time.sleep(0.1)
    flow = flows[-1]["id"]
    # logging in (the login form posts the password to /), and looking
    login = rawhttp.request(web.base, "POST", "/", content=f"token={PASSWORD}".encode(), headers={
        "content-type": "application/x-www-form-urlencoded", "cookie": f"_mitmproxy_xsrf={XSRF}", "x-xsrftoken": XSRF})
    assert login.status_code == 200 and b"<html" in login.content.lower()
    for path in ("/", "/flows", "/state", "/events", "/commands", "/options", "/filter-help",
                 f"/flows/{flow}/request/content.data", f"/flows/{flow}/response/content/auto.json"):
        assert web.call("GET", path).status_code == 200, path
    # marking and commenting; nothing else of a flow may change
    assert web.call("PUT", f"/flows/{flow}", {"comment": "ok", "marked": ":star:"}).status_code == 200
    for edit in ({"request": {"host": "127.0.0.1", "port": 1}}, {"response": {"code": 500}},
                 {"comment": "x", "request": {"content": "{}"}}, {}):
        assert web.call("PUT", f"/flows/{flow}", edit).status_code == 403, edit
    shown = next(f for f in web.flows() if f["id"] == flow)
    assert shown["comment"] == "ok" and shown["request"]["port"] != 1 and shown["response"]["status_code"] == 200
    # exports, loads, duplicates, body edits, reverts, the machine's programs and files
    count = len(web.flows())
    for method, path in (
        ("GET", "/flows/dump"),
        ("POST", "/flows/dump"),
        ("POST", f"/flows/{flow}/duplicate"),
        ("POST", f"/flows/{flow}/revert"),
        ("POST", f"/flows/{flow}/request/content.data"),
        ("POST", "/options/save"),
        ("GET", "/processes"),
        ("GET", "/executable-icon?path=/etc/passwd"),
    ):
        resp = web.call(method, path, content=b"{}" if method == "POST" else None)
        assert resp.status_code == 403, (method, path, resp.status_code)
        assert refusals(web, f"{method} {path.partition('?')[0]}") == 1, (method, path)
    assert len(web.flows()) == count  # no duplicate, nothing loaded
    # a replay of a routed flow goes through the gateway and its checks: the key's rpm of 2
    # admits one replay and refuses the next
    assert web.call("POST", f"/flows/{flow}/replay").status_code == 200
    assert provider_server.wait_received(2, timeout=15)
    assert provider_server.received[-1].headers["authorization"] == f"Bearer {REAL}"
    replayed(web, flow)
    assert web.call("POST", f"/flows/{flow}/replay").status_code == 200
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline and status != 429:
        time.sleep(0.1)
        shown = next((f for f in web.flows() if f["id"] == flow), None)
        status = shown and shown["response"] and shown["response"]["status_code"]
    assert status == 429  # refused by the key's rpm, as a client's request would be
    assert len(provider_server.received) == 2
    # and deleting
    assert web.call("DELETE", f"/flows/{flow}").status_code == 200
    assert flow not in {f["id"] for f in web.flows()}


def replayed(web: RunShWeb, flow: str) -> None:
    """Until mitmproxy's replay of `flow` is over (a flow being replayed cannot be replayed again)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        # (while it is replayed the flow has no response: view_filter `~s | ~e` leaves it out)
        shown = next((f for f in web.flows() if f["id"] == flow), None)
        if shown and shown["response"] is not None and web.command("replay.client.count").json()["value"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the replay did not end")


def test_without_the_password_nothing_is_run_or_logged(web):
    before = refusals(web, "command cut.save")
    resp = rawhttp.request(
        web.base,
        "POST",
        "/commands/cut.save",
        json={"arguments": ["@all", "request.content", "/tmp/x"]},
        headers={"cookie": f"_mitmproxy_xsrf={XSRF}", "x-xsrftoken": XSRF},
    )
    assert resp.status_code == 403
    assert refusals(web, "command cut.save") == before  # mitmweb's login refused it: no line per stranger
