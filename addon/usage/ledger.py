"""The usage ledger: one row per routed request, in a SQLite file (usage/sqlite.py) or in
PostgreSQL (usage/postgres.py); the table is usage/ledger_sql.py's.

The read side: `spend_buckets` seeds the in-memory store at start-up (budgets survive
restarts), and `python -m addon.usage.ledger [--db F] [--key NAME] [--since DATE]` prints a per-key
table (`./run.sh usage`).

A `postgresql://` target instead of a file keeps the same table in PostgreSQL (for gateways on
several machines): `open_ledger` and the read functions here choose by target.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import logging
import sys
from datetime import datetime, timezone


from addon.usage import sqlite
from addon.usage.sqlite import SQLiteLedger
from addon.wire.secreturl import masked_url, resolve

log = logging.getLogger("gateway")


def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def open_ledger(target: str):
    """The ledger writer for USAGE_DB: a SQLite file, or a postgresql:// connection string."""
    if is_postgres(target):
        from addon.usage.postgres import PostgresLedger  # psycopg only when it is used
        return PostgresLedger(target)
    return SQLiteLedger(target)


def spend_buckets(path: str, bucket_seconds: int) -> list[tuple[str, float, int, float]]:
    """(fingerprint, bucket start, tokens, usd) for every bucket with usage: seeds budgets."""
    if is_postgres(path):
        from addon.usage import postgres
        return postgres.spend_buckets(path, bucket_seconds)
    return sqlite.spend_buckets(path, bucket_seconds)


def recent_tokens(path: str, since: float) -> list[tuple[str, float, int]]:
    """(fingerprint, time, tokens) of requests since `since`, oldest first: seeds the tpm window."""
    if is_postgres(path):
        from addon.usage import postgres
        return postgres.recent_tokens(path, since)
    return sqlite.recent_tokens(path, since)


def stored_responses(path: str, since: float, per_key: int) -> list[tuple[str, str, str, float]]:
    """(fingerprint, response id, target id, time) of the stored responses created since `since`,
    the newest `per_key` per key, oldest first: seeds the stores' owner records (a restart keeps
    who may read, continue or delete each)."""
    if is_postgres(path):
        from addon.usage import postgres
        return postgres.stored_responses(path, since, per_key)
    return sqlite.stored_responses(path, since, per_key)


def usage_table(path: str, key: str | None = None, since: float | None = None) -> list[tuple]:
    """Per key: name, fingerprint, requests, prompt, completion, cached tokens, cost."""
    if is_postgres(path):
        from addon.usage import postgres
        return postgres.usage_table(path, key, since)
    return sqlite.usage_table(path, key, since)

def parse_since(text: str) -> float:
    """A date or ISO time (UTC unless it says otherwise) -> unix seconds."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def format_table(rows: list[tuple]) -> str:
    header = ("key", "fingerprint", "requests", "prompt", "completion", "cached", "cost_usd")
    lines = [header] + [
        (name, fp, str(n), str(p or 0), str(c or 0), str(cached or 0), f"{usd or 0:.6f}")
        for name, fp, n, p, c, cached, usd in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    # text columns left-aligned, numbers right-aligned
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.sh usage", description="Per-key usage from the gateway's usage ledger.")
    parser.add_argument(
        "--db",
        default="usage.sqlite3",
        help="ledger file or postgresql:// URL; env:USAGE_DB reads it from the environment (run.sh does)",
    )
    parser.add_argument("--key", help="only this key: its name, fingerprint or the virtual key itself")
    parser.add_argument("--since", help="only requests at or after this date/time, e.g. 2026-11-01 (UTC)")
    args = parser.parse_args(argv)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError:
        print(f"usage: --since {args.since!r} is not a date such as 2026-11-01 or 2026-11-01T12:00", file=sys.stderr)
        return 2
    try:
        args.db = resolve("--db", args.db)
    except ValueError as e:
        print(f"usage: {e}", file=sys.stderr)
        return 2
    if not args.db:
        where = live_spend()
        print("usage: USAGE_DB is empty, so the gateway keeps no usage ledger"
              + (f"; budgets count the live spend in {where}" if where else ""), file=sys.stderr)
        return 1
    if not is_postgres(args.db) and not os.path.exists(args.db):
        print(f"usage: no usage ledger at {args.db} (the gateway creates it; USAGE_DB names another)", file=sys.stderr)
        return 1
    try:
        rows = usage_table(args.db, args.key, since)
    except Exception as e:  # sqlite3.Error, psycopg.Error
        if not isinstance(e, sqlite3.Error) and type(e).__module__.split(".")[0] != "psycopg":
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"usage: cannot read ledger {masked_url(args.db)}: {reason}", file=sys.stderr)
        return 1
    if args.key and not rows:
        # never echo --key: it may be a virtual key
        print(
            f"usage: no such key in {masked_url(args.db)} (give a key name, a fingerprint or a virtual key)",
            file=sys.stderr,
        )
        return 1
    print(format_table(rows))
    where = live_spend()
    if where:
        print(f"usage: this table is the ledger's; budgets count the live spend in {where}, which a gateway "
              "compares with this ledger at start and says when they disagree (docs/shared-state.md)", file=sys.stderr)
    return 0


def live_spend() -> str | None:
    """Where budgets' spend lives when it is not this ledger: Redis (REDIS_URL, or a fleet's own
    redis-server, which keeps its data in $FLEET_DIR/redis across restarts); None: one gateway
    without Redis, whose budgets are seeded from this ledger at each start."""
    if os.environ.get("REDIS_URL"):
        return f"Redis ({masked_url(os.environ['REDIS_URL'])})"
    fleet_redis = os.path.join(os.environ.get("FLEET_DIR") or ".fleet", "redis")
    if os.path.isdir(fleet_redis):
        return f"the fleet's Redis (GATEWAY_WORKERS > 1; its data in {fleet_redis})"
    return None


if __name__ == "__main__":
    sys.exit(main())
