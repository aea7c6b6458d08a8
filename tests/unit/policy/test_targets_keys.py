"""The keys file's `targets` and `pools`: parsing, validation, labels, ids, served_model."""

import json
import runpy
import sys

import pytest

from addon.policy.keys import load_keys
from addon.policy.keys_parse import KeysError, parse_keys
from addon.policy.virtual_keys import Target, target_id
from tests.conftest import ROOT

KEY_A = "sk-real-target-aaaa-111111"
KEY_B = "sk-real-target-bbbb-222222"
KEY_C = "sk-ant-real-target-cccc-333333"
SECRETS = (KEY_A, KEY_B, KEY_C)


def team_alpha(**extra):
    return {"name": "team-alpha", "models": ["gpt-4o*"], "budget_usd": 50, "targets": [
        {"provider": "openai", "api_key": KEY_A, "weight": 3},
        {"provider": "openai", "api_key": KEY_B, "weight": 1, "base_url": "https://eu.example-proxy/v1"},
        {"provider": "anthropic", "api_key": KEY_C, "fallback": True,
         "model_map": {"gpt-4o": "claude-sonnet-4-6", "gpt-4o-mini": "claude-haiku-4-5"}},
    ], **extra}


def test_the_issue_example_parses_into_targets():
    vk = parse_keys({"virtual_keys": {"vk_team_alpha": team_alpha()}}).lookup("vk_team_alpha")
    assert vk.failover is True
    a, b, c = vk.targets
    assert (a.provider, a.api_key, a.upstream_url, a.weight, a.fallback, a.label) == (
        "openai", KEY_A, "https://api.openai.com/v1/chat/completions", 3.0, False, "0")
    assert (b.base_url, b.upstream_url, b.weight, b.label) == (
        "https://eu.example-proxy/v1", "https://eu.example-proxy/v1/chat/completions", 1.0, "1")
    assert (c.provider, c.upstream_url, c.fallback, c.label) == (
        "anthropic", "https://api.anthropic.com/v1/messages", True, "2")
    # the key's own endpoint fields are its first primary's: code reading them keeps working
    assert (vk.provider, vk.api_key, vk.base_url, vk.upstream_url) == (a.provider, KEY_A, a.base_url, a.upstream_url)
    # policy stays on the key
    assert vk.policy.models == ("gpt-4o*",) and vk.policy.budget_usd == 50
    # precomputed for pick(): primaries with cumulative weights, fallbacks in file order
    assert (vk.primaries, vk.cumulative, vk.fallbacks) == ((0, 1), (3.0, 4.0), (2,))


def test_a_classic_key_has_one_target_and_no_failover():
    vk = parse_keys({"providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1"}},
                     "virtual_keys": {"vk": {"provider": "openai", "api_key": KEY_A, "rpm": 5}}}).lookup("vk")
    assert vk.failover is False
    (t,) = vk.targets
    assert (t.provider, t.api_key, t.base_url, t.upstream_url, t.azure, t.label, t.weight, t.fallback) == (
        "openai", KEY_A, "http://127.0.0.1:9001/v1", "http://127.0.0.1:9001/v1/chat/completions", None, "0", 1.0, False)
    assert t.id == target_id("openai", "http://127.0.0.1:9001/v1", KEY_A)
    assert (vk.primaries, vk.cumulative, vk.fallbacks) == ((0,), (1.0,), ())


def test_targets_share_the_endpoint_parser_defaults_env_and_azure(monkeypatch):
    monkeypatch.setenv("GW_TEST_TARGET_KEY", KEY_B)
    store = parse_keys({
        "providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1"},
                      "azure": {"endpoint": "https://res.openai.azure.com", "api_version": "2024-10-21"}},
        "virtual_keys": {"vk": {"targets": [
            {"provider": "openai", "api_key": "env:GW_TEST_TARGET_KEY"},
            {"provider": "azure", "api_key": KEY_A, "deployment": "gpt4o-prod"},
            {"provider": "ollama", "fallback": True},
        ]}}})
    o, az, local = store.lookup("vk").targets
    assert (o.api_key, o.upstream_url) == (KEY_B, "http://127.0.0.1:9001/v1/chat/completions")
    assert az.azure.endpoint == "https://res.openai.azure.com" and az.base_url == az.azure.endpoint
    assert az.azure.url("/chat/completions", "gpt-4o") == (
        "https://res.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21")
    assert (local.api_key, local.upstream_url) == ("", "http://127.0.0.1:11434/v1/chat/completions")


