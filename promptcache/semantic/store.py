"""The shared semantic index in the cache Redis, and each worker's copy of it.

    {p}:semantic:vectors   hash    entry_id -> record (cache key, partition, model, dim, prompt,
                                   float16 vector): the durable state a worker loads at start
    {p}:semantic:log       stream  op=add (with the record) / op=del: what workers tail
    {p}:semantic:embedding:<model>:<dim>:<hash>  a cached embedding of a canonical prompt (TTL)

An entry is added only while the registry still has it, and removed in the registry's unregister
script, in the same step that evicts it (the `FORGET` fragment, which the wiring hands to the
registry), so the hash never outlives its entries. A worker loads
the hash (no re-embedding) and then follows the log with a blocking read, so an entry stored by
any worker is a candidate everywhere within milliseconds. A worker that fell further behind than
the log keeps, or lost the cache store for a while, reloads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from promptcache.keys import SEMANTIC_LOG_MAXLEN, Keys
from promptcache.stream_ids import id_order
from promptcache.semantic.index import Meta, VectorIndex

log = structlog.get_logger(__name__)

# run inside the registry's unregister script (see EntryRegistry's `forget`): the vector goes
# with its entry, and every worker's index hears of it through the log
FORGET = """
if redis.call('HDEL', forget_keys[1], entry_id) == 1 then
  redis.call('XADD', forget_keys[2], 'MAXLEN', '~', forget_args[1], '*', 'op', 'del',
             'id', entry_id)
end
"""


def forget_keys(keys: Keys) -> tuple[tuple[str, str], tuple[int]]:
    """The keys and args of `FORGET`."""
    return (keys.semantic_vectors, keys.semantic_log), (SEMANTIC_LOG_MAXLEN,)


# add only while the registry has the entry: never a vector for an evicted entry
_ADD = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'op', 'add', 'id', ARGV[1],
           'record', ARGV[2])
return 1
"""


# remember an entry stored while the model loads, only while the registry has it, up to a bound
_DEFER = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


def encode_vector(vector: np.ndarray) -> str:
    """float16, base64: how vectors are kept in the cache store."""
    return base64.b64encode(vector.astype("<f2").tobytes()).decode()


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float32)


@dataclass(frozen=True, slots=True)
class Record:
    meta: Meta
    model: str
    vector: np.ndarray

    def to_json(self) -> str:
        return json.dumps({
            "key": self.meta.cache_key, "partition": self.meta.partition, "model": self.model,
            "dim": int(self.vector.shape[0]), "prompt": self.meta.prompt,
            "vec": encode_vector(self.vector)},
            ensure_ascii=False)

    @classmethod
    def from_json(cls, entry_id: str, raw: bytes | str) -> Record:
        data = json.loads(raw)
        vector = decode_vector(data["vec"])
        if vector.shape[0] != int(data["dim"]):
            raise ValueError("vector length does not match its dimension")
        return cls(Meta(entry_id, data["partition"], data["key"], data["prompt"]),
                   data["model"], vector)


