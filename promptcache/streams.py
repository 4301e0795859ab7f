"""Redis Streams I/O: groups, reading and claiming, lease renewal, atomic publish + ack.

Knows stream ids and Redis, nothing about prompts or images.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError, WatchError

log = structlog.get_logger(__name__)


def _ms(value: timedelta) -> int:
    return int(value.total_seconds() * 1000)


def entry_time_ms(message_id: str) -> int:
    """The millisecond timestamp in a stream entry id (`1700000000000-0`)."""
    return int(message_id.split("-", 1)[0])


@dataclass(frozen=True, slots=True)
class Delivery:
    message_id: str
    fields: dict[bytes, bytes]
    redelivered: bool
    times_delivered: int = 1


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    """Create the group from id 0 (so nothing already in the stream is skipped)."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
        log.info("group_created", stream=stream, group=group)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def is_nogroup(exc: Exception) -> bool:
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


class GroupReader:
    """One consumer of one group: claims what dead consumers left, then reads new entries."""

    def __init__(self, redis: aioredis.Redis, stream: str, group: str, consumer: str, *,
                 claim_idle: timedelta, block: timedelta) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.claim_idle = claim_idle
        self.block = block
        self._own_pending_checked = False

    async def ensure_group(self) -> None:
        await ensure_group(self.redis, self.stream, self.group)

    async def read(self, count: int, skip: Sequence[str] = ()) -> list[Delivery]:
        # 1. after a restart under the same name, our own pending entries come first
        if not self._own_pending_checked:
            self._own_pending_checked = True
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: "0"},
                                                count=count)
            own = [Delivery(mid.decode(), fields, redelivered=True)
                   for _, entries in reply for mid, fields in entries
                   if fields and mid.decode() not in skip]
            if own:
                return await self._with_counts(own)
        # 2. entries a dead (or stuck) consumer held longer than claim_idle
        _, claimed, *deleted = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=_ms(self.claim_idle),
            start_id="0-0", count=count)
        if deleted and deleted[0]:
            log.warning("claimed_entries_were_trimmed", stream=self.stream,
                        ids=[d.decode() for d in deleted[0]])
        taken = [Delivery(mid.decode(), fields, redelivered=True)
                 for mid, fields in claimed if mid is not None and mid.decode() not in skip]
        if taken:
            log.info("pending_claimed", stream=self.stream, count=len(taken))
            return await self._with_counts(taken)
        # 3. new entries
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                            count=count, block=_ms(self.block))
        return [Delivery(mid.decode(), fields, redelivered=False)
                for _, entries in reply or [] for mid, fields in entries]

    async def _with_counts(self, deliveries: list[Delivery]) -> list[Delivery]:
        ids = [d.message_id for d in deliveries]
        pending = await self.redis.xpending_range(
            self.stream, self.group, min=min(ids, key=_id_key), max=max(ids, key=_id_key),
            count=len(ids) * 4 + 10, consumername=self.consumer)
        counts = {p["message_id"].decode(): int(p["times_delivered"]) for p in pending}
        return [Delivery(d.message_id, d.fields, True, counts.get(d.message_id, 1))
                for d in deliveries]

    async def renew(self, message_ids: Sequence[str]) -> None:
        """Reset the idle time of entries we are still working on, so nobody claims them."""
        if message_ids:
            await self.redis.xclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                    message_ids=list(message_ids), justid=True)

    async def ack(self, *message_ids: str) -> None:
        if message_ids:
            await self.redis.xack(self.stream, self.group, *message_ids)


def _id_key(message_id: str) -> tuple[int, int]:
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Source:
    """Which stream and group an entry was read from: what acknowledging it means."""

    stream: str
    group: str


class Publisher:
    """Publishes outcomes and acknowledges what they answer, each in one MULTI/EXEC."""

    def __init__(self, redis: aioredis.Redis, *, dead_letter_stream: str, changes_stream: str,
                 done_ttl: timedelta) -> None:
        self.redis = redis
        self.dead_letter_stream = dead_letter_stream
        self.changes_stream = changes_stream
        self.done_ttl = done_ttl

    async def already_done(self, done_key: str) -> bool:
        return bool(await self.redis.exists(done_key))

    async def ack(self, source: Source, message_id: str) -> None:
        await self.redis.xack(source.stream, source.group, message_id)

    async def hand_off(self, source: Source, message_id: str, stream: str, data: str) -> None:
        """Move an entry to another stream: XADD there + XACK here, atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {"data": data})
            pipe.xack(source.stream, source.group, message_id)
            await pipe.execute()

    async def publish_result(self, source: Source, message_id: str, *, done_key: str,
                             stream: str, data: str, changes: Sequence[str] = (),
                             counters: Sequence[tuple[str, str, float]] = ()) -> bool:
        """XADD result + XACK + mark done, atomically; False when the request was answered before.

        WATCH on the done key makes a concurrent duplicate (the same request_id delivered twice,
        to two workers) lose the race instead of publishing a second result. No other
        connection is taken while the WATCH holds one (a full pool would deadlock).
        """
        published = False
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(done_key)
                if not await pipe.exists(done_key):
                    pipe.multi()
                    pipe.xadd(stream, {"data": data})
                    pipe.xack(source.stream, source.group, message_id)
                    pipe.set(done_key, message_id, ex=self.done_ttl)
                    for change in changes:
                        pipe.xadd(self.changes_stream, {"data": change})
                    for key, name, amount in counters:  # (hash, field, increment)
                        pipe.hincrbyfloat(key, name, amount)
                    await pipe.execute()
                    published = True
            except WatchError:
                pass
        if not published:
            await self.ack(source, message_id)
        return published

    async def dead_letter(self, source: Source, message_id: str, *, data: str,
                          result: tuple[str, str, str] | None = None) -> None:
        """XADD dead letter + XACK; with `result` = (stream, data, done_key) the request also
        gets its one `failed` result, unless it was answered before."""
        raced = False
        async with self.redis.pipeline(transaction=True) as pipe:
            answered = False
            if result is not None:
                await pipe.watch(result[2])
                answered = bool(await pipe.exists(result[2]))
                pipe.multi()
            pipe.xadd(self.dead_letter_stream, {"data": data})
            pipe.xack(source.stream, source.group, message_id)
            if result is not None and not answered:
                stream, payload, done_key = result
                pipe.xadd(stream, {"data": payload})
                pipe.set(done_key, message_id, ex=self.done_ttl)
            try:
                await pipe.execute()
            except WatchError:
                raced = True
        if raced:  # answered meanwhile: dead-letter without a second result
            await self.dead_letter(source, message_id, data=data)


def now_ms() -> float:
    return time.time() * 1000
