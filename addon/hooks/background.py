"""Background responses (a Responses create with `background: true`, answered `queued` without
usage), for the usage accounting (hooks/accounting.py), which owns one `BackgroundResponses`.

The request's reservation becomes a hold on the response's id (`defer`, policy/store.py), due
`background_hold` seconds later. A later GET, stream or cancel of that response that shows its
final usage settles it, once, to that usage (the ledger row is that request's); one that shows it
still running moves its due time on; one nobody settles is charged its worst case when due
(`charge_due`, swept by the accounting's writer, a ledger row marked estimated). MemoryStore's
holds die with the process, so at a stop they are charged their worst case; RedisStore keeps
them. Every row made here is counted with the accounting's next batch (`count_later`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
from collections.abc import Callable

from mitmproxy import http

from addon.apis.openai_responses import ENDED, RUNNING
from addon.policy.store import Due
from addon.routing.state import FlowState
from addon.wire.tokens import Usage

NO_USAGE = Usage()
BACKGROUND_HOLD = 3600.0  # default seconds a background response is held without news of it
STORED_ID = re.compile(
    r"/responses/(resp_[A-Za-z0-9_-]{1,200})"
)  # in the provider's path of a stored response's request

log = logging.getLogger("gateway")


class BackgroundResponses:
    def __init__(self, live, count_later: Callable[[tuple], None]) -> None:
        self.live = live  # its `store` holds, extends, settles and charges the holds
        # a finished request's row, (FlowState, started, ended, status, usage, streamed): counted
        # with the accounting's next batch
        self.count_later = count_later
        self.hold = BACKGROUND_HOLD  # option background_hold (the accounting's)
        self.settling: set[asyncio.Task] = set()  # deferred holds being settled in a remote store

    async def sweep(self) -> None:
        """Charge the holds that fell due their worst case (ledger rows included)."""
        try:
            due = self.live.store.charge_due(time.time())
            if inspect.isawaitable(due):
                due = await due
            for hold in due:
                self.charged(hold)
        except Exception:
            log.exception("gateway: could not charge the background responses that fell due")

    def charged(self, due: Due) -> None:
        """A hold charged its worst case: its ledger row (estimated), and one line saying why."""
        try:
            info = json.loads(due.meta)
        except ValueError:
            info = {}
        if not (due.tokens or due.usd) or not isinstance(info, dict):
            return
        log.info("gateway: background response %s of key %s: no final usage seen within %.0fs of the last news of it; "
                 "charged its worst case, %d tokens ($%.4f)", due.resource_id, info.get("key", "?"),
                 self.hold, due.tokens, due.usd)
        prompt, completion = info.get("input", 0), info.get("output", 0)
        if not (type(prompt) is int and type(completion) is int and prompt + completion == due.tokens):
            prompt, completion = due.tokens, 0
        state = FlowState.from_dict({**info, "fingerprint": due.key, "counted": True})
        started = info.get("started") if isinstance(info.get("started"), (int, float)) else due.when
        self.count_later(
            (state, started, max(due.when, started), 200, Usage(prompt, completion, estimated=True), False)
        )

    def defer(self, state: FlowState, started: float) -> None:
        """A background create answered without its usage: its reservation (if its key holds
        any) becomes a hold on the response, due background_hold seconds from now. Keys without
        a limit get one holding nothing: the usage is still counted once, when it shows."""
        ticket, state.ticket = state.ticket, None
        tokens, usd, prompt, completion = state.held or (0, 0.0, 0, 0)
        info = json.dumps(
            {
                "key": state.key or "",
                "provider": state.provider or "",
                "model": state.model or "",
                "price": state.price,
                "target": state.target or "",
                "attempts": state.attempts or 1,
                "api": state.api,
                "started": started,
                "input": prompt,
                "output": completion,
            },
            separators=(",", ":"),
        )
        self.live.store.defer(state.fingerprint, ticket, state.background, tokens, usd, time.time() + self.hold, info)

    def resolve(
        self, flow: http.HTTPFlow, noted: FlowState, status: int, state: str | None, usage: Usage | None, streamed: bool
    ) -> None:
        """A request on a stored response (GET, stream, cancel) ended: when it shows the final
        usage of a background response whose hold is still held, settle that, once, and count the
        usage on this request's row (with the create's model and price); when it shows one still
        running, hold it longer. Anything else is counted as the request it is."""
        started = flow.request.timestamp_start
        ended = (flow.response.timestamp_end if flow.response else None) or time.time()
        found = STORED_ID.search(flow.request.path)
        if state == "failed" and usage is None:
            usage = NO_USAGE  # the provider's own failure: billed nothing, as an error
        if found is None or status != 200 or state not in ENDED or usage is None:
            if found is not None and status == 200 and state in RUNNING:
                self.live.store.extend(noted.fingerprint, found.group(1), time.time() + self.hold)
            self.count_later((noted, started, ended, status, None, streamed))
            return
        settled = self.live.store.settle_deferred(noted.fingerprint, found.group(1), usage, ended)
        if not inspect.isawaitable(settled):
            self.settled(noted, settled, usage, (started, ended, status, streamed))
            return
        task = asyncio.get_running_loop().create_task(
            self.settle_later(noted, settled, usage, (started, ended, status, streamed))
        )
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    async def settle_later(self, state: FlowState, settled, usage: Usage, row: tuple) -> None:
        try:
            answer = await settled
        except Exception:
            log.exception("gateway: could not settle a background response (it is charged its worst case when due)")
            answer = None
        self.settled(state, answer, usage, row)

    def settled(self, state: FlowState, answer: tuple[str, float] | None, usage: Usage, row: tuple) -> None:
        started, ended, status, streamed = row
        if answer is None:  # no hold: not a background response, or counted already
            self.count_later((state, started, ended, status, None, streamed))
            return
        try:
            info = json.loads(answer[0])
        except ValueError:
            info = {}
        made = {name: info[name] for name in ("model", "price", "provider", "target") if name in info}
        counted = FlowState.from_dict({**state.to_dict(), **made, "counted": True})  # (the flow's own state stays)
        self.count_later((counted, started, ended, status, usage, streamed))

    def cancel(self) -> None:
        """At a stop: settlements still waiting for a remote store are dropped (their holds stay
        there, charged their worst case when due)."""
        for task in self.settling:
            task.cancel()
