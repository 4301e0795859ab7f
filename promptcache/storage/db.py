"""PostgreSQL access: idempotent writes of the change stream, and the reads the CLI needs."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from promptcache.storage import stats
from schemas.events import ChangeEvent


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


# a batch of entries, from arrays (one per column): an entry whose hits were written before it
# (by another persister, in an earlier batch) starts with those hits counted
_UPSERT_ENTRIES = """
INSERT INTO cache_entries (entry_id, cache_key, prompt, canonical_prompt, negative_prompt, params,
    optimizer_version, generator, blob_sha256, content_type, width, height, image_bytes,
    thumbnail_bytes, generation_ms, created_at, last_used_at, hit_count, scope)
SELECT u.entry_id, u.cache_key, u.prompt, u.canonical_prompt, u.negative_prompt, u.params::jsonb,
    u.optimizer_version, u.generator, u.blob_sha256, u.content_type, u.width, u.height,
    u.image_bytes, u.thumbnail_bytes, u.generation_ms, u.at,
    GREATEST(u.at, (SELECT max(h.at) FROM cache_hits h WHERE h.entry_id = u.entry_id)),
    (SELECT count(*) FROM cache_hits h WHERE h.entry_id = u.entry_id), u.scope
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::text[], %s::text[], %s::text[], %s::int[], %s::int[], %s::bigint[],
            %s::bigint[], %s::float8[], %s::timestamptz[], %s::text[])
    AS u(entry_id, cache_key, prompt, canonical_prompt, negative_prompt, params,
         optimizer_version, generator, blob_sha256, content_type, width, height, image_bytes,
         thumbnail_bytes, generation_ms, at, scope)
WHERE NOT EXISTS (SELECT 1 FROM evicted_entries t WHERE t.entry_id = u.entry_id)
ON CONFLICT (entry_id) DO NOTHING
"""
# a batch of hits: rows for the requests not recorded yet, then each entry touched once with
# the number of its new hits and its latest use
_INSERT_HITS = """
WITH fresh AS (
    INSERT INTO cache_hits (entry_id, request_id, tier, latency_ms, at)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::timestamptz[])
    ON CONFLICT (entry_id, request_id) DO NOTHING
    RETURNING entry_id, at
), per_entry AS (
    SELECT entry_id, count(*) AS hits, max(at) AS last_at FROM fresh GROUP BY entry_id
)
UPDATE cache_entries c SET hit_count = c.hit_count + p.hits,
    last_used_at = GREATEST(c.last_used_at, p.last_at)
FROM per_entry p WHERE c.entry_id = p.entry_id
"""
_INSERT_ORIGINS = """
INSERT INTO entry_origins (entry_id, request_id, tier, latency_ms, at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::timestamptz[])
ON CONFLICT (entry_id) DO NOTHING
"""
_INSERT_SEMANTIC = """
INSERT INTO semantic_entries (entry_id, cache_key, partition, model, dim, canonical_prompt,
    embedding, created_at)
SELECT %s, %s, %s, %s, %s, %s, %s::text::{type}, %s
WHERE NOT EXISTS (SELECT 1 FROM evicted_entries t WHERE t.entry_id = %s)
ON CONFLICT (entry_id) DO NOTHING
"""
_REPLACE_SEMANTIC = """
INSERT INTO semantic_entries (entry_id, cache_key, partition, model, dim, canonical_prompt,
    embedding, created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s::text::{type}, now())
ON CONFLICT (entry_id) DO UPDATE SET partition = EXCLUDED.partition, model = EXCLUDED.model,
    dim = EXCLUDED.dim, embedding = EXCLUDED.embedding
"""


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column: the arrays a multi-row `unnest()` insert takes."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


# SQLSTATE classes of errors that one event's content causes: 22 data exception (a value out
# of range, bad text or JSON), 23 integrity constraint violation (a NULL where a value is due),
# 54 program limit exceeded (a value too large for an index row)
_DATA_CLASSES = ("22", "23", "54")


def is_data_error(exc: BaseException) -> bool:
    """True when `exc` is PostgreSQL (or psycopg, or our conversion of an event) refusing what
    a batch holds, so a smaller batch without the event at fault would be written. Everything
    else (connection errors, admin shutdown, statement or lock timeouts, serialisation
    failures, a missing table, an unexpected error) is an outage: retry later, drop nothing."""
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate:
            return exc.sqlstate[:2] in _DATA_CLASSES
        # raised by psycopg itself before sending: a value it cannot adapt
        return isinstance(exc, psycopg.DataError)
    # our conversion of an event: a bad timestamp, base64 or float32 embedding
    return isinstance(exc, ValueError | OverflowError | struct.error)


def _floats(encoded: str) -> list[float]:
    """The change event's embedding: base64 of little-endian float32."""
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) // 4 * 4]))


