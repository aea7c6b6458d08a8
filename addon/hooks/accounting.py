"""The mitmproxy side of usage accounting: count every routed request into the store and ledger.

`UsageAccounting` runs after `Gateway` in the addon chain. For a streamed 200 it puts a
usage watcher of the request's inbound API (apis/) after the pair's translation (what the client receives); when a flow
ends it notes what is needed to count it, and `settle()` later turns that into tokens and
dollars, counts them in the store (budgets, tpm) and queues a ledger row. Nothing here can
refuse or hold up a request.

Background responses (a Responses create with `background: true`, answered `queued` without
usage) are held until their usage shows: hooks/background.py, whose holds that fell due are swept
every SWEEP_EVERY seconds by the writer here.

Why later: run once per request between mitmproxy's own work, the usage parse and the counting
found their code and data out of the CPU caches every time; in a batch they stay warm (bench/ab.py:
about 20 us less proxy CPU per request, at 1 and at 16 connections). `settle()` runs every
FLUSH_EVERY seconds with the ledger writer, and the store calls it before every read of usage
(`MemoryStore.before_read`), so budgets and tpm limits still see every finished request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncio
import logging
import time
from collections.abc import Callable

from mitmproxy import ctx, exceptions, http
from mitmproxy.connection import ConnectionState

from addon.guard.record import ledger_value
from addon.usage import ledger as ledger_db, sqlite
from addon.hooks.accesslog import ACCESS, log_counted, log_unkeyed
from addon.hooks.background import BACKGROUND_HOLD, NO_USAGE, BackgroundResponses
from addon.wire.tokens import Price
from addon.wire.secreturl import masked_url, resolve
from addon.usage.ledger import open_ledger
from addon.usage.sqlite import SQLiteLedger

if TYPE_CHECKING:  # psycopg is imported only when a PostgreSQL ledger is used
    from addon.usage.postgres import PostgresLedger
from addon.usage.ledger_sql import UsageRecord
from addon.hooks.messages import plain_content
from addon.policy.owners import record
from addon.policy.memory_store import MemoryStore
from addon.policy.store import BUCKET, MINUTE, OWNER_TTL, OWNERS_PER_KEY
from addon.hooks.timeouts import seconds_option
from addon.apis.openai_responses import ResponsesStreamUsage, response_state
from addon.wire.streams import frame_for_new_length
from addon.wire.estimate import StreamSample, estimate_from_chars
from addon.wire.tokens import Usage, cost
from addon.apis.base import StreamUsageReader
from addon.apis.registry import APIS, DEFAULT_API
from addon.routing.state import FlowState, state_of

SETTLE_AT = 10_000  # finished flows noted before they are settled at once, whatever the timer
PENDING = Usage(estimated=True)  # a background stream that ended before its usage: it is held instead
SWEEP_EVERY = 2.0  # seconds between two charges of the holds that fell due

log = logging.getLogger("gateway")


def read_owners(path: str, per_key: int) -> list[tuple[str, str, float]]:
    """The stored responses the ledger says were created within OWNER_TTL, the newest `per_key`
    per key, oldest first, as (id, owner record, when): a restart keeps who owns each."""
    return [
        (resource_id, record(fingerprint, target_id or None), when)
        for fingerprint, resource_id, target_id, when in ledger_db.stored_responses(
            path, time.time() - OWNER_TTL, per_key
        )
    ]


def read_seeds(path: str) -> tuple[list, list]:
    """The ledger's spend buckets (oldest first: the store prunes oldest-first) and the last
    minute's tokens: what a store is seeded with."""
    buckets = sorted(ledger_db.spend_buckets(path, BUCKET), key=lambda row: row[1])
    return buckets, ledger_db.recent_tokens(path, time.time() - MINUTE)


