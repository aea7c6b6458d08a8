"""./run.sh demo [web]: a fake provider on 127.0.0.1, a demo keys file pointing at it, and the
gateway (./run.sh, or ./run.sh web) in front; prints the demo's keys with every limit they carry,
and commands to try (curl only: they work in a fresh clone, whose .venv has no SDK).

Nothing leaves the machine: every provider base_url in the demo keys file is the fake provider's,
and the gateway routes only to those.

Stopping: Ctrl-C, SIGTERM (`kill`, `timeout`) or SIGHUP (the terminal closed) is passed on to the
gateway once (it drains, then stops; a second signal stops it at once); the demo waits for it,
then stops the fake provider and removes its temporary directory (keys file and ledger).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from demo import provider as fake

ROOT = Path(__file__).resolve().parent.parent
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DRAIN_S = 5  # the demo's requests are short: a stop waits this long for them at most
KILL_AFTER = DRAIN_S + 15  # a gateway still running this long after a stop is killed

# what each demo key is, before its limits (the banner lists every key of keys_file with its limits)
ABOUT = {
    "vk_demo_openai": "OpenAI",
    "vk_demo_anthropic": "Anthropic (Claude)",
    "vk_demo_deepseek": "DeepSeek",
    "vk_demo_limited": "OpenAI",
    "vk_demo_failover": "a revoked OpenAI key, then Claude as its fallback",
}


def keys_file(provider_url: str) -> dict:
    return {
        "providers": {"openai": {"base_url": f"{provider_url}/openai/v1"},
                      "anthropic": {"base_url": f"{provider_url}/anthropic/v1"},
                      "deepseek": {"base_url": f"{provider_url}/deepseek"}},
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
        "virtual_keys": {
            "vk_demo_openai": {"provider": "openai", "api_key": fake.KEYS["openai"], "name": "demo-openai"},
            "vk_demo_anthropic": {"provider": "anthropic", "api_key": fake.KEYS["anthropic"], "name": "demo-anthropic"},
            "vk_demo_deepseek": {"provider": "deepseek", "api_key": fake.KEYS["deepseek"], "name": "demo-deepseek"},
            # its allow-list and rpm are what it shows. Its budget holds a request's worst case while
            # it runs (no max_tokens: gpt-4o-mini's 16,384 output tokens, $0.01 at these prices), so the budget
            # must be well above that or the first request is refused (docs/shared-state.md)
            "vk_demo_limited": {"provider": "openai", "api_key": fake.KEYS["openai"], "name": "demo-limited",
                                "models": ["gpt-4o-mini"], "rpm": 3, "budget_usd": 1.0},
            # an OpenAI key the (fake) provider has revoked, then Claude: the first request fails
            # over inside the gateway, later ones skip the bad key (docs/failover.md)
            "vk_demo_failover": {"name": "demo-failover", "targets": [
                {"provider": "openai", "api_key": "sk-demo-revoked-key"},
                {"provider": "anthropic", "api_key": fake.KEYS["anthropic"], "fallback": True,
                 "model_map": {"gpt-4o-mini": "claude-haiku-4-5"}}]},
        },
    }


def _budget(entry: dict, amount: str) -> str:
    period = entry.get("budget_period")
    return f"a {amount} budget" + (f" per {period}" if period else "")


# every per-key limit of the keys file (addon/policy/keys_parse.py POLICY_FIELDS), in the banner's words
LIMIT_WORDS = {
    "models": lambda e: "only " + ", ".join(e["models"]),
    "rpm": lambda e: f"{e['rpm']} requests a minute",
    "tpm": lambda e: f"{e['tpm']} tokens a minute",
    "max_parallel": lambda e: f"{e['max_parallel']} requests at once",
    "max_output_tokens": lambda e: f"answers of at most {e['max_output_tokens']} tokens",
    "budget_usd": lambda e: _budget(e, f"${e['budget_usd']:g}"),
    "budget_tokens": lambda e: _budget(e, f"{e['budget_tokens']}-token"),
    "budget_period": lambda e: "",  # said with its budget
    "expires_at": lambda e: f"expires {e['expires_at']}",
    "disabled": lambda e: "disabled" if e["disabled"] else "",
}


def limits(entry: dict) -> list[str]:
    """Every limit a keys-file entry carries, in words. An entry field that is neither a limit
    with words here nor how the key routes fails loudly: the banner must not leave one out."""
    routing = {"provider", "api_key", "base_url", "name", "targets"}
    unknown = entry.keys() - LIMIT_WORDS.keys() - routing
    if unknown:
        raise ValueError(f"the demo banner has no words for {sorted(unknown)}")
    return [words for name, say in LIMIT_WORDS.items() if name in entry and (words := say(entry))]


def key_lines(keys: dict) -> list[str]:
    lines = []
    for key, entry in keys["virtual_keys"].items():
        said = limits(entry)
        lines.append(f"demo:   {key:<18} {ABOUT.get(key, entry.get('provider', ''))}"
                     + (f"; limits: {', '.join(said)}" if said else ""))
    return lines


def commands(endpoint: str) -> list[tuple[str, str]]:
    """What the demo prints to try, (what it shows, the command). curl only: a fresh clone's
    .venv has the gateway's requirements, no SDK (tests/e2e/test_demo.py runs each as printed)."""
    def post(key: str, model: str, stream: bool = False, flags: str = "-s") -> str:
        request = {"model": model, **({"stream": True} if stream else {}),
                   "messages": [{"role": "user", "content": "Hello, gateway"}]}
        return (f"curl {flags} {endpoint}/chat/completions -H 'Authorization: Bearer {key}' "
                f"-H 'content-type: application/json' -d {shlex.quote(json.dumps(request))}")
    return [
        ("OpenAI's chat API with an OpenAI key", post("vk_demo_openai", "gpt-4o-mini")),
        ("Claude through the same OpenAI-format endpoint (the gateway translates both ways)",
         post("vk_demo_anthropic", "claude-sonnet-4-6")),
        ("a stream, from DeepSeek", post("vk_demo_deepseek", "deepseek-chat", stream=True, flags="-sN")),
        ("vk_demo_limited may use only gpt-4o-mini: gpt-4o is refused (403 model_not_allowed)",
         post("vk_demo_limited", "gpt-4o")),
        ("... and 3 requests a minute: the 4th is refused (429 rate_limit_exceeded)",
         "for i in 1 2 3 4; do " + post("vk_demo_limited", "gpt-4o-mini", flags="-s -o /dev/null -w '%{http_code} '")
         + "; done; echo"),
        ("failover: the fake provider refuses the revoked OpenAI key, Claude answers",
         post("vk_demo_failover", "gpt-4o-mini")),
    ]