def _vector_literal(vector: list[float], vector_type: str) -> str:
    body = ",".join(f"{x:.7g}" for x in vector)
    return f"[{body}]" if vector_type == "vector" else f"{{{body}}}"


class MetadataStore:
    """One async connection, opened lazily and reopened after a failure."""

    def __init__(self, database_url: str, connect_timeout: float = 5.0,
                 statement_timeout: timedelta = timedelta(seconds=60)) -> None:
        self.database_url = database_url
        self.connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._vector_type: str | None = None  # "vector" (pgvector) or "real[]"
        # a write stuck behind a lock or a struggling server ends as an outage (57014), retried
        self.statement_timeout = statement_timeout

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self.database_url, connect_timeout=int(self.connect_timeout), autocommit=False
            )
            try:
                await conn.execute("SELECT set_config('statement_timeout', %s, false)",
                                   (f"{int(self.statement_timeout.total_seconds() * 1000)}",))
                await conn.commit()
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def apply_changes(self, batch: Sequence[tuple[str, ChangeEvent]]) -> None:
        """Write a batch of (stream entry id, event) in one transaction, a handful of statements
        whatever its size (arrays unnested, hits aggregated per entry). Idempotent: events
        already applied (a redelivered batch) are skipped, so rollups never count twice.

        The events' text must be safe for PostgreSQL (`safe_text`): the persister makes it so.
        A failure is raised as it came; `is_data_error` tells one event at fault from an
        outage. After an outage the connection is dropped (reopened on the next call)."""
        conn = await self._connection()
        try:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.execute(
                    "INSERT INTO applied_changes (event_id) SELECT unnest(%s::text[])"
                    " ON CONFLICT DO NOTHING RETURNING event_id", ([i for i, _ in batch],))
                fresh = {row[0] for row in await cur.fetchall()}
                await self._write(cur, [e for i, e in batch if i in fresh])
        except BaseException as exc:
            if not is_data_error(exc) or conn.broken:
                await self.aclose()
            raise

    async def _write(self, cur: psycopg.AsyncCursor[Any], events: list[ChangeEvent]) -> None:
        summary = stats.rollup(events)
        if summary.results:
            await cur.executemany(stats.UPSERT_RESULTS, stats.result_params(summary.results))
        if summary.evictions:
            await cur.executemany(stats.UPSERT_EVICTIONS,
                                  stats.eviction_params(summary.evictions))
        stored = [e for e in events if e.type == "entry_stored"]
        if stored:
            await cur.execute(_UPSERT_ENTRIES, _columns([
                (e.entry_id, e.cache_key, e.prompt, e.canonical_prompt, e.negative_prompt,
                 json.dumps(e.params or {}), e.optimizer_version, e.generator, e.blob_sha256,
                 e.content_type, e.width, e.height, e.image_bytes, e.thumbnail_bytes,
                 e.generation_ms, _ts(e.at), e.scope) for e in stored], 17))
        # the vector's durable copy: with the entry, or later (`entry_embedded`: the entry was
        # stored while the model loaded and indexed once it was ready)
        embedded = [e for e in events if e.type in ("entry_stored", "entry_embedded")
                    and e.embedding and e.partition
                    and e.embedding_model and e.canonical_prompt is not None]
        if embedded:
            vector_type = await self._embedding_type(cur)
            await cur.executemany(_INSERT_SEMANTIC.format(type=vector_type), [
                (e.entry_id, e.cache_key, e.partition, e.embedding_model, len(vector),
                 e.canonical_prompt, _vector_literal(vector, vector_type), _ts(e.at),
                 e.entry_id)
                for e in embedded if (vector := _floats(e.embedding or ""))])
        origins = [e for e in stored if e.request_id]
        if origins:
            await cur.execute(_INSERT_ORIGINS, _columns([
                (e.entry_id, e.request_id, e.tier or "miss", e.latency_ms, _ts(e.at))
                for e in origins], 5))
        if summary.hits:
            await cur.execute(_INSERT_HITS, _columns([
                (h.entry_id, h.request_id, h.tier, h.latency_ms, h.at) for h in summary.hits],
                5))
        evicted = [e.entry_id for e in events if e.type == "entry_evicted"]
        if evicted:  # remembered: its entry_stored may come later, from another shard
            await cur.execute("INSERT INTO evicted_entries (entry_id) SELECT unnest(%s::text[])"
                              " ON CONFLICT DO NOTHING", (evicted,))
            await cur.execute("DELETE FROM cache_entries WHERE entry_id = ANY(%s)", (evicted,))
            await cur.execute("DELETE FROM semantic_entries WHERE entry_id = ANY(%s)",
                              (evicted,))

    async def replace_embeddings(self, model: str,
                                 rows: Sequence[tuple[str, str, str, str, Sequence[float]]]
                                 ) -> None:
        """`promptcache reindex`: (entry id, cache key, params partition, canonical prompt,
        vector) re-embedded by `model`, replacing the durable copy."""
        conn = await self._connection()
        try:
            async with conn.transaction(), conn.cursor() as cur:
                vector_type = await self._embedding_type(cur)
                await cur.executemany(_REPLACE_SEMANTIC.format(type=vector_type), [
                    (entry_id, cache_key, partition, model, len(vector), canonical,
                     _vector_literal([float(x) for x in vector], vector_type))
                    for entry_id, cache_key, partition, canonical, vector in rows])
        except BaseException:
            await self.aclose()
            raise

    async def _embedding_type(self, cur: psycopg.AsyncCursor[Any]) -> str:
        if self._vector_type is None:
            await cur.execute("SELECT udt_name FROM information_schema.columns WHERE"
                              " table_name = 'semantic_entries' AND column_name = 'embedding'")
            row = await cur.fetchone()
            self._vector_type = "vector" if row and row[0] == "vector" else "real[]"
        return self._vector_type

    async def prune_applied(self, older_than: timedelta = timedelta(days=2)) -> int:
        conn = await self._connection()
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute("DELETE FROM applied_changes WHERE applied_at < now() - %s",
                              (older_than,))
            pruned = cur.rowcount
            await cur.execute("DELETE FROM evicted_entries WHERE evicted_at < now() - %s",
                              (older_than,))
            return pruned


