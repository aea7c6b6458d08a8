"""mitmweb in a real browser (headless Chromium): `./run.sh demo web`, real traffic through the
gateway, then the rendered page: the flow list's columns and comments, both sides of a flow, a
stream event by event, why a refused flow was refused, and no secret anywhere on the page.

A second mitmweb (`./run.sh web` on a keys file with guardrail sets, the fake provider of
tests/fakeprovider.py behind it) shows where secrets were masked or why a request was blocked,
and never the secret itself.

Screenshots: SCREENSHOTS=/some/dir ./run.sh test -m browser (else they go to pytest's tmp dir).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import openai
import pytest

from tests.conftest import ROOT, free_port
from tests.fakeprovider import FakeProvider, Received, Reply, openai_completion, openai_stream

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "pw-browser-test-4242"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (Debian package chromium; .ci/run installs it)"
    ),
]
# secrets of the demo: provider keys (demo/provider.py KEYS), virtual keys, the UI password
SECRETS = ("not-a-real-key", "sk-demo-revoked-key", "vk_demo_openai", "vk_demo_anthropic", "vk_demo_limited",
           "vk_demo_failover", "vk_wrong_key", PASSWORD)


@pytest.fixture(scope="module")
def demo_web(tmp_path_factory):
    """./run.sh demo web, with the flows the tests look at already made through the gateway."""
    home = tmp_path_factory.mktemp("home")
    gateway_port, web_port = free_port(), free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "GATEWAY_PORT": str(gateway_port),
           "WEB_PORT": str(web_port), "WEB_PASSWORD": PASSWORD}
    proc = subprocess.Popen([str(ROOT / "run.sh"), "demo", "web"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if "Ctrl-C stops" in line:
            break
    else:
        pytest.fail("./run.sh demo web did not start:\n" + "".join(output))

    def client(key):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=key, max_retries=0)
    client("vk_demo_openai").chat.completions.create(
        model="gpt-4o-mini", temperature=0.3, messages=[{"role": "user", "content": "Hello from the browser test"}])
    client("vk_demo_openai").models.list()  # answered by the gateway itself
    stream = client("vk_demo_anthropic").chat.completions.create(
        model="claude-sonnet-4-6", stream=True,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Stream a haiku"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).startswith("[demo] anthropic")
    with pytest.raises(openai.PermissionDeniedError):
        client("vk_demo_limited").chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    failover = client("vk_demo_failover").chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    assert failover.headers["x-gateway-attempts"] == "2"
    with pytest.raises(openai.AuthenticationError):
        client("vk_wrong_key_0000").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]
        )
    yield {"web": f"http://127.0.0.1:{web_port}/", "gateway_port": gateway_port}
    stop_web(proc)


def stop_web(proc: subprocess.Popen) -> None:
    """Ctrl-C to `./run.sh web`'s process group, as a user stops it; SIGKILL after 20 s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    path = Path(os.environ["SCREENSHOTS"]) if os.environ.get("SCREENSHOTS") else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def logged_in(browser, url: str, password: str, last_comment: str):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(15_000)
    page.goto(url)
    page.fill("input[name=token]", password)  # mitmweb's login form
    page.click("input[type=submit]")
    page.locator(".flow-table td.col-comment", has_text=last_comment).wait_for()
    return page


@pytest.fixture(scope="module")
def page(demo_web, browser):
    page = logged_in(browser, demo_web["web"], PASSWORD, "refused 401")
    yield page
    page.close()


def row(page, comment: str):
    return page.locator(".flow-table tbody tr", has=page.locator("td.col-comment", has_text=comment))


def open_tab(page, comment: str, tab: str) -> str:
    row(page, comment).click()
    page.locator(".flow-detail nav a, .flow-detail .nav-tabs a", has_text=tab).first.click()
    view = page.locator(".flow-detail .contentview")
    view.wait_for()
    page.wait_for_function("() => !document.querySelector('.flow-detail .contentview').innerText.includes('Loading')")
    return view.inner_text()


def assert_no_secret(page):
    html = page.content()
    leaked = [s for s in SECRETS if s in html]
    assert not leaked, f"on the page: {leaked}"


