"""What the accounting counts at a clean stop reaches a real Redis (addon/hooks/stores.py)."""

import pytest
from mitmproxy.test import taddons

from addon.policy.memory_store import MemoryStore
from addon.hooks.stores import StoreChoice


@pytest.mark.fleet
def test_what_the_accounting_counts_at_a_clean_stop_reaches_redis(redis_server, caplog):
    """mitmproxy awaits what the chain's `done` returns, then cancels every task left: the store's
    close must send the counts the accounting's `done` queued (requests that ended in the last
    batch, 0.2 s), not be cut off with them ("unreachable" logged at every stop, spend lost)."""
    import asyncio

    from addon.hooks.chain import AddonChain
    from addon.hooks.accounting import UsageAccounting
    from addon.hooks.live import Live
    from tests.unit.hooks.test_accounting import _finished_flow

    async def go():
        live = Live(MemoryStore())
        accounting = UsageAccounting(live)
        choice = StoreChoice(live)
        chain = AddonChain(choice, accounting)
        with taddons.context(chain) as tctx:
            tctx.configure(chain, redis_url=redis_server.url, usage_db="")
            choice.running()
            accounting.running()
            store = live.store
            while store.seeding is not None:  # the empty Redis gets its (empty) ledger and marker
                await asyncio.sleep(0.01)
            accounting.response(_finished_flow("fp-stop", (5, 2)))  # noted, counted with the next batch
            stopping = chain.done()  # as mitmproxy's master does, before its event loop ends
            if stopping is not None:
                await stopping

    asyncio.run(go())
    assert redis_server.command("HGET", "llmgw:fp-stop:spend", "t") == b"$1\r\n7\r\n"
    assert "unreachable" not in caplog.text
