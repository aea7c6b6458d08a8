import json

import pytest

from addon.policy.keys import load_keys
from addon.policy.keys_parse import KeysError, parse_keys

from addon.wire.secrets import fingerprint, mask

REAL = "sk-real-secret-key-123456"


def write(tmp_path, data, name="keys.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


def test_defaults_and_upstream_urls():
    store = parse_keys({"virtual_keys": {
        "vk_o": {"provider": "openai", "api_key": REAL},
        "vk_d": {"provider": "deepseek", "api_key": REAL},
    }})
    assert store.lookup("vk_o").upstream_url == "https://api.openai.com/v1/chat/completions"
    assert store.lookup("vk_d").upstream_url == "https://api.deepseek.com/chat/completions"
    assert store.lookup("vk_o").api_key == REAL
    assert store.lookup("nope") is None


def test_provider_and_key_base_url_overrides():
    store = parse_keys({
        "providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1/"}},
        "virtual_keys": {
            "vk_a": {"provider": "openai", "api_key": REAL},
            "vk_b": {"provider": "openai", "api_key": REAL, "base_url": "http://10.0.0.5:8000/v1"},
        },
    })
    assert store.lookup("vk_a").upstream_url == "http://127.0.0.1:9001/v1/chat/completions"
    assert store.lookup("vk_b").upstream_url == "http://10.0.0.5:8000/v1/chat/completions"


def test_yaml_keys_file(tmp_path):
    path = write(tmp_path, "virtual_keys:\n  vk_y:\n    provider: deepseek\n    api_key: " + REAL + "\n", "keys.yaml")
    assert load_keys(path).lookup("vk_y").provider == "deepseek"


@pytest.mark.parametrize(
    "data, expected",
    [
        # the virtual key is a client's secret too: entries are named masked, or by their "name"
        (
            {"virtual_keys": {"vk_user_broken": {"provider": "nope", "api_key": REAL}}},
            "virtual key 'vk_...ken': unknown provider 'nope'",
        ),
        (
            {"virtual_keys": {"vk_user_broken": {"provider": "openai", "name": "team-a"}}},
            "virtual key 'team-a' has no \"api_key\"",
        ),
        ({"virtual_keys": {"vk_x": {"provider": "openai", "api_key": "  "}}}, 'has no "api_key"'),
        ({"virtual_keys": {"vk_user_broken": "sk-abc"}}, "virtual key 'vk_...ken' must be an object"),
        ({"virtual_keys": {}}, '"virtual_keys" must be a non-empty object'),
        ([], "top level must be an object"),
        (
            {"providers": {"bogus": {}}, "virtual_keys": {"vk": {"provider": "openai", "api_key": REAL}}},
            "providers.bogus: unknown provider",
        ),
        (
            {"virtual_keys": {"vk_x": {"provider": "openai", "api_key": REAL, "base_url": "ftp://x"}}},
            "is not an http(s) URL",
        ),
    ],
)
def test_invalid_files_name_the_entry_and_never_the_key(tmp_path, data, expected):
    path = write(tmp_path, data)
    with pytest.raises(KeysError) as e:
        load_keys(path)
    assert expected in str(e.value)
    assert path in str(e.value)
    assert REAL not in str(e.value)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(KeysError, match="not found"):
        load_keys(str(tmp_path / "absent.json"))
    bad = write(tmp_path, '{"virtual_keys": {"vk": {"api_key": "' + REAL + '",,}}')
    with pytest.raises(KeysError) as e:
        load_keys(bad)
    assert "not valid JSON" in str(e.value) and REAL not in str(e.value)
    badyaml = write(tmp_path, "virtual_keys: [" + REAL + "\n  : :", "k.yml")
    with pytest.raises(KeysError) as e:
        load_keys(badyaml)
    assert "not valid YAML" in str(e.value) and REAL not in str(e.value)