def test_the_flow_list_renders_columns_comments_and_plain_markers(page, shots):
    headers = [h.strip() for h in page.locator(".flow-table thead th").all_inner_texts() if h.strip()]
    assert headers[:7] == ["#", "Method", "Path", "Status", "Size", "Time", "Comment"] or \
        headers[:7] == ["#", "Meth…", "Path", "Status", "Size", "Time", "Comment"], headers
    comments = page.locator(".flow-table td.col-comment").all_inner_texts()
    # which key went to which provider and model, and how a refusal or failover ended
    assert "demo-openai -> openai gpt-4o-mini" in comments
    assert "demo-anthropic -> anthropic claude-sonnet-4-6" in comments
    assert "demo-limited -> openai gpt-4o · refused 403 model_not_allowed" in comments
    assert "demo-failover -> anthropic claude-haiku-4-5 (fallback, attempt 2)" in comments
    assert "refused 401 invalid_api_key" in comments
    # ... all of it in view, on this screen and on a laptop's: no comment is cut off (mitmweb's
    # own column is 150 px, about 20 characters)
    for width in (1600, 1280):
        page.set_viewport_size({"width": width, "height": 1000})
        cut = page.evaluate("""() => [...document.querySelectorAll('.flow-table td.col-comment')]
            .filter(td => td.scrollWidth > td.clientWidth).map(td => td.innerText)""")
        assert not cut, (width, cut)
    page.set_viewport_size({"width": 1600, "height": 1000})
    assert row(page, "refused 403").locator("td.col-status").inner_text().strip() == "403"
    # markers from plain fonts (DejaVu has ✖): Debian's Chromium has no emoji font
    assert row(page, "refused 403").locator(".marker").inner_text() == "✖"
    page.screenshot(path=str(shots / "mitmweb-list.png"))
    assert_no_secret(page)


def test_the_path_column_shows_what_the_client_called_at_the_gateways_address(page, demo_web):
    gateway = f"http://127.0.0.1:{demo_web['gateway_port']}"

    def path(cell: str) -> str:
        return cell.split()[-1]  # (after a refusal's marker)
    paths = [path(p) for p in page.locator(".flow-table td.col-path").all_inner_texts()]
    assert paths and all(p.startswith(gateway + "/") for p in paths), paths  # never the provider, never 127.0.0.1:1
    for comment in ("demo-openai -> openai", "demo-failover", "refused 401", "refused 403"):
        assert path(row(page, comment).locator("td.col-path").inner_text()) == gateway + "/v1/chat/completions", comment
    assert gateway + "/v1/models" in paths  # answered by the gateway itself
    assert gateway + "/health" in paths  # the demo's start-up probe


