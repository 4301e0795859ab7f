"""Redis Streams I/O: groups, reading and claiming, lease renewal, atomic publish + ack.

Knows stream ids and Redis, nothing about prompts or images.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MasterDownError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, TryAgainError

from promptcache.errors import ConfigError
from promptcache.stream_ids import entry_time_ms, id_order, millis, next_id, older_id

log = structlog.get_logger(__name__)

__all__ = ["entry_time_ms", "id_order", "millis", "next_id", "older_id"]  # and below


class DurabilityError(RedisError):
    """Durable mode: the server did not confirm a batch in its append-only file."""


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


class FailingOver(RedisConnectionError):
    """A cluster node answered that it is changing hands (a failover: a blocked read released
    with UNBLOCKED, a write refused by a demoted primary, slots not served yet). Like a lost
    connection: retried, and what was held stays pending."""


_FAILOVER_ERRORS = (ClusterDownError, TryAgainError, MasterDownError, ReadOnlyError)


@asynccontextmanager
async def failover_is_unreachable() -> AsyncIterator[None]:
    """Raise a failover's answers as `FailingOver`, which every caller retries like an outage
    (consumers.group.UNREACHABLE)."""
    try:
        yield
    except ResponseError as exc:
        if isinstance(exc, _FAILOVER_ERRORS) or str(exc).startswith("UNBLOCKED"):
            raise FailingOver(str(exc)) from exc
        raise


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
        self._claim_cursor = "0-0"  # XAUTOCLAIM goes on from where its last call stopped

    @property
    def source(self) -> Source:
        return Source(self.stream, self.group)

    async def ensure_group(self) -> None:
        await ensure_group(self.redis, self.stream, self.group)

    async def read(self, count: int, skip: Sequence[str] = ()) -> list[Delivery]:
        async with failover_is_unreachable():
            return await self._read(count, skip)

    async def _read(self, count: int, skip: Sequence[str]) -> list[Delivery]:
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
        cursor, claimed, *deleted = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=millis(self.claim_idle),
            start_id=self._claim_cursor, count=count)
        # the next call starts after what this one scanned (0-0 once the whole list is done),
        # so a dead consumer's entries behind many live, renewed ones are reached too
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
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
                                            count=count, block=millis(self.block))
        return [Delivery(mid.decode(), fields, redelivered=False)
                for _, entries in reply or [] for mid, fields in entries]

    async def _with_counts(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Each entry's delivery count, asked entry by entry (one round trip): a range query
        capped at some count could stop short of entries it should have counted, and an entry
        counted as a first delivery would escape `max_deliveries`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in deliveries:
                pipe.xpending_range(self.stream, self.group, min=d.message_id,
                                    max=d.message_id, count=1)
            replies = await pipe.execute()
        counts = {p["message_id"].decode(): int(p["times_delivered"])
                  for reply in replies for p in reply}
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


@dataclass(frozen=True, slots=True)
class Source:
    """Which stream and group an entry was read from: what acknowledging it means."""

    stream: str
    group: str


# One batch of answers, atomically. KEYS: [1] the stream read, [2] the change stream, [3] the
# results stream (where a result goes when its reply_to cannot be written), [4] the results
# counters hash, [5] the outbox, [6] the per-scope results counters hash; then per row [done
# marker, target stream, latency histogram hash].
# ARGV: [1] group, [2] done marker TTL in ms, [3] the head of the batch's `requests_answered`
# change event (JSON up to its answers array), [4] "1" to stage results in the outbox instead of
# publishing them (durable mode: `_FLUSH_OUTBOX` publishes them once the append-only file has
# the batch), [5] rows; then per row 9 values: entry id, kind
# ("r" a result, "h" a hand-off to another stream, "a" acknowledge only), data, fallback result
# ("" for none), answer JSON ("" for none), counter field, histogram bucket, latency in ms, the
# per-scope counter field ("" for none); then
# the number of change events, the number of other further entries (a dead letter), and their
# data; their streams are the KEYS after the rows'. Change events are written only when a row
# was published (or the batch has no rows): they belong to its answers, and a repeated call must
# not write them twice. Other further entries are written whatever the rows decide.
# A result is published, and its request marked done, only when the marker is absent: however
# often a request is delivered, and to however many workers at once, one result carries its id.
_PUBLISH_BATCH = """
local group, ttl, head, stage = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local n = tonumber(ARGV[5])
local answers, counts, sums, flags = {}, {}, {}, {}
local any = false
local staged_at = redis.call('TIME')[1]
local scounts = {}
local a = 6
for i = 1, n do
  local k = 6 + (i - 1) * 3
  local done, target, hist = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local mid, kind, data, fallback = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local answer, field, bucket, latency = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local sfield, foreign = ARGV[a + 8], ARGV[a + 9]
  a = a + 10
  flags[i] = 0
  -- acknowledged row by row: a hand-off happens only with the ack that took the entry out of
  -- the pending list, so a repeated call (a retry after a timeout, a lapsed lease) hands off once
  local acked = redis.call('XACK', KEYS[1], group, mid)
  if kind ~= 'a' and redis.call('EXISTS', done) == 0 then
    if kind == 'h' then
      if acked == 1 then
        redis.call('XADD', target, '*', 'data', data)
        flags[i] = 1
        any = true
      end
    else
      if foreign ~= '' then
        redis.call('HSET', KEYS[5], done, cjson.encode({foreign, data, fallback, staged_at}))
      elseif stage then
        redis.call('HSET', KEYS[5], done, cjson.encode({target, data, fallback, staged_at}))
      elseif fallback == '' then
        redis.call('XADD', target, '*', 'data', data)
      else
        local ok = redis.pcall('XADD', target, '*', 'data', data)
        if type(ok) == 'table' and ok.err then
          redis.call('XADD', KEYS[3], '*', 'data', fallback)
          flags[i] = 2
        end
      end
      if flags[i] == 0 then flags[i] = 1 end
      any = true
      redis.call('SET', done, mid, 'PX', ttl)
      if answer ~= '' then answers[#answers + 1] = answer end
      if sfield ~= '' then scounts[sfield] = (scounts[sfield] or 0) + 1 end
      if field ~= '' then
        counts[field] = (counts[field] or 0) + 1
        local h = sums[hist]
        if h == nil then h = {sum = 0, buckets = {}}; sums[hist] = h end
        h.sum = h.sum + tonumber(latency)
        h.buckets[bucket] = (h.buckets[bucket] or 0) + 1
      end
    end
  end
end
for field, c in pairs(counts) do redis.call('HINCRBYFLOAT', KEYS[4], field, c) end
for field, c in pairs(scounts) do redis.call('HINCRBYFLOAT', KEYS[6], field, c) end
for hist, h in pairs(sums) do
  for bucket, c in pairs(h.buckets) do redis.call('HINCRBYFLOAT', hist, bucket, c) end
  redis.call('HINCRBYFLOAT', hist, 'sum', h.sum)
end
if #answers > 0 then
  redis.call('XADD', KEYS[2], '*', 'data', head .. table.concat(answers, ',') .. ']}')
end
-- change events belong to the rows: written when a row was published (or there are none), so a
-- repeated call does not write them twice; further entries (a dead letter) always
local mc, me = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
for j = 1, mc + me do
  if j > mc or n == 0 or any then
    redis.call('XADD', KEYS[6 + n * 3 + j], '*', 'data', ARGV[a + 1 + j])
  end
end
return flags
"""

# Durable mode's second step: publish staged results. KEYS: [1] the outbox, [2] the results
# stream; ARGV: the staged rows' fields (their done markers). A row is published by whoever
# removes it from the outbox, so a worker and a recovery pass never both publish it. Returns
# per row 0 (already published), 1 or 2 (its reply_to could not be written: the fallback went
# to the results stream).
_FLUSH_OUTBOX = """
local flags = {}
for i, field in ipairs(ARGV) do
  flags[i] = 0
  local staged = redis.call('HGET', KEYS[1], field)
  if staged then
    local row = cjson.decode(staged)
    local ok = redis.pcall('XADD', row[1], '*', 'data', row[2])
    flags[i] = 1
    if type(ok) == 'table' and ok.err then
      if row[3] == '' then return redis.error_reply(ok.err) end  -- kept staged: nothing lost
      redis.call('XADD', KEYS[2], '*', 'data', row[3])
      flags[i] = 2
    end
    redis.call('HDEL', KEYS[1], field)  -- only once it is published
  end
end
return flags
"""

STALE_ON_ONE_SERVER = timedelta(seconds=10)  # staged rows older than this are a dead worker's
STALE_ON_CLUSTER = timedelta(seconds=60)
WAITAOF_TIMEOUT_MS = 3000  # durable mode: how long a batch may wait for its fsync (under the
# clients' 5 s socket timeout, so a slow fsync is an answer, not a dropped connection)
PUBLISHED, TO_FALLBACK = 1, 2  # what publish_batch says of a row; 0: not published (answered)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One row of a batch to publish: a result (once per request id), a hand-off of the entry
    to another stream, or a plain acknowledgement."""

    message_id: str  # the entry of the stream read that this row acknowledges
    done_key: str
    stream: str = ""  # where `data` goes: a results stream, or the stream handed off to
    data: str = ""
    kind: str = "r"  # "r" result, "h" hand-off, "a" acknowledge only
    fallback: str = ""  # the result for the results stream when `stream` cannot be written
    answer: str = ""  # this answer's JSON in the batch's `requests_answered` change event
    counter: str = ""  # the results counter field ("tier|status"), "" for none
    scope_counter: str = ""  # a scoped request's ("scope|tier|status"), "" for none
    histogram: str = ""  # the latency histogram hash
    bucket: int = 0
    latency_ms: float = 0.0


class Publisher:
    """Publishes outcomes and acknowledges what they answer: a batch in one script call."""

    def __init__(self, redis: aioredis.Redis, *, dead_letter_stream: str, changes_stream: str,
                 results_stream: str, metrics_results: str, done_ttl: timedelta,
                 outbox: str, metrics_scopes: str, durable: bool = False,
                 cluster: bool = False) -> None:
        self.redis = redis
        self.dead_letter_stream = dead_letter_stream
        self.changes_stream = changes_stream
        self.results_stream = results_stream
        self.metrics_results = metrics_results
        self.done_ttl = done_ttl
        self.outbox = outbox
        self.metrics_scopes = metrics_scopes
        self.durable = durable
        self.cluster = cluster  # a row whose stream is in another slot is staged, then moved
        self._slot = key_slot(outbox.encode())
        self._script = redis.register_script(_PUBLISH_BATCH)
        self._flush = redis.register_script(_FLUSH_OUTBOX)

    async def already_done(self, done_key: str) -> bool:
        return bool(await self.redis.exists(done_key))

    async def ack(self, source: Source, message_id: str) -> None:
        await self.redis.xack(source.stream, source.group, message_id)

    async def publish(self, source: Source, rows: Sequence[Outgoing], *,
                      changes: Sequence[str] = (),
                      extra: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Publish a batch atomically; per row PUBLISHED, TO_FALLBACK (the reply_to could not be
        written: the result went to the results stream) or 0 (answered before: acked only).
        `changes` (to the change stream) and `extra` ((stream, data) pairs) are written
        whatever the rows decide: they record what happened (to the cache, a dead letter).

        Durable mode publishes in two steps. The script marks the batch's requests done, acks
        them, counts them and stages their results in the outbox; then, on the same connection,
        `WAITAOF 1 0` waits until the server's append-only file has all that; only then are the
        results moved from the outbox to their streams. No reader sees a result the file does
        not hold. A crash between the steps leaves the results staged: `flush_stale` (worker
        start, every janitor pass) publishes them."""
        keys = [source.stream, self.changes_stream, self.results_stream, self.metrics_results,
                self.outbox, self.metrics_scopes]
        head = f'{{"type":"requests_answered","entry_id":"","at":{time.time()},"answers":['
        args: list[str | int | float] = [source.group, millis(self.done_ttl), head,
                                         "1" if self.durable else "0", len(rows)]
        foreign: list[tuple[int, str]] = []  # (row, done marker) staged for another slot
        for i, row in enumerate(rows):
            target = row.stream or self.results_stream
            elsewhere = ""
            if self.cluster and row.kind == "r" and key_slot(target.encode()) != self._slot:
                elsewhere, target = target, self.results_stream
                foreign.append((i, row.done_key))
            keys += [row.done_key, target, row.histogram or self.metrics_results]
            args += [row.message_id, row.kind, row.data, row.fallback, row.answer, row.counter,
                     row.bucket, row.latency_ms, row.scope_counter, elsewhere]
        further = [*((self.changes_stream, c) for c in changes), *extra]
        keys += [stream for stream, _ in further]
        args += [len(changes), len(extra)]
        args += [data for _, data in further]
        if not self.durable:
            async with failover_is_unreachable():
                flags = [int(f) for f in await self._script(keys=keys, args=args)]
            for i, done in foreign:  # staged by this call, or by an earlier attempt
                flags[i] = await publish_staged(self.redis, self.outbox, self.results_stream,
                                                done) or flags[i]
            return flags
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._script(keys=keys, args=args, client=pipe)
            # a write of our own after the script: WAITAOF covers this connection's writes, and
            # the file is sequential, so this also covers rows an earlier attempt (on another
            # connection, say before a timeout) staged and did not get to publish
            pipe.set(f"{self.outbox}:tick", time.time(), px=60_000)
            pipe.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
            flags, _, synced = await pipe.execute()
        if not synced or int(synced[0]) < 1:
            raise DurabilityError("the streams server did not confirm the batch in its "
                                  "append-only file within "
                                  f"{WAITAOF_TIMEOUT_MS} ms (is appendonly on?)")
        # every result row: those staged now, and any an earlier attempt staged (0 if none)
        staged = [(i, row.done_key) for i, row in enumerate(rows) if row.kind == "r"]
        flags = [int(f) for f in flags]
        if staged:
            published = await self._flush(keys=[self.outbox, self.results_stream],
                                          args=[done for _, done in staged])
            for (i, _), f in zip(staged, published, strict=True):
                flags[i] = int(f) or flags[i]
        return flags

    async def check_durable(self) -> None:
        """Durable mode needs the streams server's append-only file: say so at start, not on
        every batch."""
        if self.cluster:
            raise ConfigError(
                "PROMPTCACHE_DURABLE_RESULTS=true is not supported on a cluster yet: WAITAOF "
                "must run on the connection of the shard's primary that wrote the batch, which "
                "the cluster client does not expose")
        try:
            await self.redis.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
        except ResponseError as exc:
            raise ConfigError(
                f"PROMPTCACHE_DURABLE_RESULTS=true needs the streams server to run with "
                f"appendonly yes (WAITAOF answered: {exc})") from exc

    async def flush_stale(self, older_than: timedelta | None = None) -> int:
        return await flush_outbox(self.redis, self.outbox, self.results_stream, older_than,
                                  cluster=self.cluster)

    async def hand_off(self, source: Source, message_id: str, stream: str, data: str) -> None:
        """Move an entry to another stream: XADD there + XACK here, atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {"data": data})
            pipe.xack(source.stream, source.group, message_id)
            await pipe.execute()

    async def dead_letter(self, source: Source, message_id: str, *, data: str,
                          result: Outgoing | None = None) -> list[int]:
        """XADD the dead letter + XACK; with `result` (a row of kind "r") the request also gets
        its one `failed` result, unless it was answered before. One script call."""
        if result is None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_letter_stream, {"data": data})
                pipe.xack(source.stream, source.group, message_id)
                await pipe.execute()
            return []
        return await self.publish(source, [result], extra=[(self.dead_letter_stream, data)])


