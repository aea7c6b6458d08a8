"""The mitmproxy side of usage accounting: count every routed request into the store and ledger.

`UsageAccounting` runs after `Gateway` in the addon chain. For a streamed 200 it puts a
`StreamUsage` watcher after the provider's translation (what the client receives); when a flow
ends it turns the usage into tokens and dollars, counts them in the store (budgets, tpm) and
queues a ledger row. Nothing here can refuse or hold up a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mitmproxy import ctx, exceptions, http

from addon import ledger as ledger_db
from addon.keys import Price
from addon.ledger import Ledger, UsageRecord
from addon.messages import plain_content
from addon.store import BUCKET, MINUTE, MemoryStore
from addon.streams import frame_for_new_length
from addon.usage import StreamUsage, Usage, cost, usage_from_body

log = logging.getLogger("gateway")


class UsageAccounting:
    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.ledger: Ledger | None = None
        self.watchers: dict[str, StreamUsage] = {}  # per streamed flow
        self.writer: asyncio.Task | None = None  # flushes the ledger every FLUSH_EVERY seconds

    def load(self, loader) -> None:
        loader.add_option(
            "usage_db", str, "usage.sqlite3",
            "SQLite file of the usage ledger (one row per request; budgets are read back from it at "
            "start-up). Empty: keep no ledger, budgets then start from zero at every start.",
        )

    def configure(self, updated) -> None:
        if "usage_db" not in updated:
            return
        if self.ledger is not None:
            if ctx.options.usage_db != self.ledger.path:
                raise exceptions.OptionsError("usage_db cannot change while the gateway runs")
            return
        path = ctx.options.usage_db
        if not path:
            return
        try:
            self.ledger = Ledger(path)
            buckets = ledger_db.spend_buckets(path, BUCKET)
            recent = ledger_db.recent_tokens(path, time.time() - MINUTE)
        except Exception as e:  # sqlite3.Error, OSError: one line, the gateway does not start
            raise exceptions.OptionsError(f"usage_db {path}: {e}") from None
        for fingerprint, start, tokens, usd in sorted(buckets, key=lambda row: row[1]):  # the store prunes oldest-first
            self.store.seed_spend(fingerprint, tokens or 0, usd or 0.0, start)
        for fingerprint, when, tokens in recent:
            self.store.seed_tokens(fingerprint, tokens, when)
        log.info("gateway: usage ledger %s (%d key-hours of past spend loaded)", path, len(buckets))
        self.start_writer()

    def running(self) -> None:
        self.start_writer()

    def done(self) -> None:
        if self.writer is not None:
            self.writer.cancel()
            self.writer = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    def start_writer(self) -> None:
        if self.ledger is None or self.writer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not running yet: running() starts it
            return
        self.writer = loop.create_task(self.write_ledger())

    async def write_ledger(self) -> None:
        """Batches on the event loop (ledger.py says why not a thread); checkpoints off it."""
        last_checkpoint = time.monotonic()
        while True:
            await asyncio.sleep(ledger_db.FLUSH_EVERY)
            ledger = self.ledger
            if ledger is None:
                return
            try:
                ledger.flush()
                if time.monotonic() - last_checkpoint >= ledger_db.CHECKPOINT_EVERY:
                    last_checkpoint = time.monotonic()
                    await asyncio.to_thread(ledger.checkpoint)
            except Exception:
                log.exception("gateway: usage ledger write failed")

    # --- hooks -------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get("gateway", {})
        response = flow.response
        if not meta.get("stream") or "client_usage" not in meta or response is None or not response.stream:
            return
        try:
            watcher = StreamUsage(strip=not meta["client_usage"])
            if watcher.strip:
                frame_for_new_length(response.headers, flow.request.http_version)
            response.stream = watched_stream(response.stream, watcher)
            self.watchers[flow.id] = watcher
        except Exception:
            log.exception("gateway: could not watch a stream for usage")

    def response(self, flow: http.HTTPFlow) -> None:
        watcher = self.watchers.pop(flow.id, None)
        try:
            response = flow.response
            if watcher is not None:
                usage = watcher.usage
            elif response.status_code == 200 and not response.stream and response.raw_content is not None:
                usage = usage_from_body(plain_content(response))
            else:
                usage = None
            self.count(flow, response.status_code, usage, streamed=watcher is not None)
        except Exception:
            log.exception("gateway: could not account a response")

    def error(self, flow: http.HTTPFlow) -> None:
        watcher = self.watchers.pop(flow.id, None)
        try:
            status = flow.response.status_code if flow.response else 0
            self.count(flow, status, watcher.usage if watcher else None, streamed=watcher is not None)
        except Exception:
            log.exception("gateway: could not account a failed request")

    def count(self, flow: http.HTTPFlow, status: int, usage: Usage | None, streamed: bool) -> None:
        if not flow.live:  # a flow loaded from a file (mitmweb -r) was counted when it happened
            return
        meta = flow.metadata.get("gateway", {})
        fingerprint = meta.get("fingerprint")
        if fingerprint is None:  # not a request made with a known key
            return
        usage = usage or Usage()
        price = Price(*meta["price"]) if meta.get("price") else None
        usd = cost(usage, price)
        now = time.time()
        if usage.total or usd:
            self.store.add_usage(fingerprint, usage.total, usd, now)
        if self.ledger is not None:
            started = flow.request.timestamp_start
            ended = flow.response.timestamp_end if flow.response and flow.response.timestamp_end else now
            self.ledger.record(UsageRecord(
                ts=started, key_name=meta.get("key", ""), key_fingerprint=fingerprint,
                provider=meta.get("provider", ""), model=meta.get("model", ""), status=status,
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens, latency_ms=max(0.0, (ended - started) * 1000),
                streamed=streamed, cost_usd=usd,
            ))


def watched_stream(inner: Callable | bool, watcher: StreamUsage) -> Callable[[bytes], list[bytes]]:
    """Compose the stream callable mitmproxy already has (or True: pass through) with `watcher`."""
    broken = False

    def stream(piece: bytes) -> list[bytes]:
        nonlocal broken
        out = inner(piece) if callable(inner) else piece
        parts = [out] if isinstance(out, (bytes, bytearray)) else list(out)
        if broken:
            return [p for p in parts if p]
        held = watcher.held  # bytes the watcher holds back from earlier pieces
        try:
            sent: list[bytes] = []
            for part in parts:
                if part:
                    sent.extend(watcher.feed(bytes(part)))
            if not piece:
                sent.extend(watcher.feed(b""))
            return [p for p in sent if p]
        except Exception:
            # accounting must not break a client's stream: send on what the watcher held back
            log.exception("gateway: stream usage watcher failed; this stream is not counted")
            broken = True
            return [p for p in [held, *parts] if p]

    return stream