def test_the_page_with_the_wider_comment_column_still_asks_for_the_password(demo_web):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(demo_web["web"], timeout=10)
    assert refused.value.code == 403 and b'name="token"' in refused.value.read()  # the login form
    request = urllib.request.Request(demo_web["web"], headers={"authorization": f"Bearer {PASSWORD}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert b"th.col-comment" in r.read()


def test_a_flow_shows_the_client_request_beside_the_upstream_one(page, shots):
    text = open_tab(page, "demo-openai -> openai", "Request")
    client = text.index("CLIENT → GATEWAY   POST /v1/chat/completions")
    upstream = text.index("GATEWAY → PROVIDER (openai)   POST http://127.0.0.1:")
    assert client < upstream
    assert '"content": "Hello from the browser test"' in text[client:upstream]  # the body as the client sent it
    assert '"temperature": 0.3' in text[client:upstream]
    assert "authorization: Bearer vkfp:" in text[client:upstream]  # the client's key as a fingerprint
    assert "+ authorization: REDACTED" in text[upstream:]  # what the gateway changed
    page.screenshot(path=str(shots / "mitmweb-request-both-sides.png"), full_page=True)
    text = open_tab(page, "demo-openai -> openai", "Response")
    provider, client = text.index("PROVIDER (openai) → GATEWAY   200"), text.index("GATEWAY → CLIENT   200")
    assert provider < client and text.count("[demo] openai model gpt-4o-mini") == 2
    assert_no_secret(page)


def test_a_stream_is_shown_event_by_event_on_both_sides(page, shots):
    text = open_tab(page, "demo-anthropic -> anthropic", "Response")
    provider = text.index("PROVIDER (anthropic) → GATEWAY   200")
    client = text.index("GATEWAY → CLIENT   200")
    upstream_events, client_events = text[provider:client], text[client:]
    assert "events, as they went over the wire:" in upstream_events
    for name in ("message_start", "content_block_start", "content_block_delta", "message_delta", "message_stop"):
        assert f" {name} " in upstream_events, name
    assert '"text_delta", "text": "[demo]"' in upstream_events
    assert '"object": "chat.completion.chunk"' in client_events  # translated to OpenAI chunks
    assert '"delta": {"content": "[demo]"}' in client_events
    assert re.search(r"\n#\d+ +\[DONE\]\n", client_events)
    page.screenshot(path=str(shots / "mitmweb-stream.png"), full_page=True)
    request = open_tab(page, "demo-anthropic -> anthropic", "Request")
    assert "GATEWAY → PROVIDER (anthropic)   POST http://127.0.0.1:" in request and "/anthropic/v1/messages" in request
    assert '"text": "Be brief."' in request and '"role": "system"' in request  # translated, beside the client's
    assert "+ x-api-key: REDACTED" in request
    assert_no_secret(page)


def test_a_refused_flow_shows_the_request_as_sent_and_why(page, shots, demo_web):
    text = open_tab(page, "refused 403", "Request")
    assert ("Answered by the gateway, never forwarded: 403 model_not_allowed — "
            "this virtual key may not use model 'gpt-4o'") in text
    assert f"CLIENT → GATEWAY   POST http://127.0.0.1:{demo_web['gateway_port']}/v1/chat/completions" in text
    assert "GATEWAY → PROVIDER" not in text
    detail = page.locator(".flow-detail").inner_text()
    assert "127.0.0.1:1/" not in detail  # not the unreachable placeholder
    page.screenshot(path=str(shots / "mitmweb-refused.png"), full_page=True)
    text = open_tab(page, "refused 401", "Response")
    assert "Answered by the gateway, never forwarded: 401 invalid_api_key — invalid virtual key" in text
    assert "x-gateway-error-source: gateway" in text
    assert_no_secret(page)


def test_a_failover_shows_the_fallback_that_answered_and_the_attempts(page, shots):
    """The first request of a key whose OpenAI key was revoked: mitmweb lists one flow, the
    answering attempt, says which target answered after how many attempts, and its view shows
    each attempt with its status and time."""
    text = open_tab(page, "demo-failover -> anthropic", "Request")
    assert "GATEWAY → PROVIDER (anthropic)   POST http://127.0.0.1:" in text and "/anthropic/v1/messages" in text
    assert '"model": "claude-haiku-4-5"' in text  # the fallback's model_map
    text = open_tab(page, "demo-failover -> anthropic", "Response")
    assert "x-gateway-attempts: 2" in text and "[demo] anthropic" in text
    assert row(page, "demo-failover").count() == 1  # the failed attempt is not a flow of its own...
    # ... but the view lists it, with its status and its time, before the attempt that answered
    clock = r"at \d\d:\d\d:\d\d\.\d{3}"
    assert "2 attempts:" in text
    assert re.search(
        r"1\. openai \(target 0\): 401 after [\d.]+ ms, " + clock + " — failed, the next target was tried", text
    ), text
    assert re.search(
        r"2\. anthropic \(target 1, fallback\): answered 200 after [\d.]+ ms, " + clock + " — this flow", text
    ), text
    page.screenshot(path=str(shots / "mitmweb-failover.png"), full_page=True)
    assert_no_secret(page)


def test_reading_every_body_through_the_ui_api_never_fails(page):
    """The raw body endpoint (Download) of every flow, streamed ones included, answers 200."""
    statuses = page.evaluate("""async () => {
        const flows = await (await fetch('./flows')).json();
        const out = [];
        for (const f of flows) for (const part of ['request', 'response']) {
            out.push((await fetch(`./flows/${f.id}/${part}/content.data`)).status);
        }
        return out;
    }""")
    assert statuses and set(statuses) == {200}, statuses


# --- guardrails -------------------------------------------------------------------------------

GUARD_PASSWORD = "pw-browser-guard-7070"
AWS_IN = "AKIA" + "Q2W3E4R5T6Y7U8I9"  # a fake AWS access key id the client sends
EMAIL_IN = "grace.hopper@example.org"
AWS_OUT = "AKIA" + "ZXCVBNMASDFGHJKL"  # and one the provider answers, cut across stream events
EMAIL_OUT = "alan.turing@example.net"
ORIGINALS = (AWS_IN, EMAIL_IN, AWS_OUT, EMAIL_OUT)
GUARD_KEYS = {
    "vk_browser_guard_mask": {"provider": "openai", "api_key": "sk-browser-guard-real-1", "name": "guard-mask",
                              "guardrails": "default"},
    "vk_browser_guard_block": {"provider": "openai", "api_key": "sk-browser-guard-real-2", "name": "guard-block",
                               "guardrails": "strict"},
}
GUARD_SECRETS = (*ORIGINALS, *GUARD_KEYS, *(k["api_key"] for k in GUARD_KEYS.values()), GUARD_PASSWORD)
ANSWER = f"Rotate {AWS_OUT} and tell {EMAIL_OUT}."


def answer_with_secrets(req: Received) -> Reply:
    body = req.json()
    if body.get("stream"):  # the access key id cut in three events, the address in two
        cuts = [ANSWER.index(AWS_OUT) + 3, ANSWER.index(AWS_OUT) + 11, ANSWER.index(EMAIL_OUT) + 6]
        bounds = [0, *cuts, len(ANSWER)]
        return Reply.sse(openai_stream(body, [ANSWER[a:b] for a, b in zip(bounds, bounds[1:])]))
    return Reply.json(openai_completion(body, ANSWER))


@pytest.fixture(scope="module")
def guard_web(tmp_path_factory):
    """./run.sh web with a `mask` key whose set masks answers too and a `block` key, the fake
    provider behind both, and three flows made: masked (plain and streamed) and blocked."""
    provider = FakeProvider(answer_with_secrets).start()
    home = tmp_path_factory.mktemp("guardhome")
    keys = home / "keys.json"
    keys.write_text(json.dumps({
        "providers": {"openai": {"base_url": provider.url + "/v1"}},
        "guardrails": {
            "default": {"detect": ["secrets", "emails"], "action": "mask", "responses": "mask"},
            "strict": {"detect": ["secrets", "emails"], "action": "block"}},
        "virtual_keys": GUARD_KEYS}))
    gateway_port, web_port = free_port(), free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "GATEWAY_PORT": str(gateway_port),
           "WEB_PORT": str(web_port), "WEB_PASSWORD": GUARD_PASSWORD, "KEYS_FILE": str(keys),
           "USAGE_DB": str(home / "usage.sqlite3"), "PYTHONUNBUFFERED": "1"}  # (its lines as they come)
    proc = subprocess.Popen([str(ROOT / "run.sh"), "web"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    give_up = threading.Timer(60, os.killpg, (proc.pid, signal.SIGKILL))  # the wait below is bounded
    give_up.start()
    for line in proc.stdout:
        output.append(line)
        seen = "".join(output)
        if f"listening at 127.0.0.1:{gateway_port}" in seen and "Web server listening at" in seen:
            break
    give_up.cancel()
    if proc.poll() is not None:
        provider.stop()
        pytest.fail("./run.sh web did not start:\n" + "".join(output))

    def client(key):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=key, max_retries=0, timeout=20)
    try:
        masked = client("vk_browser_guard_mask").chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"deploy with {AWS_IN}, mail {EMAIL_IN}"}])
        assert masked.headers["x-gateway-guardrails"] == "masked=emails:1,secrets:1"
        assert masked.parse().choices[0].message.content == "Rotate [REDACTED:secrets] and tell [REDACTED:emails]."
        assert provider.received[0].json()["messages"][0]["content"] == \
            "deploy with [REDACTED:secrets], mail [REDACTED:emails]"
        stream = client("vk_browser_guard_mask").chat.completions.create(
            model="gpt-4.1", stream=True, messages=[{"role": "user", "content": "stream it"}])
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "Rotate [REDACTED:secrets] and tell [REDACTED:emails]."
        with pytest.raises(openai.BadRequestError) as blocked:
            client("vk_browser_guard_block").chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"key {AWS_IN} for {EMAIL_IN}"}])
        assert blocked.value.code == "content_blocked"
        assert len(provider.received) == 2  # the blocked one never went out
        yield {"web": f"http://127.0.0.1:{web_port}/", "gateway_port": gateway_port}
    finally:
        stop_web(proc)
        provider.stop()


