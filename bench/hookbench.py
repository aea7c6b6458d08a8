"""The addon's own CPU per request, in-process and deterministic: the gateway hooks on synthetic flows.

    .venv/bin/python bench/hookbench.py [--n 20000]

Runs Gateway.request / responseheaders / response for an OpenAI passthrough request and, when
the provider exists, an Anthropic one, on pre-built flows (flow construction is not timed), and
prints microseconds of CPU per request. What py-spy shows as the addon's share of the proxy,
without the proxy's noise: use it for before/after numbers of hot-path changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mitmproxy import http  # noqa: E402
from mitmproxy.test import tflow  # noqa: E402

from addon import gateway  # noqa: E402
from addon.keys import parse_keys  # noqa: E402
from addon.providers import PROVIDERS  # noqa: E402
from fakeprovider import REPLY_ANTHROPIC, REPLY_OPENAI  # noqa: E402
from run import ANTHROPIC_MODEL, MESSAGES, SDK_HEADERS  # noqa: E402


def flows(scenario: str, n: int) -> list[http.HTTPFlow]:
    model = "gpt-4o-mini" if scenario == "openai" else ANTHROPIC_MODEL
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 64}).encode()
    head, _, payload = (REPLY_OPENAI if scenario == "openai" else REPLY_ANTHROPIC).partition(b"\r\n\r\n")
    out = []
    for _ in range(n):
        req = http.Request.make("POST", "http://127.0.0.1:8080/v1/chat/completions", body,
                                {"host": "127.0.0.1:8080", "accept-encoding": "gzip, deflate", "connection": "keep-alive",
                                 "content-type": "application/json", **SDK_HEADERS,
                                 "authorization": f"Bearer vk_bench_{scenario}"})
        out.append(tflow.tflow(req=req))
    return out, payload


def run(scenario: str, n: int) -> float:
    gw = gateway.Gateway()
    gw.keys = parse_keys({"virtual_keys": {f"vk_bench_{s}": {"provider": s, "api_key": f"sk-bench-{s}-0000000000",
                                                              "base_url": "http://127.0.0.1:9999/v1"}
                                           for s in ("openai", "anthropic") if s in PROVIDERS}})
    fs, payload = flows(scenario, n)
    responses = [http.Response.make(200, payload, {"content-type": "application/json"}) for _ in fs]
    t = time.process_time()
    for f, resp in zip(fs, responses):
        gw.request(f)
        f.response = resp
        gw.responseheaders(f)
        gw.response(f)
    cpu = time.process_time() - t
    f = fs[-1]
    assert f.response.status_code == 200 and not gw.exchanges, f.response.content[:200]
    return cpu / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    for scenario in ("openai", "anthropic"):
        if scenario in PROVIDERS:
            run(scenario, 500)  # warm-up
            best = min(run(scenario, args.n) for _ in range(3))
            print(f"{scenario:9s} gateway hooks: {best:6.1f} us CPU per request (best of 3 x {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