def test_pools_are_shared_and_labelled_by_pool_name():
    store = parse_keys({
        "pools": {"openai-main": [{"provider": "openai", "api_key": KEY_A, "weight": 2},
                                  {"provider": "openai", "api_key": KEY_B}]},
        "virtual_keys": {"vk_1": {"name": "one", "targets": "openai-main", "rpm": 10},
                         "vk_2": {"name": "two", "targets": "openai-main"}}})
    one, two = store.lookup("vk_1"), store.lookup("vk_2")
    assert one.targets is two.targets  # the same Target objects: one parse, one cooldown name
    assert [t.label for t in one.targets] == ["openai-main[0]", "openai-main[1]"]
    assert [t.display for t in one.targets] == ["openai-main[0]", "openai-main[1]"]
    assert one.failover and one.policy.rpm == 10 and two.policy.rpm is None
    assert one.cumulative == (2.0, 3.0)


def test_target_ids_name_the_real_key_at_its_url():
    store = parse_keys({
        "pools": {"p": [{"provider": "openai", "api_key": KEY_A}]},
        "virtual_keys": {
            "vk_classic": {"provider": "openai", "api_key": KEY_A},
            "vk_list": {"targets": [{"provider": "openai", "api_key": KEY_B},
                                    {"provider": "openai", "api_key": KEY_A, "model": "gpt-4o-mini"}]},
            "vk_pool": {"targets": "p"},
            "vk_other_url": {"targets": [{"provider": "openai", "api_key": KEY_A, "base_url": "http://127.0.0.1:9/v1"}]},
        }})
    same = {
        store.lookup("vk_classic").targets[0].id,
        store.lookup("vk_list").targets[1].id,
        store.lookup("vk_pool").targets[0].id,
    }
    assert len(same) == 1  # the same real key at the same URL: whichever key or pool names it
    (only,) = same
    assert len(only) == 16 and set(only) <= set("0123456789abcdef")  # 16 hex digits
    assert only != store.lookup("vk_list").targets[0].id  # another real key
    assert only != store.lookup("vk_other_url").targets[0].id  # another URL
    assert all(secret not in only for secret in SECRETS)


def test_served_model():
    plain = Target("openai", KEY_A, "u", "u/c")
    mapped = Target("anthropic", KEY_C, "u", "u/m", model_map=(("gpt-4o", "claude-sonnet-4-6"),))
    fixed = Target("openai", KEY_B, "u", "u/c", model="gpt-4o-mini")
    assert plain.served_model("gpt-4o") == "gpt-4o"
    assert mapped.served_model("gpt-4o") == "claude-sonnet-4-6"
    assert mapped.served_model("o3") == "o3"  # not in the map: as requested
    assert fixed.served_model("gpt-4o") == fixed.served_model("o3") == "gpt-4o-mini"
    vk = parse_keys({"virtual_keys": {"vk": team_alpha()}}).lookup("vk")
    assert vk.targets[2].served_model("gpt-4o-mini") == "claude-haiku-4-5"
    assert vk.targets[2].model_map == (("gpt-4o", "claude-sonnet-4-6"), ("gpt-4o-mini", "claude-haiku-4-5"))


def test_no_real_key_in_repr_or_masked_form():
    vk = parse_keys({"virtual_keys": {"vk": team_alpha()}}).lookup("vk")
    shown = repr(vk) + str(vk) + "".join(repr(t) + str(t) for t in vk.targets)
    assert not any(secret in shown for secret in SECRETS)
    assert vk.targets[0].masked_key() == "sk-...111" and "sk-...111" in repr(vk.targets[0])


