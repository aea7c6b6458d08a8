"""mitmweb in a real browser (headless Chromium): `./run.sh demo web`, real traffic through the
gateway, then the rendered page: the flow list's columns and comments, both sides of a flow, a
stream event by event, why a refused flow was refused, and no secret anywhere on the page.

Screenshots: SCREENSHOTS=/some/dir ./run.sh test -m browser (else they go to pytest's tmp dir).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import openai
import pytest

from tests.conftest import ROOT, free_port

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
def page(demo_web):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(15_000)
        page.goto(demo_web["web"])
        page.fill("input[name=token]", PASSWORD)  # mitmweb's login form
        page.click("input[type=submit]")
        page.locator(".flow-table td.col-comment", has_text="refused 401").wait_for()
        yield page
        browser.close()


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
