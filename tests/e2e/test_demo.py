"""./run.sh demo: starts, names every limit of its keys, prints commands that work as printed on a
fresh clone, serves every endpoint the README lists, and stops cleanly on SIGTERM, SIGINT, SIGHUP."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anthropic
import openai
import pytest

from demo import __main__ as demo
from demo.__main__ import keys_file
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e


class Demo:
    """`./run.sh demo [web]` in its own session, its output (the gateway's too) read as it comes."""

    def __init__(self, tmp: Path, *args: str, **env: str) -> None:
        self.port, self.web_port = free_port(), free_port()
        # TMPDIR: where the demo's gateway-demo-* directory goes, so a test can see it removed
        self.env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "TMPDIR": str(tmp),
                    "GATEWAY_PORT": str(self.port), "WEB_PORT": str(self.web_port), **env}
        self.proc = subprocess.Popen(
            [str(ROOT / "run.sh"), "demo", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.new: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self.new.put(line)
        self.new.put(None)

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            try:
                if self.new.get(timeout=max(0.01, deadline - time.monotonic())) is None:
                    break
            except queue.Empty:
                break
        assert text in self.output, self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def commands(self) -> list[str]:
        """Every command the banner prints: after "Try these", its indented lines that are not comments."""
        start = next(i for i, line in enumerate(self.lines) if line.startswith("demo: Try these"))
        end = next(i for i, line in enumerate(self.lines) if i > start and line.startswith("demo:"))
        return [line.strip() for line in self.lines[start:end] if line.startswith("  ") and not line.startswith("  #")]

    def gateway_pid(self) -> int:
        """run.sh exec's mitmdump: the demo's one child process."""
        children = [int(pid) for task in Path(f"/proc/{self.proc.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        assert len(children) == 1, children
        return children[0]

    def stop(self, sig: int = signal.SIGTERM, group: bool = False, timeout: float = 30) -> int:
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        self.reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def dev_only_packages() -> list[str]:
    """The packages requirements-dev.txt adds to the runtime set (requirements.txt)."""
    def names(path: Path) -> set[str]:
        return {re.split(r"[<>=\[ ;]", line.strip())[0].lower().replace("-", "_")
                for line in path.read_text().splitlines() if line.strip() and not line.startswith(("#", "-r"))}
    return sorted(names(ROOT / "requirements-dev.txt") - names(ROOT / "requirements.txt"))


@pytest.fixture(scope="module")
def running_demo(tmp_path_factory):
    d = Demo(tmp_path_factory.mktemp("demo"))
    try:
        d.wait_for("Ctrl-C stops")
        yield d
    finally:
        d.kill()






def test_the_banner_names_every_limit_of_every_demo_key(running_demo):
    for key, entry in keys_file("http://127.0.0.1:5")["virtual_keys"].items():
        [line] = [line for line in running_demo.lines if line.startswith(f"demo:   {key} ")]
        assert all(words in line for words in demo.limits(entry)), line
    [limited] = [line for line in running_demo.lines if line.startswith("demo:   vk_demo_limited ")]
    assert "only gpt-4o-mini" in limited and "3 requests a minute" in limited and "a $1 budget" in limited


def test_every_printed_command_works_on_a_fresh_clone(running_demo, tmp_path):
    """Run as printed, from the repository, with the SDKs (and every other dev-only package)
    missing from Python, as in a fresh clone's .venv, which has only requirements.txt."""
    blocked = tmp_path / "dev-only"
    for name in dev_only_packages():
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('{name} is only in requirements-dev.txt')\n"
        )
    commands = running_demo.commands()
    assert len(commands) == len(demo.commands("http://x/v1")) == 6, running_demo.output
    results = [
        subprocess.run(
            ["bash", "-o", "pipefail", "-c", c],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(blocked)},
        )
        for c in commands
    ]
    assert [r.returncode for r in results] == [0] * len(commands), results
    plain, claude, stream, not_allowed, rpm, failover = (r.stdout for r in results)
    assert json.loads(plain)["choices"][0]["message"]["content"].startswith("[demo] openai model gpt-4o-mini here")
    assert json.loads(claude)["choices"][0]["message"]["content"].startswith(
        "[demo] anthropic model claude-sonnet-4-6 here"
    )
    events = [line for line in stream.splitlines() if line.startswith("data: ")]
    assert len(events) > 5 and events[-1] == "data: [DONE]" and '"content": "[demo]"' in stream, stream
    assert '"usage"' not in stream  # the client did not ask for usage: the gateway hid it
    assert json.loads(not_allowed)["error"]["code"] == "model_not_allowed"
    # the limited key's allow-list and rpm, and no budget refusal for requests without max_tokens
    assert rpm.split() == ["200", "200", "200", "429"], rpm
    assert json.loads(failover)["choices"][0]["message"]["content"].startswith(
        "[demo] anthropic model claude-haiku-4-5 here"
    )
    # (access lines come with the accounting's next batch)
    # (refused at its headers, before the body naming the model was read: model=-)
    running_demo.wait_for("gateway: 429 rate_limit_exceeded key=demo-limited provider=openai model=-", 10)
    assert "budget_exceeded" not in running_demo.output
    assert "0 failed" not in running_demo.output


def test_the_demo_provider_serves_every_endpoint_the_readme_lists(running_demo):
    readme = (ROOT / "README.md").read_text()
    served = readme[readme.index("What is served:"):readme.index("The virtual key comes from")]
    listed = set(re.findall(r"`(?:GET |POST )?(/[a-z0-9_/]+)`", served))
    url = f"http://127.0.0.1:{running_demo.port}"
    oai = openai.OpenAI(base_url=url + "/v1", api_key="vk_demo_openai", max_retries=0)
    hello = [{"role": "user", "content": "hi"}]

    def chat(path: str) -> str:
        request = urllib.request.Request(url + path, json.dumps({"model": "gpt-4o-mini", "messages": hello}).encode(),
                                         {"authorization": "Bearer vk_demo_openai", "content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]

    def messages(_: str) -> None:
        for key, said in (("vk_demo_anthropic", "[demo] anthropic model claude-sonnet-4-6"),  # passed through
                          ("vk_demo_openai", "[demo] openai model claude-sonnet-4-6")):  # translated
            client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)
            answer = client.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=hello)
            assert answer.content[0].text.startswith(said)
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=50, messages=hello) as stream:
            assert "".join(stream.text_stream).startswith("[demo] openai model")

    def count_tokens(_: str) -> None:
        client = anthropic.Anthropic(base_url=url, api_key="vk_demo_anthropic", max_retries=0)
        assert client.messages.count_tokens(model="claude-sonnet-4-6", messages=hello).input_tokens > 0

    def embeddings(_: str) -> None:
        plain = oai.embeddings.create(model="text-embedding-3-small", input=["one", "two"], encoding_format="float")
        encoded = oai.embeddings.create(model="text-embedding-3-small", input=["one", "two"])  # the SDK asks for base64
        assert [len(e.embedding) for e in plain.data] == [8, 8] and plain.data[0].embedding != plain.data[1].embedding
        for as_base64, as_floats in zip(encoded.data, plain.data):  # float32 on the wire
            assert as_base64.embedding == pytest.approx(as_floats.embedding, abs=1e-6)
        assert plain.usage.prompt_tokens > 0

    def responses(_: str) -> None:
        made = oai.responses.create(model="gpt-4o-mini", input="hello there")
        assert made.output_text.startswith("[demo] openai model gpt-4o-mini") and made.usage.output_tokens > 0
        with oai.responses.stream(model="gpt-4o-mini", input="hello there") as stream:
            assert stream.get_final_response().output_text == made.output_text
        assert oai.responses.retrieve(made.id).output_text == made.output_text
        assert [item.id for item in oai.responses.input_items.list(made.id)] == ["msg_in1"]
        oai.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            oai.responses.retrieve(made.id)

    def models(_: str) -> None:
        limited = openai.OpenAI(base_url=url + "/v1", api_key="vk_demo_limited", max_retries=0)
        assert [m.id for m in limited.models.list()] == ["gpt-4o-mini"]

    def health(path: str) -> None:
        with urllib.request.urlopen(url + path, timeout=10) as r:
            assert r.status == 200

    checks = {"/v1/chat/completions": lambda p: chat(p).startswith("[demo] openai"),
              "/chat/completions": lambda p: chat(p).startswith("[demo] openai"),
              "/v1/messages": messages, "/v1/messages/count_tokens": count_tokens, "/v1/embeddings": embeddings,
              "/v1/responses": responses, "/v1/models": models, "/health": health}
    assert len(listed) >= 8 and listed <= checks.keys(), listed - checks.keys()
    for path in sorted(listed):
        assert checks[path](path) is not False, path
    assert " 404 " not in running_demo.output and "from provider" not in running_demo.output


def test_demo_web_prints_a_link_that_logs_in_to_mitmweb(tmp_path):
    d = Demo(tmp_path, "web")
    try:
        d.wait_for("Ctrl-C stops")
        [link] = re.findall(rf"http://127\.0\.0\.1:{d.web_port}/\?token=\S+", d.output)
        cookies = urllib.request.HTTPCookieProcessor()
        browser = urllib.request.build_opener(cookies)
        with browser.open(link, timeout=10) as r:
            assert r.status == 200
        with browser.open(f"http://127.0.0.1:{d.web_port}/flows", timeout=10) as r:  # the cookie it set
            assert r.status == 200 and isinstance(json.loads(r.read()), list)
        with pytest.raises(urllib.error.HTTPError) as e:  # no cookie, no token: the login page
            urllib.request.urlopen(f"http://127.0.0.1:{d.web_port}/flows", timeout=10)
        assert e.value.code == 403
        assert d.stop(signal.SIGTERM) == 0
    finally:
        d.kill()
    assert "Traceback" not in d.output


@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGHUP, False)],
                         ids=["SIGTERM (kill PID)", "SIGINT (Ctrl-C: the group)", "SIGHUP (terminal gone)"])
