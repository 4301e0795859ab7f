"""The janitor: one active at a time (a lock with a TTL; a crashed one is replaced within it).

Each pass:
- records uses from `requests_answered` (and older `entry_hit`) change events, read by the shared
  group loop (its own group `janitor` on the change stream), in the LRU index; this part runs
  on every janitor, the lock guards only the passes below;
- TTL: evicts entries unused for `ttl` (registry, exact key, blob files, and, through an
  `entry_evicted` change event, the PostgreSQL row) — work proportional to what expired;
- storage cap: above the high watermark (95% of the limit) evicts least recently used entries
  down to the low watermark (90%); writers reserve bytes before writing, so the cap holds;
- streams: XTRIM MINID below the oldest entry every group still needs (never MAXLEN), results
  kept for `results_retention`, change events for at least `changes_retention`; removes consumers idle past `consumer_idle` with nothing pending.
On start, and every `orphan_interval`, it sweeps orphans (files no entry uses, entries whose
file is gone) and reconciles the byte account against the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import timedelta

import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from promptcache.cache.registry import EntryRegistry, Eviction
from promptcache.keys import JANITOR_GROUP, Keys
from promptcache.storage.store import Blobs
from consumers.group import GroupLoop, Stopper
from promptcache.streams import Delivery, GroupReader, flush_outbox, next_id, older_id
from schemas.events import ChangeEvent

log = structlog.get_logger(__name__)

HIGH_WATERMARK = 0.95
LOW_WATERMARK = 0.90


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def safe_trim_id(redis: aioredis.Redis, stream: str) -> str | None:
    """The lowest id some group still needs: everything below it may be trimmed."""
    try:
        groups = await redis.xinfo_groups(stream)
    except RedisError:
        return None
    floor: str | None = None
    for group in groups:
        candidate = next_id(_text(group["last-delivered-id"]))
        if group["pending"]:
            summary = await redis.xpending(stream, group["name"])
            if summary["min"] is not None:  # acked since XINFO: nothing lower is needed
                candidate = older_id(_text(summary["min"]), candidate)
        floor = candidate if floor is None else older_id(floor, candidate)
    return floor


class Janitor:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, consumer: str,
                 registry: EntryRegistry | None = None, blobs: Blobs | None = None,
                 ttl: timedelta = timedelta(days=30),
                 interval: timedelta = timedelta(seconds=30),
                 lock_ttl: timedelta = timedelta(seconds=60),
                 results_retention: timedelta = timedelta(days=1),
                 changes_retention: timedelta = timedelta(hours=1),
                 consumer_idle: timedelta = timedelta(hours=1),
                 orphan_grace: timedelta = timedelta(hours=1),
                 orphan_interval: timedelta = timedelta(hours=1),
                 block: timedelta = timedelta(seconds=1)) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.registry = registry
        self.blobs = blobs
        self.ttl = ttl
        self.interval = interval
        self.lock_ttl = lock_ttl
        self.results_retention = results_retention
        self.changes_retention = changes_retention
        self.consumer_idle = consumer_idle
        self.orphan_grace = orphan_grace
        self.orphan_interval = orphan_interval
        self.stopper = Stopper()
        # uses are read from every shard's change stream (one loop each)
        self.loops = [self._uses_loop(shard, block) for shard in keys.all_shards()]
        self.loop = self.loops[0]
        self.trimmed = 0
        self.evicted: dict[str, int] = {}
        self.uses_recorded = 0

    def _uses_loop(self, shard: Keys, block: timedelta) -> GroupLoop:
        reader = GroupReader(self.redis, shard.changes, JANITOR_GROUP, self.consumer,
                             claim_idle=timedelta(seconds=60), block=block)

        async def record(deliveries: list[Delivery]) -> None:
            await self.record_uses(deliveries, reader)

        return GroupLoop(reader, record, name=f"janitor/{shard.shard}", batch_size=500,
                         capacity=500, stopper=self.stopper, claim_idle=timedelta(seconds=60))

    def stop(self) -> None:
        self.stopper.stop()

    async def _hold_lock(self) -> bool:
        """Take or extend the one-janitor lock; False when another janitor holds it."""
        key, ttl = self.keys.janitor_lock, self.lock_ttl
        if await self.redis.set(key, self.consumer, nx=True, px=ttl):
            log.info("janitor_lock_taken", consumer=self.consumer)
            return True
        holder = await self.redis.get(key)
        if holder is not None and holder.decode() == self.consumer:
            await self.redis.pexpire(key, ttl)
            return True
        return False

    async def run(self, *, burst: bool = False) -> None:
        """Record uses continuously; while holding the lock, run the passes every `interval`.
        With burst=True: record every use waiting, run the passes once, return."""
        for loop in self.loops:
            await loop.ensure_group()
        log.info("janitor_started", consumer=self.consumer, group=JANITOR_GROUP,
                 shards=len(self.loops))
        try:
            if burst:
                await asyncio.gather(*(loop.run(burst=True) for loop in self.loops))
                await self._passes(sweep=True)
                return
            uses = [asyncio.create_task(loop.run()) for loop in self.loops]
            try:
                await self._maintain()
            finally:
                self.stopper.stop()
                await asyncio.gather(*uses)
        finally:
            await self._release_lock()
            log.info("janitor_stopped", consumer=self.consumer, evicted=self.evicted,
                     uses_recorded=self.uses_recorded)

    async def _maintain(self) -> None:
        next_pass = next_sweep = 0.0
        lock_check = min(self.lock_ttl.total_seconds() / 3, 5.0)
        while not self.stopper.stopping:
            try:
                if await self._hold_lock():
                    now = time.monotonic()
                    if now >= next_pass:
                        sweep = now >= next_sweep
                        await self._passes(sweep=sweep)
                        if sweep:
                            next_sweep = now + self.orphan_interval.total_seconds()
                        next_pass = now + self.interval.total_seconds()
                await self.stopper.sleep(min(lock_check, self.interval.total_seconds()))
            except (RedisError, OSError) as exc:
                log.warning("janitor_redis_error", error=str(exc))
                await self.stopper.sleep(1.0)

    async def _passes(self, *, sweep: bool) -> None:
        if not await self._hold_lock():
            return
        if sweep:
            await self.sweep_orphans()
        for shard in self.keys.all_shards():
            await self._per_shard("flush_outbox", shard, flush_outbox(
                self.redis, shard.outbox, shard.results, cluster=shard.cluster))
        await self.enforce()
        await self.trim_streams()
        await self.remove_dead_consumers()

    async def _per_shard(self, step: str, shard: Keys, work: Awaitable[object]) -> None:
        """One shard's part of a pass: a shard whose primary is down (a failover under way)
        is logged and skipped, so the other shards and the storage cap still get their pass."""
        try:
            await work
        except (RedisError, OSError) as exc:
            if self.keys.shards == 1:
                raise
            log.warning("janitor_shard_skipped", step=step, shard=shard.shard, error=str(exc))

    async def _release_lock(self) -> None:
        try:
            holder = await self.redis.get(self.keys.janitor_lock)
            if holder is not None and holder.decode() == self.consumer:
                await self.redis.delete(self.keys.janitor_lock)
        except RedisError:
            pass

    async def record_uses(self, deliveries: list[Delivery],
                          reader: GroupReader | None = None) -> None:
        """A batch of change events: each answer or hit that names an entry moves it up the
        LRU index (to the latest time it was used)."""
        uses: dict[str, float] = {}

        def used(entry_id: str | None, at: float) -> None:
            if entry_id:
                uses[entry_id] = max(uses.get(entry_id, 0.0), at)

        for delivery in deliveries:
            try:
                event = ChangeEvent.model_validate_json(delivery.fields.get(b"data", b""))
            except ValidationError:
                continue
            if event.type == "entry_hit":
                used(event.entry_id, event.at)
            elif event.type == "requests_answered":
                for answer in event.answers or ():
                    if answer.status == "ok":
                        used(answer.entry_id, event.at)
        if self.registry is not None and uses:
            await self.registry.touch(uses)
            self.uses_recorded += len(uses)
        await (reader or self.loop.reader).ack(*[d.message_id for d in deliveries])

    async def enforce(self) -> None:
        """TTL, then the storage cap."""
        if self.registry is None:
            return
        cutoff = time.time() - self.ttl.total_seconds()
        while expired := await self.registry.expired(cutoff, limit=500):
            for eviction in await self.registry.evict_many(expired, reason="ttl"):
                await self._announce(eviction, "ttl")
        limit = self.registry.limit_bytes
        if await self.registry.stored() > limit * HIGH_WATERMARK:
            for eviction in await self.registry.evict_lru(
                    need=int(limit * (1 - LOW_WATERMARK)), reason="storage_limit"):
                await self._announce(eviction, "storage_limit")

    async def _announce(self, eviction: Eviction, reason: str) -> None:
        event = eviction.change_event(reason)
        await self.redis.xadd(self.keys.changes, {"data": event.model_dump_json(exclude_none=True)})
        self.evicted[reason] = self.evicted.get(reason, 0) + 1

    async def sweep_orphans(self) -> tuple[int, int]:
        """Files no entry uses (older than the grace: writers register first, then write) and
        entries whose file is gone; then the byte account is set from what is registered."""
        if self.registry is None or self.blobs is None:
            return 0, 0
        used = await self.registry.blob_shas()
        cutoff = time.time() - self.orphan_grace.total_seconds()
        blobs = self.blobs
        stale = await asyncio.to_thread(
            lambda: [item.name for item in blobs.listing()
                     if item.sha256 not in used and item.modified < cutoff])
        for name in stale:
            await asyncio.to_thread(blobs.delete_name, name)
        removed_files = len(stale)
        stored, removed_entries = await self.registry.reconcile(
            grace_s=self.orphan_grace.total_seconds(), announce=self._announce)
        if removed_files or removed_entries:
            log.info("orphans_removed", files=removed_files, entries=removed_entries)
        log.info("storage_reconciled", stored_bytes=stored)
        return removed_files, removed_entries

    async def trim_streams(self) -> None:
        for shard in self.keys.all_shards():
            await self._per_shard("trim", shard, self._trim(shard))

    async def _trim(self, shard: Keys) -> None:
        for stream in (shard.requests, shard.generate, shard.changes):
            floor = await safe_trim_id(self.redis, stream)
            if floor is not None and stream == shard.changes:  # and kept for a while
                kept = int((time.time() - self.changes_retention.total_seconds()) * 1000)
                floor = older_id(floor, f"{kept}-0")
            if floor is not None:
                self.trimmed += await self.redis.xtrim(stream, minid=floor, approximate=False)
        cutoff = int((time.time() - self.results_retention.total_seconds()) * 1000)
        self.trimmed += await self.redis.xtrim(shard.results, minid=f"{cutoff}-0",
                                               approximate=False)

    async def remove_dead_consumers(self) -> int:
        removed = 0
        idle_ms = self.consumer_idle.total_seconds() * 1000
        for stream in (name for shard in self.keys.all_shards()
                       for name in (shard.requests, shard.generate, shard.changes)):
            try:
                groups = await self.redis.xinfo_groups(stream)
            except RedisError:
                continue
            for group in groups:
                for consumer in await self.redis.xinfo_consumers(stream, group["name"]):
                    if consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                        await self.redis.xgroup_delconsumer(stream, group["name"],
                                                            consumer["name"])
                        removed += 1
        if removed:
            log.info("dead_consumers_removed", count=removed)
        return removed