async def publish_staged(redis: aioredis.Redis, outbox: str, results_stream: str,
                         field: str | bytes) -> int:
    """Publish one staged result whose stream is in another cluster slot (no script can
    write both): XADD there, then remove it from the outbox. 0 when it was published before.
    Not atomic: a crash between the two steps, or two callers at once (a worker stalled past
    the recovery pass's 10 s), can publish it twice; never zero times."""
    raw = await redis.hget(outbox, field)
    if raw is None:
        return 0
    target, data, fallback, _ = json.loads(raw)
    flag = PUBLISHED
    try:
        await redis.xadd(target, {"data": data})
    except ResponseError as exc:
        if not fallback or not str(exc).startswith("WRONGTYPE"):
            raise  # the node is down or busy (a ResponseError too): the row stays staged
        await redis.xadd(results_stream, {"data": fallback})  # the reply_to holds another type
        flag = TO_FALLBACK
    await redis.hdel(outbox, field)
    return flag


async def flush_outbox(redis: aioredis.Redis, outbox: str, results_stream: str,
                       older_than: timedelta | None = None, *, cluster: bool = False) -> int:
    """Publish results staged longer ago than `older_than` (a worker died between its two
    steps); younger rows may still be waiting for their fsync, or (a cluster) for a worker
    whose client is retrying through a failover: 10 s on one server, 60 s on a cluster (more
    than the cluster client's retry budget, so a live worker is not raced). Returns how many."""
    if older_than is None:
        older_than = STALE_ON_CLUSTER if cluster else STALE_ON_ONE_SERVER
    staged = await redis.hgetall(outbox)
    cutoff = time.time() - older_than.total_seconds()
    stale = [field for field, value in staged.items() if float(json.loads(value)[3]) <= cutoff]
    if not stale:
        return 0
    if cluster:
        flags = [await publish_staged(redis, outbox, results_stream, f) for f in stale]
    else:
        flags = await redis.register_script(_FLUSH_OUTBOX)(keys=[outbox, results_stream],
                                                           args=stale)
    published = sum(1 for f in flags if f)
    if published:
        log.warning("staged_results_published", count=published, outbox=outbox)
    return published


def now_ms() -> float:
    return time.time() * 1000
