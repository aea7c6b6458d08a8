"""Recording's pure parts (addon/recording/recorder.py, replay.py): marking keys, comparing, the
snapshot, the replay refusal. Recording, replay and mitmweb with real processes:
tests/e2e/test_recording.py."""

from __future__ import annotations

import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from addon.recording import replay
from addon.wire.secrets import fingerprint
from addon.recording.recorder import Snapshot, scrub
from addon.wire.secrets import unmark
from addon.wire.secrets import mark



def test_mark_and_unmark_round_trip():
    marked = mark("Bearer vk_secret")
    assert marked == f"Bearer vkfp:{fingerprint('vk_secret')}"
    assert unmark(marked, {fingerprint("vk_secret"): "vk_secret"}) == "Bearer vk_secret"
    assert unmark(marked, {}) == marked  # unknown fingerprint: stays marked, the gateway answers 401
    assert mark("vk_raw") == f"vkfp:{fingerprint('vk_raw')}"



def test_scrub_marks_keys_but_keeps_redacted_and_marked_values():
    headers = http.Headers(authorization="Bearer vk_a", x_api_key="REDACTED")
    scrub(headers)
    assert headers["authorization"] == mark("Bearer vk_a") and headers["x-api-key"] == "REDACTED"
    scrub(headers)
    assert headers["authorization"] == mark("Bearer vk_a")



def test_compare_ignores_only_volatile_fields():
    assert (
        replay.first_diff(replay.normalize({"created": 1, "a": [1]}), replay.normalize({"created": 2, "a": [1]}))
        is None
    )
    assert replay.first_diff({"a": [1, {"b": "x"}]}, {"a": [1, {"b": "y"}]}) == ".a[1].b: 'x' != 'y'"
    assert "missing" in replay.first_diff({"a": 1, "id": "x"}, {"a": 1})



@pytest.mark.parametrize(
    "api, shape", [("anthropic_messages", "anthropic"), ("openai_chat", "openai"), (None, "openai")]
)
def test_a_replay_without_a_client_request_is_refused_in_the_clients_api_shape(api, shape):
    """The flow's path is the provider's by now (an Anthropic /v1/messages client routed to
    OpenAI shows /v1/chat/completions): the 409 takes the shape of the API the client spoke."""
    flow = tflow.tflow()
    flow.request.path = "/v1/chat/completions"
    flow.is_replay = "request"
    if api:
        flow.metadata["gateway"] = {"api": api}
    Snapshot().request(flow)
    assert flow.response.status_code == 409
    body = json.loads(flow.response.content)
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert "no recorded client request" in body["error"]["message"]
    else:
        assert body["error"]["code"] == "not_replayable" and body["error"]["type"] == "invalid_request_error"



def test_snapshot_keeps_client_requests_only_when_recording_or_asked():
    from mitmproxy.test import taddons, tflow
    from addon.recording.recorder import Recorder, Snapshot

    snapshot, recorder = Snapshot(), Recorder()
    with taddons.context(snapshot, recorder) as tctx:
        f = tflow.tflow()
        snapshot.request(f)
        assert "record" not in f.metadata  # plain service: no copy per request
        tctx.configure(snapshot, replayable_flows=True)
        f = tflow.tflow()
        f.request.headers["authorization"] = "Bearer vk_secret_client_key"
        snapshot.request(f)
        kept = f.metadata["record"]["client_request"]
        assert ["authorization", f"Bearer vkfp:{fingerprint('vk_secret_client_key')}"] in kept["headers"]