def banner(keys: dict, provider_url: str, endpoint: str, web_line: str | None) -> str:
    origin = endpoint.removesuffix("/v1")
    lines = ["", "demo: " + "=" * 66,
             f"demo: DEMO MODE: the providers are a local fake on {provider_url}; nothing leaves this",
             "demo: machine, and every answer starts with [demo]. The demo's virtual keys:",
             *key_lines(keys),
             "demo: Try these in another terminal:", ""]
    for what, command in commands(endpoint):
        lines += [f"  # {what}", f"  {command}", ""]
    lines.append(f'demo: With an SDK: OpenAI\'s base_url="{endpoint}", Anthropic\'s base_url="{origin}",')
    lines.append('demo: api_key="vk_demo_openai" (or any key above).')
    if web_line:
        lines.append(web_line)
    lines.append("demo: Ctrl-C stops the gateway and the fake provider.")
    return "\n".join(lines)


def wait_healthy(url: str, gateway: subprocess.Popen, timeout: float = 60) -> bool:
    """True once the gateway answers /health. One probe waits as long as the start-up may take:
    the port accepts connections before mitmproxy has loaded the gateway, and on a cold start
    that takes seconds. A probe that gave up meanwhile would leave the gateway answering a client
    that had gone (its access log: `0 failed GET /health`)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and gateway.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=left) as r:
                return r.status == 200
        except OSError:  # not listening yet (refused), or reset: try again
            time.sleep(0.1)
    return False


def _die_with_parent() -> None:
    """In the gateway's process, before exec: SIGTERM when the demo dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a SIGKILLed demo leaves the gateway running
        pass


