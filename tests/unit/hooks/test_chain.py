"""AddonChain: the gateway's addons as one mitmproxy addon (addon/hooks/chain.py)."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import ctx, exceptions
from mitmproxy.test import taddons, tflow

from addon.hooks.chain import AddonChain


class Part:
    def __init__(self, name: str, calls: list, fail: str | None = None) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def load(self, loader) -> None:
        loader.add_option(f"{self.name}_opt", int, 1, "a test option")

    def configure(self, updated) -> None:
        self.calls.append((self.name, "configure"))
        if self.fail == "configure" and f"{self.name}_opt" in updated:
            raise exceptions.OptionsError(f"bad {self.name}_opt")

    def request(self, flow) -> None:
        self.calls.append((self.name, "request"))
        if self.fail == "request":
            raise RuntimeError("boom")


class ResponseOnly:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def response(self, flow) -> None:
        self.calls.append(("response-only", "response"))


def test_flow_hooks_run_in_chain_order_and_a_failing_part_does_not_stop_the_rest(caplog):
    calls: list = []
    chain = AddonChain(Part("a", calls, fail="request"), ResponseOnly(calls), Part("b", calls))
    with taddons.context(chain):
        calls.clear()
        with caplog.at_level(logging.ERROR, logger="gateway"):
            chain.request(tflow.tflow())
        chain.response(tflow.tflow())
    assert calls == [("a", "request"), ("b", "request"), ("response-only", "response")]
    assert "request hook of Part failed" in caplog.text


def test_hooks_no_part_has_are_not_offered_to_mitmproxy():
    chain = AddonChain(ResponseOnly([]))
    assert chain.request is None and chain.error is None and chain.responseheaders is None
    assert callable(chain.response)


def test_options_of_every_part_are_declared_and_configure_errors_reach_mitmproxy():
    calls: list = []
    chain = AddonChain(Part("a", calls), Part("b", calls, fail="configure"))
    with taddons.context(chain) as tctx:
        assert tctx.options.a_opt == 1 and tctx.options.b_opt == 1
        tctx.options.update(a_opt=2)
        assert ("a", "configure") in calls
        with pytest.raises(exceptions.OptionsError, match="bad b_opt"):
            tctx.options.update(b_opt=3)
        assert tctx.options.b_opt == 1  # mitmproxy rolled the change back


def test_the_gateway_script_gives_mitmproxy_one_addon():
    from addon import gateway

    assert len(gateway.addons) == 1 and isinstance(gateway.addons[0], AddonChain)
    names = [type(part).__name__ for part in gateway.addons[0].parts]
    # Snapshot must see the client request before the Gateway rewrites it, Recorder the final flow
    assert names.index("Snapshot") < names.index("Gateway") < names.index("Recorder")


class Switchable(ResponseOnly):
    def __init__(self, calls: list) -> None:
        super().__init__(calls)
        self.active = False

    def load(self, loader) -> None:
        loader.add_option("switch", bool, False, "a test option")

    def configure(self, updated) -> None:
        self.active = ctx.options.switch


def test_an_inactive_part_gets_no_flow_hooks_until_configure_activates_it():
    calls: list = []
    chain = AddonChain(Switchable(calls))
    with taddons.context(chain) as tctx:
        chain.response(tflow.tflow())
        assert calls == []
        tctx.options.update(switch=True)
        chain.response(tflow.tflow())
        assert calls == [("response-only", "response")]
        tctx.options.update(switch=False)
        chain.response(tflow.tflow())
        assert len(calls) == 1


def test_the_recorder_is_only_in_the_chain_while_recording(tmp_path):
    from addon.recording.recorder import Recorder

    recorder = Recorder()
    chain = AddonChain(recorder)
    with taddons.context(chain) as tctx:
        assert recorder.response not in chain.hooks["response"]
        tctx.options.update(record_file=str(tmp_path / "flows"))
        assert recorder.response in chain.hooks["response"]