# review and invalidation: short-lived connections (operator actions, the dashboard)

_SERVED = """
SELECT request_id, tier, latency_ms, at, true AS generated FROM entry_origins WHERE entry_id = %s
UNION ALL
SELECT request_id, tier, latency_ms, at, false FROM cache_hits WHERE entry_id = %s
ORDER BY at
"""


async def served_requests(database_url: str, entry_id: str) -> list[dict[str, Any]]:
    """Every request an entry answered: the one that generated it, then each hit, oldest first."""
    async with await psycopg.AsyncConnection.connect(
            database_url, connect_timeout=5, row_factory=dict_row) as conn:
        cur = await conn.execute(_SERVED, (entry_id, entry_id))
        return [dict(row, at=row["at"].timestamp()) for row in await cur.fetchall()]


async def entry_row(database_url: str, entry_id: str) -> dict[str, Any] | None:
    """What PostgreSQL knows of an entry: its row, or its flag once it was flagged."""
    async with await psycopg.AsyncConnection.connect(
            database_url, connect_timeout=5, row_factory=dict_row) as conn:
        cur = await conn.execute(
            "SELECT entry_id, blob_sha256, cache_key, prompt, content_type, false AS flagged"
            " FROM cache_entries WHERE entry_id = %s UNION ALL"
            " SELECT entry_id, blob_sha256, cache_key, prompt, NULL, true FROM flagged_entries"
            " WHERE entry_id = %s", (entry_id, entry_id))
        return await cur.fetchone()


async def entries_with_blob(database_url: str, blob_sha256: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=5) as conn:
        cur = await conn.execute("SELECT entry_id FROM cache_entries WHERE blob_sha256 = %s",
                                 (blob_sha256,))
        return [row[0] for row in await cur.fetchall()]


async def record_flag(database_url: str, *, entry_id: str, blob_sha256: str,
                      cache_key: str | None, prompt: str | None, reason: str | None) -> bool:
    """Record a flag (durably, before anything is evicted). False when it was already there."""
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=5) as conn:
        cur = await conn.execute(
            "INSERT INTO flagged_entries (entry_id, blob_sha256, cache_key, prompt, reason)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (entry_id) DO NOTHING",
            (entry_id, blob_sha256, cache_key, prompt, reason))
        return cur.rowcount == 1


async def flagged_entries(database_url: str, limit: int = 50) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(
            database_url, connect_timeout=5, row_factory=dict_row) as conn:
        cur = await conn.execute(
            "SELECT entry_id, blob_sha256, prompt, reason, flagged_at FROM flagged_entries"
            " ORDER BY flagged_at DESC LIMIT %s", (limit,))
        return [dict(row, flagged_at=row["flagged_at"].timestamp())
                for row in await cur.fetchall()]