class SemanticStore:
    """Reads and writes of the shared state. `redis` is the fail-fast cache client."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *,
                 embedding_ttl: timedelta = timedelta(days=1)) -> None:
        self.redis = redis
        self.keys = keys
        self.embedding_ttl = embedding_ttl
        self._add = redis.register_script(_ADD)
        self._defer = redis.register_script(_DEFER)

    async def add(self, record: Record) -> bool:
        return bool(await self._add(
            keys=[self.keys.entries, self.keys.semantic_vectors, self.keys.semantic_log],
            args=[record.meta.entry_id, record.to_json(), SEMANTIC_LOG_MAXLEN]))

    async def defer(self, entry_id: str, *, cache_key: str, params_key: str, prompt: str,
                    limit: int) -> int:
        """Keep an entry to index once a model is ready: 1 kept, 0 evicted already, -1 full."""
        return int(await self._defer(
            keys=[self.keys.entries, self.keys.semantic_deferred],
            args=[entry_id, json.dumps({"key": cache_key, "params_key": params_key,
                                        "prompt": prompt}, ensure_ascii=False), limit]))

    async def deferred(self, count: int) -> list[tuple[str, str, str, str]]:
        """Up to `count` deferred entries: (entry id, cache key, params key, prompt)."""
        _, found = await self.redis.hscan(self.keys.semantic_deferred, 0, count=count)
        out = []
        for raw_id, raw in list(found.items())[:count]:
            try:
                data = json.loads(raw)
                out.append((raw_id.decode(), str(data["key"]), str(data["params_key"]),
                            str(data["prompt"])))
            except (ValueError, KeyError, TypeError):
                out.append((raw_id.decode(), "", "", ""))  # unreadable: dropped by the caller
        return out

    async def undefer(self, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self.redis.hdel(self.keys.semantic_deferred, *entry_ids)

    async def get_embeddings(self, model: str, dim: int,
                             hashes: Sequence[str]) -> list[np.ndarray | None]:
        """Cached embeddings of several texts (None where absent) in one round trip."""
        if not hashes:
            return []
        try:
            raws = await self.redis.mget([self.keys.embedding(model, dim, h) for h in hashes])
        except (RedisError, OSError):
            return [None] * len(hashes)
        return [None if raw is None or len(raw) != 4 * dim
                else np.frombuffer(raw, dtype="<f4").copy() for raw in raws]

    async def put_embeddings(self, model: str, dim: int,
                             vectors: Sequence[tuple[str, np.ndarray]]) -> None:
        if not vectors:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for h, vector in vectors:
                    pipe.set(self.keys.embedding(model, dim, h), vector.astype("<f4").tobytes(),
                             ex=self.embedding_ttl)
                await pipe.execute()
        except (RedisError, OSError):
            pass  # a cache of a cache

    async def count_many(self, counts: Counter[str]) -> None:
        if not counts:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for reason, n in counts.items():
                    pipe.hincrby(self.keys.metrics_semantic, reason, n)
                await pipe.execute()
        except (RedisError, OSError):
            pass

    async def count(self, reason: str, n: int = 1) -> None:
        try:
            await self.redis.hincrby(self.keys.metrics_semantic, reason, n)
        except (RedisError, OSError):
            pass


class IndexFollower:
    """Keeps this process's VectorIndex equal to the shared state: load, then tail the log.

    Runs as one of the worker process's loops (`run`/`stop`). `redis` must allow a blocking
    read (not the 50 ms fail-fast client)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, index: VectorIndex, *,
                 consumer: str, max_entries: int = 200_000, block_ms: int = 1000,
                 stats_interval_s: float = 10.0) -> None:
        self.redis = redis
        self.keys = keys
        self.index = index
        self.consumer = consumer
        self.max_entries = max_entries
        self.block_ms = block_ms
        self.stats_interval_s = stats_interval_s
        self.last_id = "0-0"
        self.loaded = False
        self._stopping = asyncio.Event()
        self._full_logged = False
        self.others: dict[str, str] = {}  # entry id -> "model:dim" of records we cannot compare

    def stop(self) -> None:
        self._stopping.set()

    def apply(self, entry_id: str, record: Record) -> None:
        if record.model != self.index.model or record.vector.shape[0] != self.index.dim:
            self.others[entry_id] = f"{record.model}:{record.vector.shape[0]}"
            return  # another model's vector: never compared
        self.others.pop(entry_id, None)  # re-embedded (`promptcache reindex`)
        if len(self.index) >= self.max_entries and entry_id not in self.index:
            if not self._full_logged:
                log.warning("semantic_index_full", max_entries=self.max_entries,
                            detail="new entries are served by the exact tier only")
                self._full_logged = True
            return
        self.index.add(record.meta, record.vector)

    async def load(self) -> None:
        """Everything in the hash, then the log from where the hash was read."""
        started = time.monotonic()
        last = await self.redis.xrevrange(self.keys.semantic_log, count=1)
        self.last_id = last[0][0].decode() if last else "0-0"
        seen: set[str] = set()
        self.others.clear()
        async for raw_id, raw in self.redis.hscan_iter(self.keys.semantic_vectors, count=1000):
            entry_id = raw_id.decode()
            seen.add(entry_id)
            try:
                self.apply(entry_id, Record.from_json(entry_id, raw))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("semantic_record_unreadable", entry_id=entry_id, error=str(exc))
        for entry_id in [m for m in self.index.ids() if m not in seen]:
            self.index.remove(entry_id)
        self.loaded = True
        if self.others:
            log.warning("semantic_entries_of_another_model",
                        models=dict(Counter(self.others.values())),
                        current=f"{self.index.model}:{self.index.dim}",
                        detail="exact-only until re-embedded: run `promptcache reindex`")
        log.info("semantic_index_loaded", entries=len(self.index),
                 partitions=self.index.partitions, memory_bytes=self.index.memory_bytes(),
                 seconds=round(time.monotonic() - started, 3))

    async def follow_once(self) -> int:
        reply = await self.redis.xread({self.keys.semantic_log: self.last_id},
                                       count=1000, block=self.block_ms)
        applied = 0
        for _, entries in reply or []:
            for raw_id, fields in entries:
                self.last_id = raw_id.decode()
                entry_id = fields.get(b"id", b"").decode()
                if fields.get(b"op") == b"del":
                    self.index.remove(entry_id)
                    self.others.pop(entry_id, None)
                elif fields.get(b"op") == b"add" and b"record" in fields:
                    try:
                        self.apply(entry_id, Record.from_json(entry_id, fields[b"record"]))
                    except (ValueError, KeyError, TypeError) as exc:
                        log.warning("semantic_record_unreadable", entry_id=entry_id,
                                    error=str(exc))
                applied += 1
        return applied

    async def _behind(self) -> bool:
        """True when the log no longer holds the entry after ours (trimmed past us)."""
        first = await self.redis.xrange(self.keys.semantic_log, count=1)
        return bool(first) and self.last_id != "0-0" and \
            id_order(first[0][0].decode()) > id_order(self.last_id) and \
            not await self.redis.xrange(self.keys.semantic_log, min=self.last_id,
                                        max=self.last_id)

    async def publish_stats(self) -> None:
        await self.redis.set(self.keys.semantic_index_stats(self.consumer), json.dumps({
            "model": self.index.model, "dim": self.index.dim, "entries": len(self.index),
            "partitions": self.index.partitions, "memory_bytes": self.index.memory_bytes(),
            "max_entries": self.max_entries, "other_models": len(self.others),
            "at": time.time()}),
            ex=max(int(self.stats_interval_s * 6), 30))

    async def run(self, burst: bool = False) -> None:
        backoff = 0.1
        next_stats = 0.0
        while not self._stopping.is_set():
            try:
                if not self.loaded:
                    await self.load()
                    backoff = 0.1
                if time.monotonic() >= next_stats:
                    await self.publish_stats()
                    next_stats = time.monotonic() + self.stats_interval_s
                    if await self._behind():
                        log.warning("semantic_log_trimmed_past_us", detail="reloading")
                        self.loaded = False
                        continue
                applied = await self.follow_once()
                if burst and not applied:
                    return
            except (RedisError, OSError) as exc:
                log.warning("semantic_index_follow_failed", error=str(exc), retry_in=backoff)
                self.loaded = False  # reload once the store is back: removals may be missed
                try:
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 5.0)
