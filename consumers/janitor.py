"""The janitor: its own consumer group `janitor` on the change stream, one active at a time.

What it does today:
- keeps the stored-bytes account (`{prefix}:stats:stored-bytes`) from entry_stored/evicted events;
- trims the requests and change streams with XTRIM MINID below the oldest entry that every
  group still needs (never MAXLEN), and the results stream to `results_retention`.
TTL expiry and the storage cap come with the janitor issue (#5); exact keys already expire in
Redis by their TTL.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from consumers.keys import JANITOR_GROUP, Keys
from consumers.streams import GroupReader
from schemas.events import ChangeEvent

log = structlog.get_logger(__name__)


def _next_id(message_id: str) -> str:
    ms, _, seq = message_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _older(a: str, b: str) -> str:
    key = lambda m: tuple(int(x) for x in m.split("-"))  # noqa: E731
    return a if key(a) <= key(b) else b


async def safe_trim_id(redis: aioredis.Redis, stream: str) -> str | None:
    """The lowest id some group still needs: everything below it may be trimmed."""
    try:
        groups = await redis.xinfo_groups(stream)
    except RedisError:
        return None
    if not groups:
        return None
    floor: str | None = None
    for group in groups:
        name = group["name"]
        last = group["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else last
        candidate = _next_id(last)
        if group["pending"]:
            summary = await redis.xpending(stream, name)
            lowest = summary["min"]
            candidate = _older(lowest.decode() if isinstance(lowest, bytes) else lowest, candidate)
        floor = candidate if floor is None else _older(floor, candidate)
    return floor


class Janitor:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, consumer: str,
                 interval: timedelta = timedelta(seconds=30),
                 lock_ttl: timedelta = timedelta(seconds=60),
                 results_retention: timedelta = timedelta(days=1),
                 block: timedelta = timedelta(seconds=1)) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.interval = interval
        self.lock_ttl = lock_ttl
        self.results_retention = results_retention
        self.reader = GroupReader(redis, keys.changes, JANITOR_GROUP, consumer,
                                  claim_idle=timedelta(seconds=60), block=block)
        self._stopping = asyncio.Event()
        self.trimmed = 0

    def stop(self) -> None:
        self._stopping.set()

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
        await self.reader.ensure_group()
        log.info("janitor_started", consumer=self.consumer, group=JANITOR_GROUP)
        next_pass = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if not await self._hold_lock():
                        await self._pause(min(self.lock_ttl.total_seconds() / 3, 5.0))
                        continue
                    account = await self._account()
                    if time.monotonic() >= next_pass:
                        await self.trim_streams()
                        next_pass = time.monotonic() + self.interval.total_seconds()
                    if burst and not account:
                        return
                except (RedisError, OSError) as exc:
                    log.warning("janitor_redis_error", error=str(exc))
                    await self._pause(1.0)
        finally:
            try:
                holder = await self.redis.get(self.keys.janitor_lock)
                if holder is not None and holder.decode() == self.consumer:
                    await self.redis.delete(self.keys.janitor_lock)
            except RedisError:
                pass
            log.info("janitor_stopped", consumer=self.consumer)

    async def _account(self) -> int:
        deliveries = await self.reader.read(200)
        delta = 0
        for delivery in deliveries:
            try:
                event = ChangeEvent.model_validate_json(delivery.fields.get(b"data", b""))
            except ValidationError:
                continue
            size = (event.image_bytes or 0) + (event.thumbnail_bytes or 0)
            if event.type == "entry_stored":
                delta += size
            elif event.type == "entry_evicted":
                delta -= size
        if deliveries:
            async with self.redis.pipeline(transaction=True) as pipe:
                if delta:
                    pipe.incrby(self.keys.stored_bytes, delta)
                pipe.xack(self.keys.changes, JANITOR_GROUP, *[d.message_id for d in deliveries])
                await pipe.execute()
        return len(deliveries)

    async def trim_streams(self) -> None:
        for stream in (self.keys.requests, self.keys.generate, self.keys.changes):
            floor = await safe_trim_id(self.redis, stream)
            if floor is not None:
                self.trimmed += await self.redis.xtrim(stream, minid=floor, approximate=False)
        cutoff = int((time.time() - self.results_retention.total_seconds()) * 1000)
        self.trimmed += await self.redis.xtrim(self.keys.results, minid=f"{cutoff}-0",
                                               approximate=False)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass
