"""A FIFO at the keys path is refused, not read, and a read that hangs gives up (policy/keys.py).
Through a running gateway: tests/e2e/test_keys_fifo.py."""

from __future__ import annotations

import os
import threading
import time

import pytest

from addon.policy.keys import load_keys, load_keys_with_timeout
from addon.policy.keys_parse import KeysError


def bounded(fn, timeout: float = 5.0):
    """Run fn on a daemon thread; (finished, result or exception). A hang fails, not freezes, the test."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(_call(fn)), daemon=True)
    thread.start()
    thread.join(timeout)
    return (bool(out), out[0] if out else None)


def _call(fn):
    try:
        return fn()
    except BaseException as e:
        return e


def test_a_fifo_is_refused_at_once_not_read(tmp_path):
    fifo = tmp_path / "keys.json"
    os.mkfifo(fifo)
    finished, result = bounded(lambda: load_keys(str(fifo)))
    assert finished, "load_keys blocked on a FIFO"
    assert isinstance(result, KeysError) and "is not a regular file" in str(result)
    assert isinstance(_call(lambda: load_keys(str(tmp_path))), KeysError)  # a directory neither


def test_a_read_that_hangs_gives_up_after_the_timeout(tmp_path, monkeypatch):
    from addon.policy import keys
    release = threading.Event()
    monkeypatch.setattr(keys, "load_keys", lambda path: release.wait(30))  # a stuck file system
    started = time.monotonic()
    with pytest.raises(KeysError, match="not read within 0.2s"):
        load_keys_with_timeout("keys.json", timeout=0.2)
    assert time.monotonic() - started < 10
    release.set()