def test_env_reference(monkeypatch):
    monkeypatch.setenv("GW_TEST_KEY", REAL)
    store = parse_keys({"virtual_keys": {"vk": {"provider": "openai", "api_key": "env:GW_TEST_KEY"}}})
    assert store.lookup("vk").api_key == REAL
    monkeypatch.delenv("GW_TEST_KEY")
    with pytest.raises(KeysError, match="GW_TEST_KEY, which is not set"):
        parse_keys({"virtual_keys": {"vk": {"provider": "openai", "api_key": "env:GW_TEST_KEY"}}})


def test_masking_and_repr_never_show_the_key():
    assert mask("sk-abcdef123456") == "sk-...456"
    assert mask("short") == "***"
    vk = parse_keys({"virtual_keys": {"vk": {"provider": "openai", "api_key": REAL}}}).lookup("vk")
    assert REAL not in repr(vk) and REAL not in str(vk)
    assert vk.fingerprint == fingerprint("vk") and len(vk.fingerprint) == 16 and "vk" != vk.fingerprint


def test_example_keys_file_is_valid():
    from pathlib import Path
    store = load_keys(str(Path(__file__).resolve().parents[3] / "keys.example.json"))
    assert {k.provider for k in store} >= {"openai", "deepseek"}


def test_a_json_syntax_error_names_reason_line_and_column_but_no_content(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(
        '{\n  "virtual_keys": {\n    "vk_a": {"provider": "openai" "api_key": "sk-quoted-never-0001"}\n  }\n}\n'
    )
    with pytest.raises(KeysError) as e:
        load_keys(str(path))
    assert str(e.value) == f"keys file {path} is not valid JSON: Expecting ',' delimiter at line 3, column 35"
    yaml_path = tmp_path / "keys.yaml"
    yaml_path.write_text('virtual_keys:\n  vk_a: {provider: openai, api_key: "sk-quoted-never-0002}\n')
    with pytest.raises(KeysError) as e:
        load_keys(str(yaml_path))
    assert "line 3, column 1" in str(e.value) and "sk-quoted" not in str(e.value)


def test_the_start_up_echo_shows_budget_period_as_written():
    store = parse_keys(
        {
            "virtual_keys": {
                "vk": {"provider": "openai", "api_key": "sk-x", "budget_tokens": 5, "budget_period": "30d"},
                "vk2": {"provider": "openai", "api_key": "sk-y", "budget_usd": 1, "budget_period": "36h"},
            }
        }
    )
    assert [vk.policy.describe() for vk in store] == ["[budget 5 tokens/30d]", "[budget $1/36h]"]
    assert store.summary() == "2 virtual keys (openai 2)"


@pytest.mark.parametrize("written, expected", [
    ("2027-01-01", "2027-01-01T00:00:00Z"),  # YAML: a date
    ("2027-06-30T23:59:59Z", "2027-06-30T23:59:59Z"),  # YAML: a datetime with a zone
    ("2027-06-30 23:59:59", "2027-06-30T23:59:59Z"),  # YAML: a datetime without one: UTC
    ("2027-06-30T23:59:59+02:00", "2027-06-30T21:59:59Z"),
    ('"2027-01-01"', "2027-01-01T00:00:00Z"),  # quoted: a string, as in JSON
])
def test_yaml_expires_at_unquoted_dates_and_times(tmp_path, written, expected):
    path = write(
        tmp_path,
        f"virtual_keys:\n  vk_y:\n    provider: openai\n    api_key: {REAL}\n    expires_at: {written}\n",
        "keys.yaml",
    )
    policy = load_keys(path).lookup("vk_y").policy
    assert policy.describe() == f"[expires {expected}]"
    json_path = write(
        tmp_path, {"virtual_keys": {"vk_y": {"provider": "openai", "api_key": REAL, "expires_at": expected}}}
    )
    assert load_keys(json_path).lookup("vk_y").policy.expires_at == policy.expires_at
