"""Large request bodies, decoded, parsed and prepared (a translation: a new body as large) in one
worker thread, so the event loop serves other clients (/health, small requests) meanwhile; the
request's hook waits (the Gateway's `take_off_loop`).

One body at a time, from its parse to its prepared body (`LargeBodies.turn`): a burst of them
must not hold a parse's worth of memory (several times the body) for each, and a FIFO of
separate parse and prepare jobs held every burst's parsed bodies at once. One thread: the work
holds the GIL, so a second one would not make it faster. In that thread JSON is decoded,
searched and encoded in short C calls (`large_bodies.on`: wire/sse.json_bytes, apis/base.py),
as one long call would hold the GIL, and so the loop, for hundreds of milliseconds.

Not a mitmproxy addon: the Gateway gets it at construction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from addon.wire.sse import large_bodies

# request bodies above this, and any with a content-encoding (up to max_request_mb once decoded),
# are decoded, parsed and translated here
OFF_LOOP_BYTES = 1024 * 1024
LARGE_AT_ONCE = 1  # bodies parsed and prepared at once
LARGE_BODIES = concurrent.futures.ThreadPoolExecutor(max_workers=LARGE_AT_ONCE, thread_name_prefix="gateway-large-body")


class LargeBodies:
    __slots__ = ("turn",)

    def __init__(self) -> None:
        self.turn = asyncio.Semaphore(LARGE_AT_ONCE)  # held by a body from its parse to its prepared body

    async def run(self, fn, *args):
        """fn(*args) in the LARGE_BODIES thread."""
        return await asyncio.get_running_loop().run_in_executor(LARGE_BODIES, _large_body_work, fn, args)


def _large_body_work(fn, args):
    large_bodies.on = True
    return fn(*args)
