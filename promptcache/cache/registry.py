"""The entry registry: which entries exist, when each was last used, which blobs they share,
and how many bytes are on disk. Lives in the cache Redis next to the exact keys.

    {p}:cache:entries       hash  entry_id -> {cache_key, blob, content_type, bytes, created}
    {p}:cache:lru           zset  entry_id -> last use (epoch seconds)
    {p}:cache:blob-refs     hash  sha256 -> number of entries using the blob
    {p}:cache:stored-bytes  int   bytes of registered blobs (image + thumbnail)
    {p}:cache:blob-deleting hash  sha256 -> {until, by, bytes}: blob files being deleted

What else must forget an entry in the step that removes it (the semantic tier's vectors) comes
in as a `Forget`: a Lua fragment with its own keys and arguments, so the registry knows no other
part's key layout.

Registering reserves the bytes atomically against the storage cap *before* the file is written,
so concurrent writers can never overshoot it; a writer that does not fit evicts least recently
used entries itself (the janitor does the same from the other side). Unregistering is atomic
too: whoever removes an entry deletes, with the last reference, its blob files, and only then
gives their bytes back to the account.

Deleting a blob's files and a new reference to it are exclusive: the script that drops the last
reference marks the blob "being deleted" in the same step, and a registration of that blob that
meets the mark waits until the deleter has removed the files and cleared it, then writes them
again. A deleter paused for longer than DELETE_MARK_S loses that protection (the mark runs out).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from promptcache.cache.compare import COMPARE_AND_DELETE
from promptcache.cache.scripted import scripted_pipeline
from promptcache.keys import Keys
from promptcache.storage.store import Blobs
from schemas.events import ChangeEvent

log = structlog.get_logger(__name__)

NO_ROOM = -1
DELETE_MARK_S = 30.0  # how long a blob's deletion may take before registrants stop waiting

# The time in the server's clock, in ms (every script that reads or writes a deletion mark).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: entries, lru, blob-refs, stored-bytes, blob-deleting, scope-bytes. ARGV: entry id,
# record, created, blob, bytes, limit, scope ("" for the shared scope). Returns {bytes newly accounted or -1 (no room), 1 when the blob's files
# are being deleted right now (the caller waits for that to end, then writes them)}.
_REGISTER = _NOW + """
local refs = tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '0')
local add = 0
if refs <= 0 then add = tonumber(ARGV[5]) end
local stored = tonumber(redis.call('GET', KEYS[4]) or '0')
if add > 0 and stored + add > tonumber(ARGV[6]) then return {-1, 0} end
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
if add > 0 then redis.call('INCRBY', KEYS[4], add) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
-- a scope's account counts its entries' bytes, shared blobs included (what the scope uses)
if ARGV[7] ~= '' then redis.call('HINCRBY', KEYS[6], ARGV[7], tonumber(ARGV[5])) end
local mark = redis.call('HGET', KEYS[5], ARGV[4])
if mark and cjson.decode(mark)['until'] >= now then return {add, 1} end
return {add, 0}
"""

# KEYS: entries, lru, blob-refs, stored-bytes, blob-deleting, scope-bytes, then the `Forget`
# fragment's.
# ARGV: entry id, mark ttl ms, then the fragment's.
# With the last reference the blob is marked "being deleted" (by this entry, with its bytes)
# in the same step: a registration of the blob from now on waits until `_DELETED` clears it.
_UNREGISTER = _NOW + """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local entry = cjson.decode(record)
if entry['scope'] then
  if redis.call('HINCRBY', KEYS[6], entry['scope'], -tonumber(entry['bytes'])) <= 0 then
    redis.call('HDEL', KEYS[6], entry['scope'])
  end
