"""The usage ledger's table, shared by its two writers (usage/sqlite.py, usage/postgres.py).

One row per routed request. SCHEMA and COLUMNS define the table for both (PostgreSQL translates
the types); the read queries are written once, with a `Dialect` for what the two spell differently.
Rows hold the key's name and fingerprint, never a secret.
"""

from __future__ import annotations

from typing import NamedTuple

from addon.policy.keys_parse import HASHED_PREFIX
from addon.wire.secrets import fingerprint

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,                 -- unix seconds when the request arrived
    key_name TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,    -- sha256(virtual key)[:16]
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    status INTEGER NOT NULL,          -- HTTP status the client got; 0: connection failed
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    streamed INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    estimated INTEGER NOT NULL DEFAULT 0, -- 1: tokens estimated (usage/estimate.py), the provider's never came
    target TEXT NOT NULL DEFAULT '',      -- a key with several targets: the one that answered ("1", "pool[2]")
    attempts INTEGER NOT NULL DEFAULT 1,  -- upstream attempts this request took (failover)
    created TEXT NOT NULL DEFAULT '',     -- the stored response it created (resp_...): its owner, read back at start-up
    target_id TEXT NOT NULL DEFAULT '',   -- a key with several targets: the answering target's id (a hash, never the key)
    guardrails TEXT NOT NULL DEFAULT ''   -- what the key's guardrails masked, by detector ("secrets:2,emails:1"), never the text
);
CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_fingerprint, ts);
"""
# columns added after the first release: (name, definition), added by ALTER TABLE to older files
ADDED_COLUMNS = (("estimated", "INTEGER NOT NULL DEFAULT 0"), ("target", "TEXT NOT NULL DEFAULT ''"),
                 ("attempts", "INTEGER NOT NULL DEFAULT 1"), ("created", "TEXT NOT NULL DEFAULT ''"),
                 ("target_id", "TEXT NOT NULL DEFAULT ''"), ("guardrails", "TEXT NOT NULL DEFAULT ''"))
# made once the added columns are there (an older file gets them first)
INDEXES = ("CREATE INDEX IF NOT EXISTS usage_created ON usage (ts) WHERE created != ''",)
COLUMNS = (
    "ts",
    "key_name",
    "key_fingerprint",
    "provider",
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "latency_ms",
    "streamed",
    "cost_usd",
    "estimated",
    "target",
    "attempts",
    "created",
    "target_id",
    "guardrails",
)
MAX_PENDING = 200_000  # rows kept while another writer holds the lock (about 40 MB)


class UsageRecord(NamedTuple):  # a tuple: inserted as it is, in COLUMNS order
    ts: float
    key_name: str
    key_fingerprint: str
    provider: str
    model: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_ms: float
    streamed: bool
    cost_usd: float
    estimated: bool = False
    target: str = ""
    attempts: int = 1
    created: str = ""
    target_id: str = ""
    guardrails: str = ""  # (hooks/guardrails.py's ledger_value: counts by detector, never the text)


class Dialect(NamedTuple):
    """What the read queries spell differently in SQLite and PostgreSQL."""
    param: str  # placeholder
    hour: str  # the bucket number of ts, ts divided by the (placeholder) bucket length
    int_sum: str  # a sum of integers, as an integer


SQLITE = Dialect("?", "CAST(ts / ? AS INTEGER)", "SUM({})")


def spend_sql(d: Dialect) -> str:
    return (f"SELECT key_fingerprint, {d.hour} * {d.param}, {d.int_sum.format('prompt_tokens + completion_tokens')},"
            " SUM(cost_usd) FROM usage GROUP BY 1, 2")


def recent_sql(d: Dialect) -> str:
    return ("SELECT key_fingerprint, ts, prompt_tokens + completion_tokens FROM usage"
            f" WHERE ts >= {d.param} AND prompt_tokens + completion_tokens > 0 ORDER BY ts")


def owners_sql(d: Dialect) -> str:
    """(fingerprint, stored response id, target id, time) of the responses created since a time,
    the newest N per key, oldest first: the owner records a store is seeded with."""
    return ("SELECT key_fingerprint, created, target_id, ts FROM (SELECT key_fingerprint, created, target_id, ts,"
            " ROW_NUMBER() OVER (PARTITION BY key_fingerprint ORDER BY ts DESC) AS newest"
            f" FROM usage WHERE created != '' AND ts >= {d.param}) AS recent WHERE newest <= {d.param} ORDER BY ts")


def usage_query(d: Dialect, key: str | None = None, since: float | None = None) -> tuple[str, list]:
    """Per key: name, fingerprint, requests, prompt, completion, cached tokens, cost."""
    where, args = [], []
    if key:  # a name, a fingerprint, or a virtual key (matched by its fingerprint)
        where.append(f"(key_name = {d.param} OR key_fingerprint = {d.param} OR key_fingerprint = {d.param})")
        args += [key, key, key_fingerprint(key)]
    if since is not None:
        where.append(f"ts >= {d.param}")
        args.append(since)
    sums = ", ".join(d.int_sum.format(column) for column in ("prompt_tokens", "completion_tokens", "cached_tokens"))
    sql = (
        f"SELECT key_name, key_fingerprint, COUNT(*), {sums}, SUM(cost_usd) FROM usage"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " GROUP BY key_fingerprint, key_name ORDER BY key_name"
    )
    return sql, args


def key_fingerprint(text: str) -> str:
    """The fingerprint a --key names if it is a virtual key (or its "sha256:" form)."""
    if text.startswith(HASHED_PREFIX):
        return text[len(HASHED_PREFIX):].lower()[:16]
    return fingerprint(text)


def encodable(value):
    return value.encode("utf-8", "replace").decode() if isinstance(value, str) else value
