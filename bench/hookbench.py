"""The addon's own CPU per request, in-process and deterministic: the gateway hooks on synthetic flows.

    .venv/bin/python bench/hookbench.py [--n 20000]
    .venv/bin/python bench/hookbench.py --chain [--n 10000]   # every addon in gateway.addons, each timed

Runs Gateway.requestheaders / request / responseheaders / response for an OpenAI passthrough request, the same
for a key with three targets (targets3), and an Anthropic one, on pre-built flows (flow construction is not timed), and
prints microseconds of CPU per request. What py-spy shows as the addon's share of the proxy,
without the proxy's noise: use it for before/after numbers of hot-path changes.

--chain runs every part of addon/gateway.py's AddonChain (policy, usage ledger, recording,
timeouts...) in order, as mitmproxy would (but without its dispatch cost), and prints each hook's
thread CPU plus the whole process's CPU (which includes the usage ledger's writer thread).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
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
from addon.hooks.gateway import Gateway  # noqa: E402
from addon.hooks.live import Live  # noqa: E402
from addon.policy.keys_parse import parse_keys  # noqa: E402
from addon.providers.registry import PROVIDERS  # noqa: E402
from fakeprovider import REPLY_ANTHROPIC, REPLY_OPENAI  # noqa: E402
from run import ANTHROPIC_MODEL, MESSAGES, SDK_HEADERS  # noqa: E402


# scenario -> its virtual key's entry; targets3: three OpenAI targets (a weighted pick, failover armed)
SCENARIOS = ("openai", "targets3", "anthropic")


def key_entries() -> dict:
    entries = {f"vk_bench_{s}": {"provider": s, "api_key": f"sk-bench-{s}-0000000000", "base_url": "http://127.0.0.1:9999/v1"}
               for s in ("openai", "anthropic") if s in PROVIDERS}
    entries["vk_bench_targets3"] = {
        "targets": [
            {"provider": "openai", "api_key": f"sk-bench-target{i}-0000000000", "base_url": "http://127.0.0.1:9999/v1"}
            for i in range(3)
        ]
    }
    return entries


def flows(scenario: str, n: int) -> list[http.HTTPFlow]:
    openai_like = scenario in ("openai", "targets3")
    model = "gpt-4o-mini" if openai_like else ANTHROPIC_MODEL
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 64}).encode()
    head, _, payload = (REPLY_OPENAI if openai_like else REPLY_ANTHROPIC).partition(b"\r\n\r\n")
    out = []
    for _ in range(n):
        req = http.Request.make(
            "POST",
            "http://127.0.0.1:8080/v1/chat/completions",
            body,
            {
                "host": "127.0.0.1:8080",
                "accept-encoding": "gzip, deflate",
                "connection": "keep-alive",
                "content-type": "application/json",
                **SDK_HEADERS,
                "authorization": f"Bearer vk_bench_{scenario}",
            },
        )
        out.append(tflow.tflow(req=req))
    return out, payload


def run(scenario: str, n: int) -> float:
    gw = Gateway(Live(keys=parse_keys({"virtual_keys": key_entries()})))
    fs, payload = flows(scenario, n)
    responses = [http.Response.make(200, payload, {"content-type": "application/json"}) for _ in fs]
    gc.freeze()  # the thousands of pre-built flows would otherwise make every GC pass expensive
    t = time.process_time()
    for f, resp in zip(fs, responses):
        gw.requestheaders(f)
        gw.request(f)
        f.response = resp
        gw.responseheaders(f)
        gw.response(f)
    cpu = time.process_time() - t
    f = fs[-1]
    assert f.response.status_code == 200 and not gw.live.in_flight, f.response.content[:200]
    return cpu / n * 1e6


async def chain(n: int, ledger: bool = True, metrics: bool = False) -> None:
    import tempfile

    from mitmproxy.test import taddons

    tmp = Path(tempfile.mkdtemp(prefix="gw-hookbench-"))
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"virtual_keys": key_entries()}))
    addons = gateway.addons[0].parts  # the AddonChain's parts, each timed
    with taddons.context(*addons) as tctx:
        opts = {"keys_file": str(keys)}
        if "usage_db" in tctx.options:
            opts["usage_db"] = str(tmp / "usage.sqlite3") if ledger else ""  # never the user's ledger
        if metrics:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                opts["metrics_port"] = s.getsockname()[1]
        tctx.options.update(**opts)
        for scenario in SCENARIOS:
            if scenario not in PROVIDERS and scenario != "targets3":
                continue
            for count in (500, n):  # warm-up, then measured
                fs, payload = flows(scenario, count)
                responses = [http.Response.make(200, payload, {"content-type": "application/json"}) for _ in fs]
                gc.freeze()  # as in run(): pre-built flows must not inflate GC passes
                cost: collections.Counter = collections.Counter()
                p0 = time.process_time()
                for f, resp in zip(fs, responses):
                    for hook in ("requestheaders", "request", "responseheaders", "response"):
                        if hook == "responseheaders":
                            f.response = resp
                        for addon in addons:
                            fn = getattr(addon, hook, None)
                            if fn is not None:
                                t = time.thread_time()
                                fn(f)
                                cost[f"{type(addon).__name__}.{hook}"] += time.thread_time() - t
                    await asyncio.sleep(0)  # let call_later / background work run as in the proxy
                await asyncio.sleep(0.6)  # the ledger writer flushes every 0.2 s
                process = (time.process_time() - p0) / count * 1e6
                assert f.response.status_code == 200, f.response.content[:300]
            print(f"{scenario}: hooks {sum(cost.values()) / n * 1e6:.1f} us/request; "
                  f"whole process (incl. background threads) {process:.1f} us/request")
            for name, v in cost.most_common():
                print(f"   {v / n * 1e6:6.1f} us  {name}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--chain", action="store_true", help="all addons of addon/gateway.py, each timed")
    ap.add_argument(
        "--no-ledger", action="store_true", help="with --chain: usage_db='' (the ledger's cost by difference)"
    )
    ap.add_argument(
        "--metrics", action="store_true", help="with --chain: metrics on (metrics_port set; the cost by difference)"
    )
    args = ap.parse_args()
    if args.chain:
        asyncio.run(chain(args.n, ledger=not args.no_ledger, metrics=args.metrics))
        return 0
    for scenario in SCENARIOS:
        if scenario in PROVIDERS or scenario == "targets3":
            run(scenario, 500)  # warm-up
            best = min(run(scenario, args.n) for _ in range(3))
            print(f"{scenario:9s} gateway hooks: {best:6.1f} us CPU per request (best of 3 x {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