def test_secrets_yield_every_targets_real_key_and_summary_works():
    store = parse_keys({"pools": {"p": [{"provider": "openai", "api_key": KEY_A}]},
                        "virtual_keys": {"vk_t": team_alpha(), "vk_p": {"targets": "p"},
                                         "vk_c": {"provider": "deepseek", "api_key": KEY_B}}})
    secrets = set(store.secrets())
    assert set(SECRETS) <= secrets and {"vk_t", "vk_p", "vk_c"} <= secrets
    assert store.summary() == "3 virtual keys (openai 2, deepseek 1)"
    # the log redaction masks a fallback's real key, which is not the key's own api_key
    from addon.hooks.logredact import Secrets
    assert Secrets(store).redact(f"upstream said: bad key {KEY_C} (and {KEY_B})") == \
        "upstream said: bad key sk-...333 (and sk-...222)"


def bad(entry=None, **top):
    return {**top, "virtual_keys": {"vk_user_secret": entry if entry is not None else team_alpha()}}


def t(**fields):
    return {"provider": "openai", "api_key": KEY_A, **fields}


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            bad({"provider": "openai", "api_key": KEY_A, "targets": [t()]}),
            'virtual key \'vk_...ret\': "targets" and "api_key" exclude each other',
        ),
        (
            bad({"name": "n", "base_url": "http://x/v1", "targets": [t()]}),
            '\'n\': "targets" and "base_url" exclude each other',
        ),
        (
            bad({"name": "n", "endpoint": "https://r.openai.azure.com", "targets": [t()]}),
            '"targets" and "endpoint" exclude each other',
        ),
        (bad({"name": "n", "targets": []}), "'n': targets must be a non-empty list of targets"),
        (bad({"name": "n", "targets": {"provider": "openai"}}), "'n': targets must be a non-empty list of targets"),
        (bad({"name": "n", "targets": [KEY_A]}), '\'n\': targets[0] must be an object with "provider" and "api_key"'),
        (
            bad({"name": "n", "targets": [t(rpm=5)]}),
            "'n': targets[0]: unknown field 'rpm' (a target takes api_key, base_url, fallback, "
            "max_output_tokens, model, model_map, provider, weight and azure's fields; policy fields go on the key)",
        ),
        (bad({"name": "n", "targets": [t(), t(name="x")]}), "targets[1]: unknown field 'name'"),
        (bad({"name": "n", "targets": [t(weight=0)]}), "'n': targets[0]: weight must be a positive number"),
        (bad({"name": "n", "targets": [t(weight=-2)]}), "targets[0]: weight must be a positive number"),
        (bad({"name": "n", "targets": [t(weight="3")]}), "targets[0]: weight must be a positive number"),
        (bad({"name": "n", "targets": [t(weight=True)]}), "targets[0]: weight must be a positive number"),
        (bad({"name": "n", "targets": [t(weight=float("inf"))]}), "targets[0]: weight must be a positive number"),
        (bad({"name": "n", "targets": [t(), t(fallback=True, weight=2)]}), "targets[1]: a fallback has no weight"),
        (bad({"name": "n", "targets": [t(fallback="yes")]}), "targets[0]: fallback must be true or false"),
        (
            bad({"name": "n", "targets": [t(model_map=["gpt-4o"])]}),
            "targets[0]: model_map must map requested model names",
        ),
        (
            bad({"name": "n", "targets": [t(model_map={"gpt-4o": 4})]}),
            "targets[0]: model_map must map requested model names",
        ),
        (
            bad({"name": "n", "targets": [t(model_map={"gpt-4o": ""})]}),
            "targets[0]: model_map must map requested model names",
        ),
        (bad({"name": "n", "targets": [t(model=5)]}), "targets[0]: model must be a model name"),
        (
            bad({"name": "n", "targets": [t(model="a", model_map={"b": "c"})]}),
            "targets[0]: model and model_map exclude each other",
        ),
        (
            bad({"name": "n", "targets": [t(fallback=True), t(fallback=True)]}),
            "'n': targets: every target is a fallback; at least one must be a primary",
        ),
        (bad({"name": "n", "targets": [t(provider="nope")]}), "'n': targets[0]: unknown provider 'nope'"),
        (bad({"name": "n", "targets": [t(api_key=" ")]}), "'n': targets[0] has no \"api_key\""),
        (
            bad({"name": "n", "targets": [t(base_url="ftp://x")]}),
            "'n': targets[0]: base_url: 'ftp://x' is not an http(s) URL",
        ),
        (bad({"name": "n", "targets": [t(deployment="d")]}), "targets[0]: deployment is for provider azure only"),
        (bad({"name": "n", "targets": [t(provider="azure")]}), 'targets[0]: provider azure needs "endpoint"'),
        (
            bad({"name": "n", "targets": "openai-main"}),
            "'n': targets names pool 'openai-main', which does not exist (the file has no \"pools\")",
        ),
        (
            bad({"name": "n", "targets": "nope"}, pools={"p": [t()]}),
            "targets names pool 'nope', which does not exist (pools: p)",
        ),
        # pools are validated even when no key uses them
        (bad(pools={"p": [t(weight=0)]}), "pools.p[0]: weight must be a positive number"),
        (bad(pools={"p": [t(fallback=True)]}), "pools.p: every target is a fallback"),
        (bad(pools={"p": []}), "pools.p must be a non-empty list of targets"),
        (bad(pools={"p": [t(provider="nope")]}), "pools.p[0]: unknown provider 'nope'"),
        (bad(pools={"bad name!": [t()]}), "pool name 'bad name!' must be 1 to 64 letters, digits or . _ -"),
        (bad(pools=[t()]), '"pools" must be an object of pool name -> list of targets'),
    ],
)
def test_invalid_targets_are_refused_at_load_and_never_show_a_key(tmp_path, data, expected):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KeysError) as e:
        load_keys(str(path))
    message = str(e.value)
    assert expected in message
    assert message.startswith(f"{path}: ")
    assert not any(secret in message for secret in SECRETS) and "vk_user_secret" not in message