class Stop:
    """A stop signal's handler: the first one (and any later one) is passed on to the gateway as
    SIGTERM: the first drains, a second stops it at once. Before the gateway is started there is
    nothing to pass it to: the demo unwinds (its `finally` cleans up)."""

    def __init__(self) -> None:
        self.gateway: subprocess.Popen | None = None
        self.since: float | None = None

    def __call__(self, signum: int, frame) -> None:
        first = self.since is None
        if first:
            self.since = time.monotonic()
        if self.gateway is None:
            if first:  # once: a second signal must not interrupt the clean-up the first started
                raise Interrupted(signum)
            return
        if self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)


class Interrupted(Exception):
    pass


def main(argv: list[str]) -> int:
    stop = Stop()
    for sig in STOP_SIGNALS:  # first: a Ctrl-C from here on is no KeyboardInterrupt traceback
        signal.signal(sig, stop)
    web = argv[:1] == ["web"]
    server = gateway = tmp = None
    try:
        server = fake.start(int(os.environ.get("DEMO_PROVIDER_PORT", "0")))
        provider_url = f"http://127.0.0.1:{server.server_address[1]}"
        tmp = tempfile.TemporaryDirectory(prefix="gateway-demo-")
        keys = keys_file(provider_url)
        (Path(tmp.name) / "keys.json").write_text(json.dumps(keys, indent=2))
        host = os.environ.get("GATEWAY_HOST", "127.0.0.1")
        port = os.environ.get("GATEWAY_PORT", "8080")
        # the demo's own ledger: demo traffic never lands in your usage.sqlite3
        env = {**os.environ, "KEYS_FILE": str(Path(tmp.name) / "keys.json"),
               "USAGE_DB": str(Path(tmp.name) / "usage.sqlite3"),
               "GATEWAY_DRAIN_S": os.environ.get("GATEWAY_DRAIN_S", str(DRAIN_S))}
        web_line = None
        if web:
            web_url = f"http://127.0.0.1:{os.environ.get('WEB_PORT', '8081')}"
            if os.environ.get("WEB_PASSWORD"):
                web_line = f"demo: mitmweb shows each flow's two sides: {web_url} (log in with your WEB_PASSWORD)"
            else:  # made here, so the link below can log in with it (?token= sets mitmweb's cookie)
                env["WEB_PASSWORD"] = password = secrets.token_urlsafe(18)
                web_line = (f"demo: mitmweb shows each flow's two sides: {web_url}/?token={password}\n"
                            f"demo: (that link logs you in; or open {web_url} and enter the password {password})")
        # its own process group: a Ctrl-C in the terminal reaches the demo only, which passes it
        # on once (the gateway getting it twice, from the terminal and from here, would not drain)
        gateway = subprocess.Popen([str(ROOT / "run.sh"), *(["web"] if web else []), *argv[1 if web else 0:]],
                                   env=env, process_group=0, preexec_fn=_die_with_parent)
        stop.gateway = gateway  # (a signal before this line unwinds, and the finally stops it)
        connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        if not wait_healthy(f"http://{connect}:{port}", gateway):
            if stop.since is not None:
                wait(gateway, stop)
                return 0
            print(
                "demo: the gateway did not start (is the port in use? GATEWAY_PORT=9090 ./run.sh demo)", file=sys.stderr
            )
            return gateway.poll() or 1  # (still running: stopped below)
        if stop.since is None:
            print(banner(keys, provider_url, f"http://{connect}:{port}/v1", web_line), flush=True)
        code = wait(gateway, stop)
        return 0 if stop.since is not None else code
    except Interrupted:
        return 0
    finally:
        if gateway is not None and gateway.poll() is None:  # an error in the demo itself
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(KILL_AFTER)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
        if server is not None:
            server.shutdown()
            server.server_close()
        if tmp is not None:
            tmp.cleanup()


def wait(gateway: subprocess.Popen, stop: Stop) -> int:
    """The gateway's exit code; killed when it outlives a stop by KILL_AFTER seconds."""
    while True:
        try:
            return gateway.wait(0.2)
        except subprocess.TimeoutExpired:
            if stop.since is not None and time.monotonic() - stop.since > KILL_AFTER:
                gateway.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
