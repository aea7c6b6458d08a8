"""The benchmark's gateways write a throwaway ledger, never the user's usage.sqlite3."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[3]


def bench_run():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gateway_under_bench_gets_its_own_usage_db(tmp_path):
    run = bench_run()
    args = run.Stack.gateway_args(SimpleNamespace(tmp=tmp_path), ROOT / "addon")
    values = [v for k, v in zip(args, args[1:]) if k == "--set"]
    assert any(v.startswith(f"usage_db={tmp_path}/") for v in values), values