def test_an_unset_env_variable_in_a_target_is_named(monkeypatch):
    monkeypatch.delenv("GW_TEST_UNSET_KEY", raising=False)
    with pytest.raises(
        KeysError, match=r"'n': targets\[1\]: api_key names environment variable GW_TEST_UNSET_KEY, which is not set"
    ):
        parse_keys(bad({"name": "n", "targets": [t(), t(api_key="env:GW_TEST_UNSET_KEY")]}))


def test_yaml_keys_file_with_pool(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"""
pools:
  main:
    - {{provider: openai, api_key: {KEY_A}, weight: 2.5}}
    - {{provider: anthropic, api_key: {KEY_C}, fallback: true, model: claude-haiku-4-5}}
virtual_keys:
  vk_y: {{name: y, targets: main}}
""")
    vk = load_keys(str(path)).lookup("vk_y")
    assert [(t.provider, t.weight, t.fallback, t.model) for t in vk.targets] == [
        ("openai", 2.5, False, None), ("anthropic", 1.0, True, "claude-haiku-4-5")]


def test_the_check_command_lists_targets_masked(tmp_path, monkeypatch, capsys):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"virtual_keys": {"vk": team_alpha()}}))
    # python -m addon.policy.keys FILE (what run.sh runs before start), in this process
    monkeypatch.setattr(sys, "argv", ["keys.py", str(path)])
    runpy.run_path(str(ROOT / "addon" / "policy" / "keys.py"), run_name="__main__")
    out = capsys.readouterr().err
    assert "team-alpha: 3 targets [models gpt-4o*; budget $50]" in out
    assert "openai[0]: openai -> https://api.openai.com/v1/chat/completions (key sk-...111; weight 3)" in out
    assert "anthropic[2]: anthropic -> https://api.anthropic.com/v1/messages (key sk-...333; fallback, model_map" in out
    assert not any(secret in out for secret in SECRETS)