class UsageAccounting:
    def __init__(self, live) -> None:
        self.live = live  # its `store` (hooks/live.py): budgets and tpm counted there
        self.ledger: SQLiteLedger | PostgresLedger | None = None
        self.watchers: dict[str, tuple[StreamUsageReader, StreamSample]] = {}  # per streamed flow
        # finished flows not yet counted: (FlowState, started, ended, status, usage or whole response)
        self.unsettled: list[tuple] = []
        live.store.before_read = self.settle
        self.writer: asyncio.Task | None = None  # settles and flushes every FLUSH_EVERY seconds
        # told each counted request's (FlowState, prompt, completion, cached tokens, usd): the metrics
        self.counted: Callable[[FlowState, int, int, int, float], None] | None = None
        self.background = BackgroundResponses(live, self.count_later)  # their holds; option background_hold

    def load(self, loader) -> None:
        loader.add_option(
            "usage_db", str, "usage.sqlite3",
            "SQLite file of the usage ledger (one row per request; budgets are read back from it at "
            "start-up), or a postgresql:// URL (gateways on several machines, one ledger). "
            "Empty: keep no ledger, budgets then start from zero at every start. env:NAME: the environment "
            "variable NAME holds it (run.sh: env:USAGE_DB; a URL's password stays out of argv and this view).",
        )
        loader.add_option(
            "background_hold", str, f"{BACKGROUND_HOLD:g}",
            "Seconds a background response (Responses, background: true) holds its worst case against its key's "
            "budget and tpm without news of it: a GET, stream or cancel showing its usage settles it, one showing it "
            "still running holds it this long again, and when nothing did it is charged its worst case.",
        )

    def configure(self, updated) -> None:
        if "background_hold" in updated:
            self.background.hold = seconds_option("background_hold")
        if "usage_db" not in updated:
            return
        self.start_writer()  # (when the event loop runs already; else running() starts it)
        try:
            path = resolve("usage_db", ctx.options.usage_db)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        if self.ledger is not None:
            if path != self.ledger.path:
                raise exceptions.OptionsError("usage_db cannot change while the gateway runs")
            return
        if not path:
            return
        try:
            self.ledger = open_ledger(path)
            buckets, recent = read_seeds(path)
        except Exception as e:  # sqlite3.Error, psycopg.Error, OSError: one line, the gateway does not start
            raise exceptions.OptionsError(f"usage_db {masked_url(path)}: {e}") from None
        for fingerprint, start, tokens, usd in buckets:
            self.live.store.seed_spend(fingerprint, tokens or 0, usd or 0.0, start)
        for fingerprint, when, tokens in recent:
            self.live.store.seed_tokens(fingerprint, tokens, when)
        try:
            for resource_id, record, when in read_owners(path, self.owners_per_key()):
                self.live.store.seed_owner(resource_id, record, when)
        except Exception as e:
            raise exceptions.OptionsError(f"usage_db {masked_url(path)}: {e}") from None
        if hasattr(self.live.store, "reload_seeds"):  # RedisStore: Redis may lose its data while we run
            self.live.store.reload_seeds = self.reload_seeds
            self.live.store.reload_owners = self.reload_owners
        log.info("gateway: usage ledger %s (%d key-hours of past spend loaded)", masked_url(path), len(buckets))

    async def reload_seeds(self, counted: Callable[[], None]) -> list[tuple]:
        """For a store that lost its data (Redis restarted empty): write every finished request
        to the ledger, call `counted()` once all the store was told is in it, and return the
        ledger's spend buckets and last minute's tokens, as the store's seed_* calls take them:
        (fingerprint, "", tokens, usd, when, tpm window only)."""
        ledger = self.ledger
        if ledger is None:
            return []
        self.settle()
        counted()
        await ledger.write()
        buckets, recent = await asyncio.to_thread(read_seeds, ledger.path)
        return ([(fp, "", tokens or 0, usd or 0.0, start, False) for fp, start, tokens, usd in buckets]
                + [(fp, "", tokens, 0.0, when, True) for fp, when, tokens in recent])

    async def reload_owners(self) -> list[tuple[str, str, float]]:
        """For a store that lost its data: the ledger's owner records (after reload_seeds wrote
        every finished request to it), as seed_owner takes them."""
        ledger = self.ledger
        if ledger is None:
            return []
        return await asyncio.to_thread(read_owners, ledger.path, self.owners_per_key())

    @staticmethod
    def owners_per_key() -> int:
        return getattr(ctx.options, "owners_per_key", OWNERS_PER_KEY)

    def running(self) -> None:
        self.start_writer()

    def done(self) -> None:
        if self.writer is not None:
            self.writer.cancel()
            self.writer = None
        self.background.cancel()
        if isinstance(self.live.store, MemoryStore):  # its holds end with the process: never free
            for due in self.live.store.charge_due(time.time(), everything=True):
                self.background.charged(due)
        self.settle()
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    def start_writer(self) -> None:
        if self.writer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not running yet: running() starts it
            return
        self.writer = loop.create_task(self.write_ledger())

    async def write_ledger(self) -> None:
        """Batches on the event loop (ledger.py says why not a thread); checkpoints off it."""
        last_checkpoint = last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(sqlite.FLUSH_EVERY)
            if time.monotonic() - last_sweep >= SWEEP_EVERY:
                last_sweep = time.monotonic()
                await self.background.sweep()
            try:
                self.settle()
            except Exception:
                log.exception("gateway: could not count finished requests")
            ACCESS.flush()  # the batch's access lines, in one write
            ledger = self.ledger
            if ledger is None:
                continue
            try:
                await ledger.write()
                if time.monotonic() - last_checkpoint >= sqlite.CHECKPOINT_EVERY:
                    last_checkpoint = time.monotonic()
                    await asyncio.to_thread(ledger.checkpoint)
            except Exception:
                log.exception("gateway: usage ledger write failed")

    # --- hooks -------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        response = flow.response
        if state is None:
            return
        if state.resource and response is not None and response.stream and response.status_code == 200:
            # a stored response streamed (GET ?stream=true): its final event may settle a background hold
            watcher = ResponsesStreamUsage()
            response.stream = watched_stream(response.stream, watcher)
            self.watchers[flow.id] = watcher, StreamSample()
            return
        if not state.stream or state.client_usage is None or response is None or not response.stream:
            return
        try:
            # usage read from what the client receives, in its API's format
            watcher = APIS.get(state.api, DEFAULT_API).stream_usage(strip=not state.client_usage)
            if watcher.strip:
                frame_for_new_length(response.headers, flow.request.http_version)
            sample = StreamSample()
            response.stream = watched_stream(response.stream, watcher, sample)
            self.watchers[flow.id] = watcher, sample
        except Exception:
            log.exception("gateway: could not watch a stream for usage")

    def response(self, flow: http.HTTPFlow) -> None:
        watched = self.watchers.pop(flow.id, None)
        response = flow.response
        state = state_of(flow)
        # a stored response's request: counted when made, unless it settles a background one
        if state is not None and state.resource:
            self.note_resource(flow, response.status_code, watched)
        elif watched is not None:
            if watched[1].first_at:  # time to first token (the metrics)
                state.first_chunk_at = watched[1].first_at
            self.note(flow, response.status_code, self.streamed_usage(flow, state, watched), streamed=True)
        elif response.status_code == 200 and not response.stream:
            self.note(flow, 200, response, streamed=False)  # its usage is read when settled
        else:
            self.note(flow, response.status_code, None, streamed=False)

    def error(self, flow: http.HTTPFlow) -> None:
        watched = self.watchers.pop(flow.id, None)
        status = client_status(flow)
        state = state_of(flow)
        if status in (502, 504) and state is not None and not (flow.response and flow.response.stream):
            # the gateway's own error page (x-gateway-error-source: gateway), not the provider's
            # answer: the access line says which, as the header does
            state.failed = "upstream_timeout" if status == 504 else "upstream_unreachable"
        if state is not None and state.resource:
            self.note_resource(flow, status, watched)
            return
        usage = self.streamed_usage(flow, state, watched) if watched else None
        self.note(flow, status, usage, streamed=watched is not None)

    @staticmethod
    def streamed_usage(flow: http.HTTPFlow, state: FlowState | None, watched: tuple) -> Usage:
        """What a stream is charged (stream_usage); PENDING for a background response's stream
        that ended before its final usage: it runs on at the provider, and is held instead."""
        if state is not None and state.background is not None and watched[0].usage is None:
            return PENDING
        return stream_usage(flow, *watched)

    def note_resource(self, flow: http.HTTPFlow, status: int, watched: tuple | None) -> None:
        if not flow.live:
            return
        noted = state_of(flow)
        if noted is None or noted.fingerprint is None:
            self.note(flow, status, None, streamed=watched is not None)
            return
        try:
            if watched is not None:  # a stream: its final event's usage (an ended response's)
                usage = watched[0].usage
                self.background.resolve(flow, noted, status, "completed" if usage is not None else None, usage, True)
                return
            response = flow.response
            state, usage = (None, None)
            if status == 200 and response is not None and response.raw_content:
                state, usage = response_state(plain_content(response))
            self.background.resolve(flow, noted, status, state, usage, False)
        except Exception:
            log.exception("gateway: could not account a stored response's request")
            self.note(flow, status, None, streamed=watched is not None)

    def note(self, flow: http.HTTPFlow, status: int, usage: Usage | http.Response | None, streamed: bool) -> None:
        """Keep what counting this finished flow needs (flows are not kept: mitmproxy drops them)."""
        if not flow.live:  # loaded from a file (mitmweb -r): counted when it happened
            return
        state = state_of(flow)
        now = time.time()
        ended = (flow.response.timestamp_end if flow.response else None) or now
        if state is None or state.fingerprint is None:  # not a request made with a known key
            log_unkeyed(
                flow.request.method,
                flow.request.path,
                status,
                state,
                (ended - flow.request.timestamp_start) * 1000,
                ended,
            )
            return
        if state.background is not None and status == 200:  # a background create: is its usage still to come?
            if isinstance(usage, http.Response):
                usage = body_usage(state, usage)
            if usage is None or usage is PENDING:
                self.background.defer(state, flow.request.timestamp_start)
                usage = None
        if state.ticket is not None:  # the store holds a reservation for it: end that at once
            usage = self.end_reservation(state, usage, ended)
        self.unsettled.append((state, flow.request.timestamp_start, ended, status, usage, streamed))
        if len(self.unsettled) >= SETTLE_AT:
            self.settle()

    def end_reservation(self, state: FlowState, usage: Usage | http.Response | None, ended: float) -> Usage | None:
        """Settle the reservation of a request that ended to what it used, or release it when
        the provider answered nothing billable (an error, or no response at all). Done when
        the flow ends, not batched: the reservation holds budget and a max_parallel slot."""
        fingerprint, ticket = state.fingerprint, state.ticket
        try:
            if isinstance(usage, http.Response):
                usage = body_usage(state, usage)
            if usage is None:
                # nothing billable: an error, no answer, or a whole body without usage (counted 0,
                # as in the ledger; a stream always has a count or an estimate by now)
                self.live.store.release(fingerprint, ticket)
            else:
                price = state.price
                usd = cost(usage, Price(*price)) if price else 0.0
                self.live.store.settle(fingerprint, ticket, usage.total, usd, ended)
        except Exception:
            log.exception("gateway: could not end a reservation (it expires by itself)")
            self.live.store.release(fingerprint, ticket)
            return None
        return usage

    def count_later(self, row: tuple) -> None:
        """(FlowState, started, ended, status, usage or whole response, streamed): counted with the next batch."""
        self.unsettled.append(row)

    def settle(self) -> None:
        """Count every noted flow: store (budgets, tpm) and ledger."""
        pending, self.unsettled = self.unsettled, []
        for state, started, ended, status, usage, streamed in pending:
            try:
                self.count(state, started, ended, status, usage, streamed)
            except Exception:
                log.exception("gateway: could not account a response")

    def count(self, state: FlowState, started: float, ended: float, status: int,
              usage: Usage | http.Response | None, streamed: bool) -> None:
        if isinstance(usage, http.Response):
            usage = body_usage(state, usage)
        if usage is None:
            usage = NO_USAGE
        price = state.price
        usd = cost(usage, Price(*price)) if price else 0.0
        fingerprint = state.fingerprint
        tokens = usage.prompt_tokens + usage.completion_tokens
        if tokens or usd:
            # a reservation was settled in the store when the flow ended; a deferred hold's
            # usage (settled or charged) is counted in the store already
            if state.ticket is None and state.counted is None:
                self.live.store.add_usage(fingerprint, tokens, usd, ended)
            if self.counted is not None:
                self.counted(state, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usd)
        latency_ms = max(0.0, (ended - started) * 1000)
        log_counted(state, status, usage.prompt_tokens, usage.completion_tokens, latency_ms, ended, usage.estimated)
        if self.ledger is not None:
            self.ledger.record(UsageRecord(  # positional, in COLUMNS order
                started, state.key or "", fingerprint, state.provider or "", state.model or "",
                status, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                latency_ms, streamed, usd, usage.estimated, state.target or "", state.attempts or 1,
                state.created or "", state.target_id or "", ledger_value(state.guardrails),
            ))


