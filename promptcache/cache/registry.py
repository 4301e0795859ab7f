"""The entry registry: which entries exist, when each was last used, which blobs they share,
and how many bytes are on disk. Lives in the cache Redis next to the exact keys.

    {p}:cache:entries       hash  entry_id -> {cache_key, blob, content_type, bytes, created}
    {p}:cache:lru           zset  entry_id -> last use (epoch seconds)
    {p}:cache:blob-refs     hash  sha256 -> number of entries using the blob
    {p}:cache:stored-bytes  int   bytes of registered blobs (image + thumbnail)
    {p}:semantic:vectors    hash  entry_id -> the entry's prompt embedding (semantic tier)
    {p}:semantic:log        stream  adds and removals, tailed by every worker's index

Registering reserves the bytes atomically against the storage cap *before* the file is written,
so concurrent writers can never overshoot it; a writer that does not fit evicts least recently
used entries itself (the janitor does the same from the other side). Unregistering is atomic
too: whoever removes an entry deletes, with the last reference, its blob files, and only then
gives their bytes back to the account.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from promptcache.keys import SEMANTIC_LOG_MAXLEN, Keys
from promptcache.storage.blobs import BlobStore
from schemas.events import ChangeEvent

log = structlog.get_logger(__name__)

NO_ROOM = -1

_REGISTER = """
local refs = tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '0')
local add = 0
if refs <= 0 then add = tonumber(ARGV[5]) end
local stored = tonumber(redis.call('GET', KEYS[4]) or '0')
if add > 0 and stored + add > tonumber(ARGV[6]) then return -1 end
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
if add > 0 then redis.call('INCRBY', KEYS[4], add) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return add
"""

_UNREGISTER = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local entry = cjson.decode(record)
local refs = redis.call('HINCRBY', KEYS[3], entry['blob'], -1)
local freed = 0
if refs <= 0 then
  redis.call('HDEL', KEYS[3], entry['blob'])
  freed = entry['bytes']  -- the caller DECRBYs once the files are gone
end
-- the semantic tier forgets it too, in every worker (they tail the log)
if redis.call('HDEL', KEYS[5], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[2], '*', 'op', 'del', 'id', ARGV[1])
end
return {record, freed}
"""

# delete the exact key only while it still names this entry (a refresh may have replaced it)
_DELETE_IF_SAME = """
local value = redis.call('GET', KEYS[1])
if value and cjson.decode(value)['entry_id'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Registered:
    entry_id: str
    cache_key: str
    blob: str
    content_type: str
    bytes: int
    created: float

    def to_json(self) -> str:
        return json.dumps({"cache_key": self.cache_key, "blob": self.blob,
                           "content_type": self.content_type, "bytes": self.bytes,
                           "created": self.created})

    @classmethod
    def from_json(cls, entry_id: str, raw: bytes | str) -> Registered:
        data = json.loads(raw)
        return cls(entry_id, data["cache_key"], data["blob"], data["content_type"],
                   int(data["bytes"]), float(data["created"]))


@dataclass(frozen=True, slots=True)
class Eviction:
    entry: Registered
    freed: int  # bytes of blob files removed (0 when another entry still uses the blob)

    def change_event(self, reason: str) -> ChangeEvent:
        """The `entry_evicted` change event that removes the entry's PostgreSQL rows."""
        entry = self.entry
        return ChangeEvent(type="entry_evicted", entry_id=entry.entry_id, at=time.time(),
                           cache_key=entry.cache_key, blob_sha256=entry.blob,
                           content_type=entry.content_type, image_bytes=self.freed,
                           reason=reason)


class EntryRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys, blobs: BlobStore, *,
                 limit_bytes: int) -> None:
        self.redis = redis
        self.keys = keys
        self.blobs = blobs
        self.limit_bytes = limit_bytes
        self._register = redis.register_script(_REGISTER)
        self._unregister = redis.register_script(_UNREGISTER)
        self._delete_if_same = redis.register_script(_DELETE_IF_SAME)
        self._keys = [keys.entries, keys.lru, keys.blob_refs, keys.stored_bytes]
        self._unregister_keys = [*self._keys, keys.semantic_vectors, keys.semantic_log]

    async def register(self, entry: Registered) -> int:
        """Reserve and record; returns the bytes newly accounted, or NO_ROOM."""
        return int(await self._register(keys=self._keys, args=[
            entry.entry_id, entry.to_json(), entry.created, entry.blob, entry.bytes,
            self.limit_bytes]))

    async def unregister(self, entry_id: str) -> Eviction | None:
        reply = await self._unregister(keys=self._unregister_keys,
                                       args=[entry_id, SEMANTIC_LOG_MAXLEN])
        if not reply:
            return None
        record, freed = reply
        return Eviction(Registered.from_json(entry_id, record), int(freed))

    async def evict(self, entry_id: str, *, reason: str) -> Eviction | None:
        """Remove an entry everywhere: registry, exact key, blob files (with the last
        reference). Safe to repeat and to race: only one caller wins the unregister."""
        evicted = await self.evict_many([entry_id], reason=reason)
        return evicted[0] if evicted else None

    async def evict_many(self, entry_ids: list[str], *, reason: str) -> list[Eviction]:
        """`evict` for a batch, in two pipelined round trips."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                await self._unregister(keys=self._unregister_keys,
                                       args=[entry_id, SEMANTIC_LOG_MAXLEN], client=pipe)
            replies = await pipe.execute()
        done = [Eviction(Registered.from_json(entry_id, reply[0]), int(reply[1]))
                for entry_id, reply in zip(entry_ids, replies, strict=True) if reply]
        if not done:
            return done
        # files first, then the account: the bytes on disk never exceed what is accounted
        # (a crash in between over-counts until the janitor's reconciliation, never under)
        for eviction in done:
            if eviction.freed:
                self.blobs.delete(eviction.entry.blob, eviction.entry.content_type)
            log.debug("entry_evicted", entry_id=eviction.entry.entry_id, reason=reason,
                      freed=eviction.freed)
        async with self.redis.pipeline(transaction=False) as pipe:
            if freed := sum(e.freed for e in done):
                pipe.decrby(self.keys.stored_bytes, freed)
            for eviction in done:
                await self._delete_if_same(keys=[self.keys.exact(eviction.entry.cache_key)],
                                           args=[eviction.entry.entry_id], client=pipe)
            await pipe.execute()
        return done

    async def evict_lru(self, *, need: int = 0, reason: str, batch: int = 64) -> list[Eviction]:
        """Evict the least recently used entries until `need` more bytes fit under the cap."""
        done: list[Eviction] = []
        stored = await self.stored()
        while stored + need > self.limit_bytes:
            oldest = [r.decode() for r in await self.redis.zrange(self.keys.lru, 0, batch - 1)]
            if not oldest:
                break
            # take only as many as the shortfall needs (entries are about the same size)
            average = max(stored // max(await self.count(), 1), 1)
            wanted = max(1, min(len(oldest), -(-(stored + need - self.limit_bytes) // average)))
            for eviction in await self.evict_many(oldest[:wanted], reason=reason):
                done.append(eviction)
            stored = await self.stored()  # others write and evict too
        if done:
            log.info("entries_evicted", count=len(done), reason=reason,
                     freed=sum(e.freed for e in done))
        return done

    async def expired(self, older_than: float, limit: int = 500) -> list[str]:
        raw = await self.redis.zrangebyscore(self.keys.lru, "-inf", older_than, start=0,
                                             num=limit)
        return [r.decode() for r in raw]

    async def touch(self, entry_ids: dict[str, float]) -> None:
        """Record uses (only of entries that still exist: XX)."""
        if entry_ids:
            await self.redis.zadd(self.keys.lru, entry_ids, xx=True, gt=True)

    async def stored(self) -> int:
        return int(await self.redis.get(self.keys.stored_bytes) or 0)

    async def count(self) -> int:
        return int(await self.redis.zcard(self.keys.lru))

    async def blob_shas(self) -> set[str]:
        return {k.decode() async for k in self.redis.hscan_iter(self.keys.blob_refs, no_values=True)}

    async def reconcile(self, *, grace_s: float = 600.0) -> tuple[int, int]:
        """Unregister entries whose blob file is gone (older than `grace_s`: a writer registers
        before it writes), then set the byte account to what the registered blobs use.
        Returns (bytes, entries removed)."""
        removed = 0
        cutoff = time.time() - grace_s
        sizes: dict[str, int] = {}
        async for raw_id, raw in self.redis.hscan_iter(self.keys.entries):
            entry = Registered.from_json(raw_id.decode(), raw)
            if entry.created < cutoff and not self.blobs.exists(entry.blob, entry.content_type):
                await self.evict(entry.entry_id, reason="blob_missing")
                removed += 1
            else:
                sizes[entry.blob] = entry.bytes
        total = sum(sizes.values())
        await self.redis.set(self.keys.stored_bytes, total)
        return total, removed


def now() -> float:
    return time.time()
