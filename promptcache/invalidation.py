"""Review and invalidation: evicting entries on an operator's word, flagging bad images, and
finding which requests an image was served to.

Flagging is the defence against a bad generation poisoning the cache. In order:

1. the flag is recorded in PostgreSQL (`flagged_entries`), durably, before anything changes;
2. the image's sha256 joins `{prefix}:cache:flagged-blobs` in the cache store, which the web
   process checks before serving an image or thumbnail (410 Gone) and the dashboard before
   showing a result;
3. every entry using that image is evicted through the registry, like `promptcache purge`:
   registry record, exact key (only while it still names the entry), blob files with the last
   reference, and the metadata row via an `entry_evicted` change event (reason `flagged`).

A request with the same prompt afterwards is a miss and is generated anew.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import redis.asyncio as aioredis
import structlog

from promptcache.cache.registry import EntryRegistry, Registered
from promptcache.keys import Keys
from promptcache.storage import db
from schemas.events import ChangeEvent

log = structlog.get_logger(__name__)


class UnknownEntry(LookupError):
    """Neither the registry nor PostgreSQL knows the entry id."""


async def evict_entries(redis: aioredis.Redis, keys: Keys, registry: EntryRegistry,
                        entry_ids: list[str], *, reason: str,
                        progress: Callable[[int, int], None] | None = None) -> int:
    """Evict entries through the registry (the janitor's path) and tell the persister, so the
    metadata rows go too. Entries the registry no longer knows still get their row dropped.
    Returns how many were still registered. `progress(done, total)` after each entry."""
    evicted = 0
    todo = sorted(set(entry_ids))
    for done, entry_id in enumerate(todo, 1):
        eviction = await registry.evict(entry_id, reason=reason)
        if eviction is None:  # not registered (any more): still drop the row
            event = ChangeEvent(type="entry_evicted", entry_id=entry_id, at=time.time(),
                                reason=reason)
        else:
            event = eviction.change_event(reason)
            evicted += 1
        await redis.xadd(keys.changes, {"data": event.model_dump_json(exclude_none=True)})
        if progress is not None:
            progress(done, len(todo))
    return evicted


@dataclass(frozen=True, slots=True)
class Flagged:
    entry_id: str
    blob_sha256: str
    evicted: list[str]  # every entry that was using the image
    already: bool  # the entry had been flagged before

    def as_dict(self) -> dict[str, Any]:
        return {"entry_id": self.entry_id, "blob_sha256": self.blob_sha256,
                "evicted": self.evicted, "already_flagged": self.already}


async def _registered(registry: EntryRegistry, entry_id: str) -> Registered | None:
    raw = await registry.redis.hget(registry.keys.entries, entry_id)
    return Registered.from_json(entry_id, raw) if raw else None


async def flag(redis: aioredis.Redis, keys: Keys, registry: EntryRegistry, database_url: str,
               entry_id: str, *, reason: str | None = None) -> Flagged:
    """Flag an entry's image as bad: never served again, every entry using it evicted."""
    record = await _registered(registry, entry_id)
    row = await db.entry_row(database_url, entry_id)
    if record is None and row is None:
        raise UnknownEntry(f"no entry {entry_id!r} in the cache or in PostgreSQL")
    blob = record.blob if record is not None else str(row["blob_sha256"])  # type: ignore[index]
    cache_key = record.cache_key if record is not None else row and row["cache_key"]
    fresh = await db.record_flag(database_url, entry_id=entry_id, blob_sha256=blob,
                                 cache_key=cache_key, prompt=row["prompt"] if row else None,
                                 reason=reason)
    await registry.redis.sadd(keys.flagged_blobs, blob)
    sharing = await db.entries_with_blob(database_url, blob)
    ids = sorted({entry_id, *sharing})
    await evict_entries(redis, keys, registry, ids, reason="flagged")
    log.info("entry_flagged", entry_id=entry_id, blob_sha256=blob, evicted=len(ids),
             reason=reason)
    return Flagged(entry_id, blob, ids, already=not fresh)


async def served(database_url: str, entry_id: str) -> list[dict[str, Any]]:
    """The requests an entry answered, oldest first (`generated` marks the one that made it)."""
    return await db.served_requests(database_url, entry_id)


async def is_flagged(cache: aioredis.Redis, keys: Keys, blob_sha256: str) -> bool:
    return bool(await cache.sismember(keys.flagged_blobs, blob_sha256))


async def purge(redis: aioredis.Redis, keys: Keys, database_url: str,
                registry: EntryRegistry, *, entry_ids: list[str] | None = None,
                prompt_like: str | None = None, older_than_s: float | None = None,
                everything: bool = False, scope: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> int:
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
    if scope is not None:  # one tenant's entries (from the registry), narrowed by the rest
        in_scope = set(await registry.entries_in_scope(scope))
        if where:
            sql = "SELECT entry_id FROM cache_entries WHERE " + " AND ".join(where)
            with psycopg.connect(database_url, connect_timeout=5) as conn:
                in_scope &= {row[0] for row in conn.execute(sql, args).fetchall()}  # type: ignore[arg-type]
        return await evict_entries(redis, keys, registry, sorted(in_scope), reason="purge",
                                   progress=progress)
    if not where and not everything:
        raise ValueError("say what to purge: --entry, --prompt, --older-than, --scope or --all")
    sql = "SELECT entry_id FROM cache_entries" + (" WHERE " + " AND ".join(where) if where else "")
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        ids = {row[0] for row in conn.execute(sql, args).fetchall()}  # type: ignore[arg-type]
    if everything and not where:
        ids |= {r.decode() for r in await registry.redis.zrange(keys.lru, 0, -1)}
    if entry_ids and not (prompt_like or older_than_s is not None):
        ids |= set(entry_ids)
    return await evict_entries(redis, keys, registry, sorted(ids), reason="purge",
                               progress=progress)
