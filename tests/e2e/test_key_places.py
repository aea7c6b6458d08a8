"""Every place a client may put its key is treated as a key (wire/keyplaces.py): `Authorization`,
`x-api-key`, `api-key` (Azure's SDK), `x-goog-api-key` (Gemini's), the query's `key=`/`api_key=`
and a cookie. Each is recognised, never reaches the provider, and is in clear nowhere the run
writes: mitmweb's flows and views, the recording, the log.

Before: a key in `api-key` or `x-goog-api-key` was not recognised (401) yet kept verbatim in
recordings, and one in `?key=` reached the provider.
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import quote

import pytest

from tests import rawhttp
from tests.e2e.test_mitmweb_secrets import REAL, VIRTUAL, Mitmweb

pytestmark = pytest.mark.e2e

WRONG = "vk_wrong_guess_in_a_place_31337"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
# place -> (query string, headers) carrying `key`
PLACES = {
    "authorization": lambda key: ("", {"authorization": f"Bearer {key}"}),
    "x-api-key": lambda key: ("", {"x-api-key": key}),
    "api-key": lambda key: ("", {"api-key": key}),
    "x-goog-api-key": lambda key: ("", {"x-goog-api-key": key}),
    "query key": lambda key: (f"key={key}&trace=1", {}),
    "query api_key": lambda key: (f"trace=2&api_key={quote(key)}", {}),
    "cookie key": lambda key: ("", {"cookie": f"theme=dark; key={key}"}),
    "cookie api_key": lambda key: ("", {"cookie": f"api_key={key}"}),
}


@pytest.fixture
def web(provider, tmp_path):
    recording = tmp_path / "flows.mitm"
    proc = Mitmweb(provider.url, "--set", f"record_file={recording}", "--set", "view_filter=",
                   "--set", "replayable_flows=true")
    proc.recording = recording
    yield proc
    proc.stop()


def send(web, place: str, key: str) -> rawhttp.RawResponse:
    query, headers = PLACES[place](key)
    return rawhttp.request(
        f"http://127.0.0.1:{web.port}",
        "POST",
        "/v1/chat/completions" + (f"?{query}" if query else ""),
        json=BODY,
        headers={"content-type": "application/json", **headers},
    )


def written(web) -> str:
    """Everything the run wrote that a person or program reads later: the log, the recording,
    mitmweb's flow list and each flow's views."""
    texts = [web.output.decode(errors="replace"), web.recording.read_bytes().decode("latin-1")]
    flows = web.api.get("/flows").json()
    texts.append(json.dumps(flows))
    for flow in flows:
        for part in ("request", "response"):
            texts.append(web.api.get(f"/flows/{flow['id']}/{part}/content.data").content.decode(errors="replace"))
            texts.append(web.api.get(f"/flows/{flow['id']}/{part}/content/auto.json").content.decode(errors="replace"))
    return "\n".join(texts)


def test_every_place_of_a_key_is_recognised_removed_and_redacted(web, provider):
    for place in PLACES:
        answer = send(web, place, VIRTUAL)
        assert answer.status_code == 200, (place, answer.content[:300])
        got = provider.received[-1]
        assert got.headers["authorization"] == f"Bearer {REAL}", place
        seen = json.dumps(got.headers) + got.path + got.body.decode()
        assert VIRTUAL not in seen and quote(VIRTUAL) not in seen, (place, got.headers, got.path)
        assert not {"x-api-key", "api-key", "x-goog-api-key", "cookie"} & set(got.headers), (place, got.headers)
        assert "key=" not in got.path, (place, got.path)  # the key parameter went nowhere...
        if place.startswith("query"):
            assert "trace=" in got.path, got.path  # ...the rest of the query did
    assert len(provider.received) == len(PLACES)
    for place in PLACES:  # a wrong key in each place: refused, and not written either
        assert send(web, place, WRONG).status_code == 401, place
    assert len(provider.received) == len(PLACES)

    # mitmweb's Replay: the recorded client request, the key's place included, routed again
    flows = [f for f in web.api.get("/flows").json() if f["response"] and f["response"]["status_code"] == 200]
    assert len(flows) == len(PLACES)
    for flow in flows:
        assert web.api.post(f"/flows/{flow['id']}/replay").status_code == 200
    deadline = time.monotonic() + 30
    while len(provider.received) < 2 * len(PLACES) and time.monotonic() < deadline:
        time.sleep(0.1)
    replays = provider.received[len(PLACES):]
    assert len(replays) == len(PLACES)
    assert all(r.headers["authorization"] == f"Bearer {REAL}" and "key=" not in r.path for r in replays)

    # a client that hangs up mid-headers: mitmproxy logs what it got, keys masked
    for head in (f"POST /v1/chat/completions?key={WRONG} HTTP/1.1\r\nHost: x\r\n",
                 f"POST /v1/chat/completions HTTP/1.1\r\nx-goog-api-key: {WRONG}\r\nCookie: api_key={WRONG}\r\n"):
        with socket.create_connection(("127.0.0.1", web.port), timeout=5) as s:
            s.sendall(head.encode())
            time.sleep(0.3)
    time.sleep(1)
    text = written(web)
    assert "before completing request headers" in text
    for secret in (VIRTUAL, quote(VIRTUAL), WRONG, REAL):
        assert secret not in text, secret


def test_the_markers_stand_where_the_keys_were(web, provider):
    """What a mitmweb user sees instead: the key's fingerprint marker, in the same place."""
    for place in ("api-key", "x-goog-api-key", "query key", "cookie key"):
        assert send(web, place, VIRTUAL).status_code == 200
    flows = web.api.get("/flows").json()
    headers = [dict((k.lower(), v) for k, v in f["request"]["headers"]) for f in flows]
    # the flow's request went upstream: its key headers are gone; the client's side is in the view
    views = [web.api.get(f"/flows/{f['id']}/request/content/auto.json").json()["text"] for f in flows]
    assert any("api-key: vkfp:" in v for v in views), views[0][:2000]
    assert any("x-goog-api-key: vkfp:" in v for v in views)
    assert any("?key=vkfp:" in v for v in views)
    assert any("cookie: theme=vkfp:" in v and "; key=vkfp:" in v for v in views)  # every cookie's value
    assert all("cookie" not in h for h in headers)
    assert VIRTUAL not in json.dumps(flows) + "".join(views)
