"""Passwords in REDIS_URL / USAGE_DB stay out of argv and logs (addon/wire/secreturl.py).

run.sh hands the gateway `--set redis_url=env:REDIS_URL --set usage_db=env:USAGE_DB`; the
options hold only the reference, the parts read the environment in configure(). Through run.sh
and a fleet: tests/e2e/test_secreturl.py."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.hooks.optionguard import OptionGuard
from addon.policy.memory_store import MemoryStore
from addon.hooks.live import Live
from addon.hooks.stores import StoreChoice
from addon.wire.secreturl import masked_url, resolve
from addon.hooks.accounting import UsageAccounting


# --- the helpers -------------------------------------------------------------------------


def test_env_names_an_environment_variable_and_anything_else_is_the_value(monkeypatch):
    monkeypatch.setenv("SECRETURL_TEST", "redis://:pw@h:1/0")
    monkeypatch.setenv("SECRETURL_EMPTY", "")
    monkeypatch.delenv("SECRETURL_UNSET", raising=False)
    assert resolve("redis_url", "env:SECRETURL_TEST") == "redis://:pw@h:1/0"
    assert resolve("usage_db", "env:SECRETURL_EMPTY") == ""  # set but empty: e.g. no ledger
    assert resolve("usage_db", "usage.sqlite3") == "usage.sqlite3"
    with pytest.raises(
        ValueError, match=r"redis_url=env:SECRETURL_UNSET: the environment variable SECRETURL_UNSET is not set"
    ):
        resolve("redis_url", "env:SECRETURL_UNSET")
    with pytest.raises(ValueError, match="takes the name of an environment variable"):
        resolve("redis_url", "env:redis://x")


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("rediss://user:s3cret@h/0", "rediss://user:***@h/0"),
    ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    ("redis://:s3cret@127.0.0.1:notaport/0", "redis://:***@127.0.0.1:notaport/0"),
    ("postgresql://gw:s3cret@db.example:5432/ledger", "postgresql://gw:***@db.example:5432/ledger"),
    ("postgresql://gw@db/ledger?sslmode=require&password=s3cret", "postgresql://gw@db/ledger?sslmode=require&password=***"),
    ("postgresql://gw@db/ledger", "postgresql://gw@db/ledger"),
    ("usage.sqlite3", "usage.sqlite3"),
    ("/var/lib/gw/usage.sqlite3", "/var/lib/gw/usage.sqlite3"),
    ("redis://:s3cret@[::1", "***"),
])
def test_masked_url_never_shows_a_password(url, shown):
    assert masked_url(url) == shown


def test_redis_url_env_gives_the_store_the_variables_url_and_the_options_keep_the_name(monkeypatch, caplog):
    monkeypatch.setenv("SECRETURL_REDIS", "redis://:s3cret-redis@127.0.0.1:1/2")
    user = Live(MemoryStore())
    choice = StoreChoice(user)
    with caplog.at_level(logging.INFO, logger="gateway"), taddons.context(choice) as tctx:
        tctx.configure(choice, redis_url="env:SECRETURL_REDIS")
        assert user.store.url == "redis://:s3cret-redis@127.0.0.1:1/2"
        assert tctx.options.redis_url == "env:SECRETURL_REDIS"  # what mitmweb's options view shows
        with pytest.raises(exceptions.OptionsError, match="cannot change while the gateway runs"):
            tctx.configure(choice, redis_url="env:PATH")
    assert "redis://:***@127.0.0.1:1/2" in caplog.text and "s3cret" not in caplog.text
    with taddons.context(choice := StoreChoice(Live(MemoryStore()))) as tctx:
        with pytest.raises(exceptions.OptionsError, match="SECRETURL_NOT_SET is not set"):
            tctx.configure(choice, redis_url="env:SECRETURL_NOT_SET")


def test_usage_db_env_opens_the_ledger_the_variable_names(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SECRETURL_DB", str(tmp_path / "ledger.sqlite3"))
    accounting = UsageAccounting(Live(MemoryStore()))
    with caplog.at_level(logging.INFO, logger="gateway"), taddons.context(accounting) as tctx:
        tctx.configure(accounting, usage_db="env:SECRETURL_DB")
        assert accounting.ledger.path == str(tmp_path / "ledger.sqlite3") and (tmp_path / "ledger.sqlite3").exists()
        tctx.configure(accounting, usage_db=str(tmp_path / "ledger.sqlite3"))  # the same ledger: no change
        with pytest.raises(exceptions.OptionsError, match="usage_db cannot change"):
            tctx.configure(accounting, usage_db=str(tmp_path / "other.sqlite3"))
        accounting.done()
    assert f"usage ledger {tmp_path / 'ledger.sqlite3'}" in caplog.text


def test_usage_db_cannot_be_set_after_start_up_even_without_a_ledger(monkeypatch, tmp_path):
    """USAGE_DB='' (no ledger) and then, from mitmweb, usage_db=env:SOME_KEY: it would read any
    variable of the gateway's environment into a file name and a log line."""
    monkeypatch.chdir(tmp_path)
    guard = OptionGuard()
    with taddons.context(guard) as tctx:
        tctx.options.add_option("usage_db", str, "", "")
        tctx.configure(guard, usage_db="")
        guard.running()
        with pytest.raises(exceptions.OptionsError, match="usage_db cannot be changed"):
            tctx.configure(guard, usage_db="env:HOME")


# --- run.sh, one process and a fleet ---------------------------------------------------