@pytest.fixture(scope="module")
def guard_page(guard_web, browser):
    page = logged_in(browser, guard_web["web"], GUARD_PASSWORD, "content_blocked")
    yield page
    page.close()


def assert_no_original(page):
    """Neither the page's HTML nor its text holds a secret of the run, whole or cut (a secret the
    provider streamed in pieces could be on the page in those pieces)."""
    html, text = page.content(), page.locator("body").inner_text()
    for secret in GUARD_SECRETS:
        assert secret not in html and secret not in text, secret
    for secret in ORIGINALS:
        for piece in (secret[:8], secret[-8:]):
            assert piece not in html and piece not in text, piece


def test_a_masked_flow_shows_where_guardrails_masked_and_never_the_secret(guard_page, shots):
    page = guard_page
    comments = page.locator(".flow-table td.col-comment").all_inner_texts()
    assert row(page, "guardrails masked=emails:1,secrets:1").count() == 1, comments  # (the stream sent none)
    comment = row(page, "guardrails masked=").locator("td.col-comment").inner_text()
    assert "guard-mask -> openai gpt-4o-mini" in comment, comment
    text = open_tab(page, "guardrails masked=", "Request")
    assert ("Guardrails (default):\n  masked in the request: 1 emails, 1 secrets\n    at messages[0].content\n"
            "  masked in the answer: 1 emails, 1 secrets") in text, text
    client = text.index("CLIENT → GATEWAY   POST /v1/chat/completions")
    upstream = text.index("GATEWAY → PROVIDER (openai)   POST http://127.0.0.1:")
    # both sides hold the masked request: the guard ran before anything kept it
    masked = '"content": "deploy with [REDACTED:secrets], mail [REDACTED:emails]"'
    assert masked in text[client:upstream] and masked in text[upstream:]
    assert_no_original(page)
    page.screenshot(path=str(shots / "mitmweb-guardrails-request.png"), full_page=True)
    text = open_tab(page, "guardrails masked=", "Response")
    provider, client = text.index("PROVIDER (openai) → GATEWAY   200"), text.index("GATEWAY → CLIENT   200")
    assert text.count("Rotate [REDACTED:secrets] and tell [REDACTED:emails].") == 2  # both sides masked
    assert "x-gateway-guardrails: masked=emails:1,secrets:1" in text[client:]
    assert "masked in the answer: 1 emails, 1 secrets" in text
    assert provider < client
    assert_no_original(page)


