"""Operator commands: stats, purge, dead letters (flagging is in consumers/review.py)."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import redis.asyncio as aioredis

from consumers.cache.registry import EntryRegistry
from consumers.keys import Keys
from consumers.overview import database_stats, stream_stats
from consumers.review import evict_entries
from schemas.events import DeadLetter

__all__ = ["database_stats", "dead_letters", "purge", "render_stats", "replay", "stream_stats"]


def render_stats(streams: dict[str, Any], db: dict[str, Any] | None) -> str:
    lines = ["streams"]
    for name, info in streams["streams"].items():
        groups = ", ".join(f"{g}: pending {v['pending']}, lag {v['lag']}"
                           for g, v in info["groups"].items())
        lines.append(f"  {name:<32} length {info['length']:<8} {groups}")
    lines.append("workers (last health report)")
    for w in sorted(streams["workers"], key=lambda w: w["consumer"]):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(w.items())
                           if k not in ("consumer", "at"))
        lines.append(f"  {w['consumer']:<32} {counts}  ({time.time() - w['at']:.0f}s ago)")
    if not streams["workers"]:
        lines.append("  none reporting")
    lines.append(f"cache: {streams['entries']:,} entries, {streams['stored_bytes']:,} bytes stored")
    if semantic := streams.get("semantic"):
        lines.append(f"semantic tier: {semantic['vectors']:,} vectors shared")
        for index in semantic["indexes"]:
            lines.append(f"  {index['consumer']:<32} {index.get('entries', 0):,} in memory,"
                         f" {index.get('memory_bytes', 0) / 1e6:.1f} MB ({index.get('model')})")
            if others := index.get("other_models"):
                lines.append(f"  {'':<32} {others:,} embedded by another model: exact-only "
                             "until `promptcache reindex`")
        refused = {k.split(":", 1)[1]: v for k, v in semantic["decisions"].items()
                   if k.startswith("refused:")}
        skipped = {k.split(":", 1)[1]: v for k, v in semantic["decisions"].items()
                   if k.startswith("skipped:")}
        if refused:
            lines.append("  verifier refused: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(refused.items(), key=lambda kv: -kv[1])))
        if skipped:
            lines.append("  exact-only lookups: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])))
    if db is not None:
        hit_rate = f"{db['hit_rate']:.1%}" if db["hit_rate"] is not None else "-"
        lines += [
            f"last {db['since_hours']:g} hours (PostgreSQL rollups)",
            f"  requests {db['requests']:,}   hit rate {hit_rate}   generator calls"
            f" {db['generator_calls']:,} made, {db['generator_calls_avoided']:,} avoided"
            f" ({db['generator_seconds_avoided']:,} s saved)   bytes stored {db['bytes_stored']:,}",
            f"  {'tier':<12}{'requests':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"]
        for tier, row in db["by_tier"].items():
            lines.append(f"  {tier:<12}{row['requests']:>10,}{_ms(row['p50_ms'])}"
                         f"{_ms(row['p95_ms'])}{_ms(row['p99_ms'])}")
        for reason, row in db["evictions"].items():
            lines.append(f"  evicted ({reason}): {row['evictions']:,} entries,"
                         f" {row['bytes_freed']:,} bytes")
        lines.append(f"  entries in PostgreSQL {db['entries']:,} ({db['bytes']:,} bytes)")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{value:>10.1f}" if value is not None else f"{'-':>10}"


async def purge(redis: aioredis.Redis, keys: Keys, database_url: str,
                registry: EntryRegistry, *, entry_ids: list[str] | None = None,
                prompt_like: str | None = None, older_than_s: float | None = None,
                everything: bool = False) -> int:
    """Evict matching entries through the same path as the janitor's evictions: registry,
    exact key, blob files (with the last reference), and the metadata row via the change stream.
    Entries are found in PostgreSQL (which knows prompts and ages) and, for --all and --entry,
    in the registry too, so entries the persister has not written yet are not missed."""
    where, args = [], []
    if entry_ids:
        where.append("entry_id = ANY(%s)")
        args.append(entry_ids)
    if prompt_like:
        where.append("prompt ILIKE %s")
        args.append(f"%{prompt_like}%")
    if older_than_s is not None:
        where.append("created_at < now() - make_interval(secs => %s)")
        args.append(older_than_s)
    if not where and not everything:
        raise ValueError("say what to purge: --entry, --prompt, --older-than or --all")
    sql = "SELECT entry_id FROM cache_entries" + (" WHERE " + " AND ".join(where) if where else "")
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        ids = {row[0] for row in conn.execute(sql, args).fetchall()}  # type: ignore[arg-type]
    if everything and not where:
        ids |= {r.decode() for r in await registry.redis.zrange(keys.lru, 0, -1)}
    if entry_ids and not (prompt_like or older_than_s is not None):
        ids |= set(entry_ids)
    return await evict_entries(redis, keys, registry, sorted(ids), reason="purge")


async def dead_letters(redis: aioredis.Redis, keys: Keys, count: int) -> list[tuple[str, DeadLetter]]:
    entries = await redis.xrevrange(keys.dead_letter, count=count)
    return [(mid.decode(), DeadLetter.model_validate_json(f[b"data"])) for mid, f in entries]


async def replay(redis: aioredis.Redis, keys: Keys, ids: list[str] | None) -> int:
    """Put dead-lettered entries back on the stream they came from (as new entries) and drop them.

    A request that was dead-lettered after the delivery limit already got a `failed` result;
    replaying it is the operator's deliberate choice to try again, so its request id is
    forgotten and the replay gets a fresh result.
    """
    entries = await redis.xrange(keys.dead_letter) if ids is None else [
        e for mid in ids for e in await redis.xrange(keys.dead_letter, mid, mid)]
    replayed = 0
    for mid, fields in entries:
        letter = DeadLetter.model_validate_json(fields[b"data"])
        async with redis.pipeline(transaction=True) as pipe:
            if letter.request_id:
                pipe.delete(keys.done(letter.request_id))
            pipe.xadd(letter.stream, letter.entry)  # type: ignore[arg-type]
            pipe.xdel(keys.dead_letter, mid)
            await pipe.execute()
        replayed += 1
    return replayed
