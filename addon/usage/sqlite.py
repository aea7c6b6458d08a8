"""The usage ledger in a SQLite file (the default, `USAGE_DB=usage.sqlite3`), written in batches.

`SQLiteLedger.record()` only appends the row to a list. `flush()`, which the accounting addon calls
every FLUSH_EVERY seconds on mitmproxy's event loop, inserts what gathered in one transaction
into a WAL database: a commit only writes WAL pages into the page cache (synchronous=NORMAL),
about 2 us per row. Not on a writer thread: a second Python thread starves for the GIL while
the proxy thread is busy and is woken at every GIL release of it (bench/ab.py: the thread cost
16-30 us of proxy CPU per request more than these batches). The one part that waits on the
disk, the WAL checkpoint (fsync), runs on a worker thread every CHECKPOINT_EVERY seconds.
`close()` writes what is pending, so a clean shutdown loses nothing; a crash can lose the rows
still pending (at most about one flush interval).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from urllib.parse import quote

from addon.usage.ledger_sql import (
    ADDED_COLUMNS,
    COLUMNS,
    INDEXES,
    MAX_PENDING,
    SCHEMA,
    SQLITE,
    UsageRecord,
    encodable,
    owners_sql,
    recent_sql,
    spend_sql,
    usage_query,
)

log = logging.getLogger("gateway")

_ROW = f"({', '.join('?' * len(COLUMNS))})"
BATCH = 500  # rows per INSERT statement: 7,500 parameters, under SQLite's 32,766


def insert_statement(rows: int) -> str:
    """One multi-row INSERT per batch: one statement step, where executemany takes one per row."""
    return f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES {', '.join([_ROW] * rows)}"


_INSERT_BATCH = insert_statement(BATCH)
FLUSH_EVERY = 0.2  # seconds between batches
CHECKPOINT_EVERY = 10.0  # seconds between WAL checkpoints (off the event loop)
BUSY_TIMEOUT = 0.05  # seconds a flush waits for another writer's lock before trying again later


def connect(path: str, timeout: float = 10, checkpoints: bool = True) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=timeout, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes, fast
    if not checkpoints:
        db.execute("PRAGMA wal_autocheckpoint=0")  # a commit must not stop to fsync the database
    db.executescript(SCHEMA)
    upgrade(db)
    return db


def upgrade(db: sqlite3.Connection) -> None:
    """Give a ledger file written by an older gateway the columns added since."""
    have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
    for name, definition in ADDED_COLUMNS:
        if name not in have:
            with db:
                db.execute(f"ALTER TABLE usage ADD COLUMN {name} {definition}")
    with db:
        for statement in INDEXES:
            db.execute(statement)


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _waits(error: sqlite3.OperationalError) -> str | None:
    """Why a write should be tried again later rather than its rows dropped, or None."""
    text = str(error)
    if "locked" in text or "busy" in text:
        return "locked"  # another writer: the usual short wait, not logged
    if "full" in text or "disk I/O" in text or "unable to open" in text or "readonly" in text:
        return text  # disk full, or the file went away under us: rows wait, logged once
    return None


class SQLiteLedger:
    def __init__(self, path: str) -> None:
        self.path = self.name = path
        self._db: sqlite3.Connection | None = connect(path, timeout=BUSY_TIMEOUT, checkpoints=False)
        self._identity = file_identity(path)
        self._open = True
        self._pending: list[UsageRecord] = []
        self._failing: str | None = None  # why writes fail at the moment (logged once, when it starts)

    def record(self, row: UsageRecord) -> None:
        self._pending.append(row)

    def flush(self) -> None:
        """Insert the pending rows (in statements of up to BATCH rows).

        - Rows another writer's lock keeps out, or a full disk, stay pending (up to MAX_PENDING,
          oldest dropped beyond that) and go in with a later flush; a full disk logs one line
          when it starts and one when rows are written again.
        - A ledger file deleted or replaced while the gateway runs is noticed here (its inode)
          and recreated, with an error in the log; the spend counted in memory is kept.
        - A batch that fails otherwise is written row by row: only a row that cannot be written
          is dropped (logged), never the rows that came with it."""
        if not self._open:
            return
        if (self._db is None or file_identity(self.path) != self._identity) and not self._reopen():
            self._keep([], self._pending)
            return
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        for start in range(0, len(rows), BATCH):
            batch = rows[start:start + BATCH]
            try:
                self._write_batch(batch)
            except sqlite3.OperationalError as e:
                why = _waits(e)
                if why is None:
                    self._write_rows(batch)
                    continue
                if why != "locked":
                    self._fails(why, len(rows) - start)
                self._keep(rows[start:], self._pending)
                return
            except Exception:  # sqlite3.Error, OverflowError, ...: one bad row, or all?
                self._write_rows(batch)
        if self._failing is not None:
            log.error("gateway: usage ledger %s is written again; the %d rows kept meanwhile are in it",
                      self.path, len(rows))
            self._failing = None

    def _keep(self, rows: list[UsageRecord], later: list[UsageRecord]) -> None:
        """Keep `rows` (then `later`) pending, in order, at most MAX_PENDING of them."""
        rows = rows + later
        kept = rows[-MAX_PENDING:]
        if len(kept) < len(rows):
            log.error("gateway: usage ledger %s cannot be written for long: %d oldest rows dropped",
                      self.path, len(rows) - len(kept))
        self._pending = kept

    def _fails(self, why: str, rows: int) -> None:
        if self._failing is None:
            log.error("gateway: usage ledger %s cannot be written (%s): %d rows kept in memory (up to %d)"
                      " and written when it can be", self.path, why, rows, MAX_PENDING)
        self._failing = why

    def _reopen(self) -> bool:
        """The ledger file was deleted or replaced: say so, and write to a new one."""
        if self._db is not None:  # first: closing the last connection removes its WAL, not the new one's
            gone = file_identity(self.path) is None
            self._db.close()
            self._db = None
            log.error("gateway: usage ledger %s was %s while the gateway ran: rows from now on go to a new file"
                      " (the rows before went with the old one); budgets keep the spend counted in memory,"
                      " but a restart reads only what the new file holds",
                      self.path, "deleted" if gone else "replaced")
        try:
            self._db = connect(self.path, timeout=BUSY_TIMEOUT, checkpoints=False)
        except (sqlite3.Error, OSError) as e:
            self._fails(f"it cannot be recreated: {e}", len(self._pending))
            return False
        self._identity = file_identity(self.path)
        return True

    async def write(self) -> None:
        """The accounting writer's call (PostgresLedger's goes to a thread): here on the loop."""
        self.flush()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (the fsync): call it from a worker thread. Never
        creates the file: a deleted ledger is for flush() to notice and recreate, loudly."""
        try:
            db = sqlite3.connect(f"file:{quote(self.path)}?mode=rw", uri=True, timeout=10)
        except sqlite3.OperationalError:
            return
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    def close(self) -> None:
        """Write everything pending and close (a later flush or close does nothing)."""
        if not self._open:
            return
        deadline = time.monotonic() + 10
        self.flush()
        while self._pending and time.monotonic() < deadline:  # another writer's lock, a full disk
            time.sleep(BUSY_TIMEOUT)
            self.flush()
        if self._pending:
            log.error("gateway: usage ledger %s: %d rows not written at shutdown (%s)",
                      self.path, len(self._pending), self._failing or "database locked")
        if self._db is not None:
            self._db.close()
        self._db, self._open = None, False

    def _write_batch(self, rows: list[UsageRecord]) -> None:
        sql = _INSERT_BATCH if len(rows) == BATCH else insert_statement(len(rows))
        try:
            with self._db:
                self._db.execute(sql, [value for row in rows for value in row])
        except UnicodeEncodeError:  # a lone surrogate (a client's model name) cannot be bound
            with self._db:
                self._db.execute(sql, [encodable(value) for row in rows for value in row])

    def _write_rows(self, rows: list[UsageRecord]) -> None:
        """One row at a time, after a batch failed: drop (and log) only the rows that fail."""
        failed, error = 0, None
        for row in rows:
            try:
                self._write_batch([row])
            except Exception as e:
                failed, error = failed + 1, e
        if failed:
            log.error("gateway: usage ledger %s: could not write %d of %d rows: %s",
                      self.path, failed, len(rows), type(error).__name__ + ": " + str(error)[:200])


