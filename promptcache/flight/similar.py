"""Semantic single flight: a miss that is a rewrite of a prompt being generated waits for it.

Identical misses already share one generation (the cache key's flight lock). This does the same
for *similar* ones: a generation announces its prompt, embedding and params partition in
`{prefix}:semantic:inflight` (a hash keyed by its flight lock) before it calls the generator.
A later miss in the same partition whose prompt is within the threshold and accepted by the
verifier waits for that generation instead of starting its own, then is answered from the entry
it stored (`cache: "semantic"`). The wait ends early when the holder fails (its record goes) or
dies (its flight lock expires); the waiter then generates itself. Everything here is best
effort: a cache-store or embedding failure means no waiting, never an error.

Two rewrites that miss within the same few milliseconds can still both generate: the check and
the announcement are two steps.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from promptcache.keys import Keys
from promptcache.semantic.store import decode_vector, encode_vector
from promptcache.semantic.tier import SemanticTier

log = structlog.get_logger(__name__)

DONE_KEEP_S = 60.0  # a finished generation's record stays this long for its waiters


@dataclass(frozen=True, slots=True)
class Holder:
    """A generation in flight that a miss may wait for."""

    lock: str  # its flight lock: gone (expired) when the holder died
    prompt: str
    similarity: float


@dataclass(frozen=True, slots=True)
class Finished:
    cache_key: str | None  # None: it failed, no entry


class SimilarFlights:
    def __init__(self, redis: aioredis.Redis, keys: Keys, tier: SemanticTier, *,
                 max_wait_s: float, poll_s: float = 0.05) -> None:
        """`max_wait_s`: the generator's deadline (PROMPTCACHE_GENERATOR_TIMEOUT)."""
        self.redis = redis
        self.key = keys.semantic_inflight
        self.tier = tier
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s

    async def find(self, canonical: str, params_key: str, own_lock: str) -> Holder | None:
        """The most similar verified generation in flight in the same partition, if any.
        `own_lock`: ours. A holder that died leaves its announcement under its key's lock, which
        whoever generates that key next holds: waiting on it would be waiting on ourselves."""
        vector = await self.tier.vector_for(canonical)  # the lookup cached it
        if vector is None:
            return None
        partition = self.tier.partition(params_key)
        now = time.time()
        best: Holder | None = None
        try:
            records = await self.redis.hgetall(self.key)
            stale = []
            for raw_lock, raw in records.items():
                if raw_lock.decode() == own_lock:
                    continue
                record = json.loads(raw)
                if record["until"] < now:
                    stale.append(raw_lock)
                    continue
                if record.get("done") or record.get("partition") != partition:
                    continue  # finished (kept for its waiters), or another partition
                similarity = float(decode_vector(record["vec"]) @ vector)
                if similarity < self.tier.threshold or (best and similarity <= best.similarity):
                    continue
                if self.tier.refusal(record["prompt"], canonical) is not None:
                    continue
                best = Holder(raw_lock.decode(), record["prompt"], similarity)
            if stale:
                await self.redis.hdel(self.key, *stale)
        except (RedisError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("semantic_flight_unavailable", error=str(exc))
            return None
        return best

    async def announce(self, lock: str, canonical: str, params_key: str) -> bool:
        """Before generating: this prompt is being made (for at most `max_wait_s`)."""
        vector = await self.tier.vector_for(canonical)
        if vector is None:
            return False
        record = {"partition": self.tier.partition(params_key), "prompt": canonical,
                  "vec": encode_vector(vector),
                  "until": time.time() + self.max_wait_s}
        try:
            await self._write(lock, json.dumps(record, ensure_ascii=False))
        except (RedisError, OSError) as exc:
            log.warning("semantic_flight_unavailable", error=str(exc))
            return False
        return True

    async def finish(self, lock: str, cache_key: str | None) -> None:
        """After generating: the entry made (waiters take it), or None when it failed."""
        try:
            if cache_key is None:
                await self.redis.hdel(self.key, lock)
            else:
                await self._write(lock, json.dumps(
                    {"done": True, "cache_key": cache_key, "until": time.time() + DONE_KEEP_S}))
        except (RedisError, OSError) as exc:
            log.warning("semantic_flight_unavailable", error=str(exc))

    async def _write(self, lock: str, record: str) -> None:
        """Fields end by their `until` (readers drop stale ones); the hash itself expires once
        nothing has been written to it for as long as any field can live."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, lock, record)
            pipe.pexpire(self.key, int((max(self.max_wait_s, DONE_KEEP_S) + 60) * 1000))
            await pipe.execute()

    async def wait(self, holder: Holder) -> Finished:
        """Until the holder finishes, fails or dies, or `max_wait_s`."""
        log.debug("semantic_flight_waiting", similarity=round(holder.similarity, 3))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        delay = self.poll_s
        try:
            while loop.time() < deadline:
                raw = await self.redis.hget(self.key, holder.lock)
                if raw is None:
                    return Finished(None)  # it failed
                record = json.loads(raw)
                if record.get("done"):
                    return Finished(record["cache_key"])
                if not await self.redis.exists(holder.lock):
                    # died (its lock expired), or finished just now: one more look
                    raw = await self.redis.hget(self.key, holder.lock)
                    done = json.loads(raw) if raw is not None else {}
                    return Finished(done["cache_key"] if done.get("done") else None)
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        except (RedisError, OSError, ValueError, KeyError) as exc:
            log.warning("semantic_flight_unavailable", error=str(exc))
        return Finished(None)