def client_status(flow: http.HTTPFlow) -> int:
    """The status the client got for a failed flow: a streamed response's own (its headers went
    out), 0 if the client had hung up, else mitmproxy's error answer: 504 after the upstream
    timeout, 502 (a provider that cut a plain body does not make a 200)."""
    response = flow.response
    if response is not None and response.stream:
        return response.status_code
    if not flow.client_conn.state & ConnectionState.CAN_WRITE:
        return 0
    state = state_of(flow)
    return 504 if state is not None and state.timeout else 502


def body_usage(state: FlowState, response: http.Response) -> Usage | None:
    """The usage in a whole response body, read as the request's API writes it; None when it
    has none or cannot be decoded (corrupt gzip: its row still counts)."""
    if response.raw_content is None:
        return None
    try:
        return APIS.get(state.api, DEFAULT_API).usage_from_body(plain_content(response))
    except ValueError:
        return None


def stream_usage(flow: http.HTTPFlow, watcher: StreamUsageReader, sample: StreamSample) -> Usage:
    """What a finished or abandoned stream is charged: the provider's usage when it came and
    counts the answer; else an estimate (wire/estimate.py) from the request body and the text
    the client was sent, with the tokens the provider did report (Anthropic's input tokens)
    taking precedence. A stream that sent text is never charged zero (a client that hangs up
    before the usage chunk must not get it free)."""
    usage = watcher.usage
    if usage is not None and not sample.late_usage and usage.completion_tokens:
        return usage  # the usual case: nothing more to read
    chars = sample.text_chars()
    if usage is not None and not sample.late_usage and not chars:
        return usage  # the provider's count, and no answer text to dispute it
    try:
        body = plain_content(flow.request)
    except ValueError:
        body = flow.request.raw_content or b""
    if usage is None:
        return estimate_from_chars(body, chars)
    estimate = estimate_from_chars(body, chars, usage.prompt_tokens)
    return estimate._replace(completion_tokens=max(estimate.completion_tokens, usage.completion_tokens),
                             cached_tokens=usage.cached_tokens)


def watched_stream(
    inner: Callable | bool, watcher: StreamUsageReader, sample: StreamSample | None = None
) -> Callable[[bytes], list[bytes]]:
    """Compose the stream callable mitmproxy already has (or True: pass through) with `watcher`."""
    broken = False

    def stream(piece: bytes) -> list[bytes]:
        nonlocal broken
        out = inner(piece) if callable(inner) else piece
        parts = [out] if isinstance(out, (bytes, bytearray)) else list(out)
        if broken:
            return [p for p in parts if p]
        held = watcher.held  # bytes the watcher holds back from earlier pieces
        before = watcher.usage
        try:
            sent: list[bytes] = []
            for part in parts:
                if part:
                    sent.extend(watcher.feed(bytes(part)))
            if not piece:
                sent.extend(watcher.feed(b""))
                if watcher.usage is not before and sample is not None:
                    sample.late_usage = True
            sent = [p for p in sent if p]
            if sample is not None:
                for p in sent:
                    sample.add(p)
            return sent
        except Exception:
            # accounting must not break a client's stream: send on what the watcher held back
            log.exception("gateway: stream usage watcher failed; this stream is not counted")
            broken = True
            return [p for p in [held, *parts] if p]

    return stream