def test_a_masked_stream_shows_no_piece_of_the_secret_on_either_side(guard_page, shots):
    text = open_tab(guard_page, "gpt-4.1", "Response")
    assert "Guardrails (default):\n  masked in the answer: 1 emails, 1 secrets" in text, text
    assert "events, as they went over the wire:" in text
    client = text.index("GATEWAY → CLIENT   200")
    assert "[REDACTED:secrets]" in text[client:]
    guard_page.screenshot(path=str(shots / "mitmweb-guardrails-stream.png"), full_page=True)
    assert_no_original(guard_page)


def test_a_blocked_flow_names_detectors_and_places_without_the_text(guard_page, shots):
    page = guard_page
    text = open_tab(page, "content_blocked", "Response")
    message = "request blocked by guardrails (strict): emails, secrets in messages[0].content"
    assert f"Answered by the gateway, never forwarded: 400 content_blocked — {message}" in text, text
    assert "Guardrails (strict):\n  blocked: emails, secrets\n    at messages[0].content" in text
    assert "x-gateway-guardrails: blocked=emails,secrets" in text
    text = open_tab(page, "content_blocked", "Request")
    assert "GATEWAY → PROVIDER" not in text
    assert '"content": "key [REDACTED:secrets] for [REDACTED:emails]"' in text  # kept masked
    page.screenshot(path=str(shots / "mitmweb-guardrails-blocked.png"), full_page=True)
    assert_no_original(page)


def test_no_body_mitmweb_serves_holds_a_secret(guard_page):
    """What Download gives for every flow, both sides, and the flow list's JSON: no secret."""
    bodies = guard_page.evaluate("""async () => {
        const flows = await (await fetch('./flows')).json();
        const out = [JSON.stringify(flows)];
        for (const f of flows) for (const part of ['request', 'response']) {
            out.push(await (await fetch(`./flows/${f.id}/${part}/content.data`)).text());
        }
        return out;
    }""")
    assert len(bodies) == 1 + 2 * 3  # the three flows
    for body in bodies:
        for secret in GUARD_SECRETS:
            assert secret not in body, secret