def spend_buckets(path: str, bucket_seconds: int) -> list[tuple[str, float, int, float]]:
    """(fingerprint, bucket start, tokens, usd) for every bucket with usage: seeds budgets."""
    db = connect(path)
    try:
        return db.execute(spend_sql(SQLITE), (bucket_seconds, bucket_seconds)).fetchall()
    finally:
        db.close()


def recent_tokens(path: str, since: float) -> list[tuple[str, float, int]]:
    """(fingerprint, time, tokens) of requests since `since`, oldest first: seeds the tpm window."""
    db = connect(path)
    try:
        return db.execute(recent_sql(SQLITE), (since,)).fetchall()
    finally:
        db.close()


def stored_responses(path: str, since: float, per_key: int) -> list[tuple[str, str, str, float]]:
    """(fingerprint, response id, target id, time) of the stored responses created since `since`,
    the newest `per_key` per key, oldest first: seeds the owner records."""
    db = connect(path)
    try:
        return db.execute(owners_sql(SQLITE), (since, per_key)).fetchall()
    finally:
        db.close()


def usage_table(path: str, key: str | None = None, since: float | None = None) -> list[tuple]:
    """Per key: name, fingerprint, requests, prompt, completion, cached tokens, cost."""
    sql, args = usage_query(SQLITE, key, since)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()
