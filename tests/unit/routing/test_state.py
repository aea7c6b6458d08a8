"""addon/routing/state.py: a flow's FlowState is typed while the flow lives and a plain dict,
under the names recordings use, wherever mitmproxy saves or copies the flow."""

from __future__ import annotations

import io as bytes_io
from pathlib import Path

from mitmproxy import io

from addon.routing.state import SAVED, FlowState, state_of
from tests.unit.gateway.test_gateway import flow, gw  # noqa: F401 (fixture)

CORPUS = Path(__file__).resolve().parents[2] / "flows" / "corpus.mitm"


def test_a_routed_flow_is_saved_and_loaded_with_its_state(gw):  # noqa: F811
    f = flow()
    gw.request(f)
    state = f.metadata["gateway"]
    assert type(state) is FlowState and state.provider == "openai" and state.exchange is not None
    saved = f.get_state()["metadata"]["gateway"]  # what a recording, mitmweb's Save and a copy hold
    assert type(saved) is dict and "exchange" not in saved and "dropped" not in saved
    assert saved == {"key": state.key, "fingerprint": state.fingerprint, "provider": "openai",
                     "client_path": "/v1/chat/completions", "api": "openai_chat", "model": "gpt-4o", "stream": False}
    out = bytes_io.BytesIO()
    io.FlowWriter(out).add(f)  # tnetstring: refuses anything but plain values
    loaded = next(io.FlowReader(bytes_io.BytesIO(out.getvalue())).stream())
    assert type(loaded.metadata["gateway"]) is dict
    again = state_of(loaded)
    assert type(again) is FlowState and again.to_dict() == saved and loaded.metadata["gateway"] is again
    assert type(f.copy().metadata["gateway"]) is dict and f.metadata["gateway"] is state  # the live one stays


def test_the_recorded_corpus_reads_into_the_same_fields():
    with open(CORPUS, "rb") as file:
        flows = [f for f in io.FlowReader(file).stream() if "gateway" in f.metadata]
    assert flows
    for f in flows:
        recorded = f.metadata["gateway"]
        assert set(recorded) <= set(SAVED), set(recorded) - set(SAVED)  # no field of a recording is dropped
        assert state_of(f).to_dict() == {name: value for name, value in recorded.items() if value is not None}


def test_a_guardrails_record_is_saved_as_its_dict_and_read_back_typed(gw):  # noqa: F811
    from addon.guard.record import GuardRecord

    f = flow()
    gw.request(f)
    state = f.metadata["gateway"]
    state.guardrails = GuardRecord("default", "mask", masked={"secrets": 2}, where=["messages[0].content"],
                                   answer_masked={"emails": 1})
    saved = f.get_state()["metadata"]["gateway"]["guardrails"]
    assert saved == {"set": "default", "action": "mask", "masked": {"secrets": 2}, "where": ["messages[0].content"],
                     "answer_masked": {"emails": 1}}
    saved["masked"]["secrets"] = 9  # a copy's dict is its own
    assert state.guardrails.masked == {"secrets": 2}
    out = bytes_io.BytesIO()
    io.FlowWriter(out).add(f)
    loaded = next(io.FlowReader(bytes_io.BytesIO(out.getvalue())).stream())
    again = state_of(loaded).guardrails
    assert type(again) is GuardRecord and again.set_name == "default" and again.masked == {"secrets": 2}
    assert again.blocked is None and again.where == ["messages[0].content"] and again.answer_masked == {"emails": 1}
    assert state_of(f.copy()).guardrails.to_dict() == state.guardrails.to_dict()