def test_the_demo_stops_cleanly(tmp_path, sig, group):
    d = Demo(tmp_path)
    try:
        d.wait_for("Ctrl-C stops")
        gateway = d.gateway_pid()
        assert [p.name for p in tmp_path.glob("gateway-demo-*")], "the demo's directory is not where the test looks"
        assert listening(d.port)
        code = d.stop(sig, group)
    finally:
        d.kill()
    deadline = time.monotonic() + 10  # the gateway is gone before the demo exits; allow for /proc
    while alive(gateway) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(gateway):
        os.kill(gateway, signal.SIGKILL)  # not left behind by a failing test
        pytest.fail(f"the gateway (pid {gateway}) outlived the demo")
    assert not listening(d.port)
    assert list(tmp_path.glob("gateway-demo-*")) == []
    assert "Traceback" not in d.output, d.output
    assert code == 0


class SlowHealth(BaseHTTPRequestHandler):
    """A gateway whose start-up holds the first request 1.5 s (a cold start: the port accepts
    before mitmproxy has loaded the gateway)."""
    protocol_version = "HTTP/1.1"
    seen: list[float] = []

    def do_GET(self) -> None:
        SlowHealth.seen.append(time.monotonic())
        if len(SlowHealth.seen) == 1:
            time.sleep(1.5)
        try:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except OSError:
            SlowHealth.seen.append(-1)  # the prober had gone: what the gateway logged as `0 failed GET /health`

    def log_message(self, *args) -> None:
        pass


def test_the_start_up_probe_waits_for_a_slow_first_answer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    SlowHealth.seen = []

    class Running:
        def poll(self):
            return None
    try:
        assert demo.wait_healthy(f"http://127.0.0.1:{server.server_address[1]}", Running(), timeout=20)
        time.sleep(0.2)
        assert len(SlowHealth.seen) == 1, "the probe gave up on a request the gateway then answered"
    finally:
        server.shutdown()
        server.server_close()