end
local refs = redis.call('HINCRBY', KEYS[3], entry['blob'], -1)
local freed = 0
if refs <= 0 then
  redis.call('HDEL', KEYS[3], entry['blob'])
  freed = entry['bytes']  -- the caller deletes the files, then `_DELETED` gives the bytes back
  redis.call('HSET', KEYS[5], entry['blob'], cjson.encode(
    {['until'] = now + tonumber(ARGV[2]), by = ARGV[1], bytes = freed}))
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[2]))
end
-- what else forgets it in this step (the `Forget` fragment, with its own keys and args)
local entry_id, forget_keys, forget_args = ARGV[1], {unpack(KEYS, 7)}, {unpack(ARGV, 3)}
--FORGET--
return {record, freed}
"""

# KEYS: blob-refs, blob-deleting. ARGV: blob, token, mark ttl ms. Mark a blob that no entry
# uses as being deleted (an image written without a registration); 0 when an entry uses it or
# someone else is deleting it.
_CLAIM_UNUSED = _NOW + """
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') > 0 then return 0 end
local mark = redis.call('HGET', KEYS[2], ARGV[1])
if mark and cjson.decode(mark)['until'] >= now then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(
  {['until'] = now + tonumber(ARGV[3]), by = ARGV[2], bytes = 0}))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# KEYS: blob-deleting, stored-bytes. ARGV: blob, who marked it. The files are gone: clear our
# mark and give the bytes back (not when the mark outlived its time: a reconciliation may have
# counted them out already; until the next one the account over-counts, never under).
_DELETED = _NOW + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local mark = cjson.decode(raw)
if mark['by'] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if mark['until'] < now or mark['bytes'] <= 0 then return 0 end
redis.call('DECRBY', KEYS[2], mark['bytes'])
return 1
"""

# KEYS: entries, stored-bytes, blob-deleting. The byte account set, in one step, to what the
# registered blobs use plus the blobs whose deletion has not given its bytes back yet.
_RECONCILE = _NOW + """
local sizes = {}
for _, raw in ipairs(redis.call('HVALS', KEYS[1])) do
  local entry = cjson.decode(raw)
  sizes[entry['blob']] = tonumber(entry['bytes'])
end
local total = 0
for _, size in pairs(sizes) do total = total + size end
local marks = redis.call('HGETALL', KEYS[3])
for i = 1, #marks, 2 do
  local mark = cjson.decode(marks[i + 1])
  if mark['until'] >= now then total = total + mark['bytes']
  else redis.call('HDEL', KEYS[3], marks[i]) end
end
redis.call('SET', KEYS[2], string.format('%d', total))
return total
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    """What registering an entry did: the bytes newly accounted (NO_ROOM: nothing done), and
    whether the blob's files are being deleted (write them only once `wait_deleted` returns)."""

    added: int
    blob_deleting: bool = False

    @property
    def fits(self) -> bool:
        return self.added != NO_ROOM


@dataclass(frozen=True, slots=True)
class Registered:
    entry_id: str
    cache_key: str
    blob: str
    content_type: str
    bytes: int
    created: float
    scope: str | None = None  # the request's scope (tenant); None: the shared scope

    def to_json(self) -> str:
        data: dict[str, object] = {"cache_key": self.cache_key, "blob": self.blob,
                                   "content_type": self.content_type, "bytes": self.bytes,
                                   "created": self.created}
        if self.scope is not None:
            data["scope"] = self.scope
        return json.dumps(data)

    @classmethod
    def from_json(cls, entry_id: str, raw: bytes | str) -> Registered:
        data = json.loads(raw)
        return cls(entry_id, data["cache_key"], data["blob"], data["content_type"],
                   int(data["bytes"]), float(data["created"]), data.get("scope"))


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


@dataclass(frozen=True, slots=True)
class Forget:
    """What another part of the cache forgets in the same step as an entry is unregistered: a
    Lua fragment that sees `entry_id`, `forget_keys` and `forget_args` (Lua tables)."""

    lua: str
    keys: tuple[str, ...] = ()
    args: tuple[str | int, ...] = ()


def _entry_id_of(raw: bytes | None) -> str | None:
    """The entry an exact key's value names (None: no key, or not a record)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value.get("entry_id") if isinstance(value, dict) else None


class EntryRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys, blobs: Blobs, *,
                 limit_bytes: int, forget: Forget | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.blobs = blobs
        self.limit_bytes = limit_bytes
        # blob sha256 -> {until (server ms), by, bytes}: files being deleted (the hash expires
        # once no mark has been written for as long as a mark lives)
        self.deleting_key = keys.blob_deleting
        self._register = redis.register_script(_REGISTER)
        forget = forget or Forget("")
        self._unregister = redis.register_script(_UNREGISTER.replace("--FORGET--", forget.lua))
        self._claim_unused = redis.register_script(_CLAIM_UNUSED)
        self._deleted = redis.register_script(_DELETED)
        self._reconcile = redis.register_script(_RECONCILE)
        self._delete_if_same = redis.register_script(COMPARE_AND_DELETE)
        self._keys = [keys.entries, keys.lru, keys.blob_refs, keys.stored_bytes,
                      self.deleting_key]
        self.scope_bytes_key = keys.scope_bytes  # scope -> bytes its entries use
        self._register_keys = [*self._keys, self.scope_bytes_key]
        self._unregister_keys = [*self._keys, self.scope_bytes_key, *forget.keys]
        self._forget_args = list(forget.args)
        self._mark_ms = int(DELETE_MARK_S * 1000)

    async def register(self, entry: Registered) -> Reservation:
        """Reserve and record (see Reservation)."""
        added, deleting = await self._register(keys=self._register_keys, args=[
            entry.entry_id, entry.to_json(), entry.created, entry.blob, entry.bytes,
            self.limit_bytes, entry.scope or ""])
        return Reservation(int(added), bool(int(deleting)))

    async def scope_stored(self, scope: str) -> int:
        """Bytes the entries of `scope` use (a blob shared with other entries counts in full)."""
        return int(await self.redis.hget(self.scope_bytes_key, scope) or 0)

    async def evict_scope_lru(self, scope: str, limit_bytes: int, *, keep: str, reason: str,
                              batch: int = 200, max_scan: int = 100_000) -> list[Eviction]:
        """Evict `scope`'s least recently used entries (never `keep`, the one just stored, nor
        another scope's) until the scope uses at most `limit_bytes`. Walks the LRU index from
        its oldest end, at most `max_scan` entries."""
        done: list[Eviction] = []
        start = 0
        while start < max_scan and await self.scope_stored(scope) > limit_bytes:
            oldest = [r.decode() for r in
                      await self.redis.zrange(self.keys.lru, start, start + batch - 1)]
            if not oldest:
                break
            raws = await self.redis.hmget(self.keys.entries, oldest)
            mine = [entry_id for entry_id, raw in zip(oldest, raws, strict=True)
                    if raw is not None and entry_id != keep
                    and Registered.from_json(entry_id, raw).scope == scope]
            if not mine and start + batch >= await self.redis.zcard(self.keys.lru):
                break  # a whole pass found nothing more of the scope's to evict
            evicted_here = 0
            for entry_id in mine:
                if await self.scope_stored(scope) <= limit_bytes:
                    break
                done += await self.evict_many([entry_id], reason=reason)
                evicted_here += 1
            start += batch - evicted_here  # the evicted ones left the index
        if done:
            log.info("scope_entries_evicted", scope=scope, count=len(done), reason=reason)
        return done

    async def wait_deleted(self, sha256: str, *, poll_s: float = 0.02) -> None:
        """Until the blob's deletion has ended (or its mark ran out of time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DELETE_MARK_S
        while loop.time() < deadline and await self.redis.hexists(self.deleting_key, sha256):
            await asyncio.sleep(poll_s)

    async def unregister(self, entry_id: str) -> Eviction | None:
        """Remove the registration only: a caller that gets `freed` > 0 must delete the files
        and then call `deleted` (what `evict_many` does)."""
        reply = await self._unregister(keys=self._unregister_keys,
                                       args=[entry_id, self._mark_ms, *self._forget_args])
        if not reply:
            return None
        record, freed = reply
        return Eviction(Registered.from_json(entry_id, record), int(freed))

    async def entries_in_scope(self, scope: str | None) -> list[str]:
        """The ids of the registered entries of one scope (None: the shared scope); a scan."""
        found: list[str] = []
        async for entry_id, raw in self.redis.hscan_iter(self.keys.entries, count=1000):
            if Registered.from_json(entry_id.decode(), raw).scope == scope:
                found.append(entry_id.decode())
        return found

    async def claim_unused(self, sha256: str, token: str) -> bool:
        """Mark a blob no entry uses as being deleted by `token`: True, delete its files and
        call `deleted(sha256, token)`; False, an entry uses it (or it is being deleted)."""
        return bool(await self._claim_unused(keys=[self.keys.blob_refs, self.deleting_key],
                                             args=[sha256, token, self._mark_ms]))

    async def deleted(self, sha256: str, token: str) -> None:
        await self._deleted(keys=[self.deleting_key, self.keys.stored_bytes],
                            args=[sha256, token])

    async def evict(self, entry_id: str, *, reason: str) -> Eviction | None:
        """Remove an entry everywhere: registry, exact key, blob files (with the last
        reference). Safe to repeat and to race: only one caller wins the unregister."""
        evicted = await self.evict_many([entry_id], reason=reason)
        return evicted[0] if evicted else None

    async def evict_many(self, entry_ids: list[str], *, reason: str) -> list[Eviction]:
        """`evict` for a batch, in two pipelined round trips (and the file deletions between)."""
        async def unregister(pipe: Any) -> None:
            for entry_id in entry_ids:
                await self._unregister(keys=self._unregister_keys,
                                       args=[entry_id, self._mark_ms, *self._forget_args],
                                       client=pipe)

        replies = await scripted_pipeline(self.redis, [self._unregister], unregister)
        done = [Eviction(Registered.from_json(entry_id, reply[0]), int(reply[1]))
                for entry_id, reply in zip(entry_ids, replies, strict=True) if reply]
        if not done:
            return done
        # files first, then the account: the bytes on disk never exceed what is accounted
        # (a crash in between over-counts until the janitor's reconciliation, never under);
        # a registration of the same blob meanwhile waits for `_DELETED`, then rewrites it
        for eviction in done:
            if eviction.freed:
                await asyncio.to_thread(self.blobs.delete, eviction.entry.blob,
                                        eviction.entry.content_type)
            log.debug("entry_evicted", entry_id=eviction.entry.entry_id, reason=reason,
                      freed=eviction.freed)
        async def release(pipe: Any) -> None:
            for eviction in done:
                if eviction.freed:
                    await self._deleted(keys=[self.deleting_key, self.keys.stored_bytes],
                                        args=[eviction.entry.blob, eviction.entry.entry_id],
                                        client=pipe)
                await self._delete_if_same(keys=[self.keys.exact(eviction.entry.cache_key)],
                                           args=[eviction.entry.entry_id, "entry_id"],
                                           client=pipe)

        await scripted_pipeline(self.redis, [self._deleted, self._delete_if_same], release)
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

    async def reconcile(self, *, grace_s: float = 600.0,
                        announce: Callable[[Eviction, str], Awaitable[None]] | None = None
                        ) -> tuple[int, int]:
        """Unregister entries older than `grace_s` (a writer registers, then writes its files,
        then its exact key) whose blob file is gone, or that no exact key points at (their
        writer died before writing it, so a later request generated the prompt again: nothing
        can serve them); then set the byte account to what the registered blobs use, in one
        script (a registration landing meanwhile is counted, never dropped).
        `announce` is told of each eviction (the janitor publishes it for PostgreSQL).
        Returns (bytes, entries removed)."""
        removed = 0
        cutoff = time.time() - grace_s

        async def evict(entry_id: str, reason: str) -> bool:
            eviction = await self.evict(entry_id, reason=reason)
            if eviction is not None and announce is not None:
                await announce(eviction, reason)
            return eviction is not None

        old: list[Registered] = []
        async for raw_id, raw in self.redis.hscan_iter(self.keys.entries):
            entry = Registered.from_json(raw_id.decode(), raw)
            if entry.created >= cutoff:
                continue
            if not await asyncio.to_thread(self.blobs.exists, entry.blob, entry.content_type):
                removed += await evict(entry.entry_id, "blob_missing")
            else:
                old.append(entry)
        for start in range(0, len(old), 500):
            chunk = old[start:start + 500]
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry in chunk:
                    pipe.get(self.keys.exact(entry.cache_key))
                pointers = await pipe.execute()
            for entry, raw in zip(chunk, pointers, strict=True):
                if _entry_id_of(raw) != entry.entry_id and await evict(entry.entry_id,
                                                                        "unreachable"):
                    log.info("unreachable_entry_evicted", entry_id=entry.entry_id)
                    removed += 1
        total = int(await self._reconcile(
            keys=[self.keys.entries, self.keys.stored_bytes, self.deleting_key]))
        return total, removed
