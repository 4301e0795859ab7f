"""The exact tier: canonical cache key -> entry record, in the cache Redis.

Every key carries the TTL, refreshed on each hit (GETEX), so Redis itself forgets entries that
have not been used for `ttl`. The cache store is optional at run time: any Redis error or a reply
slower than the client's socket timeout becomes `CacheUnavailable`, and the caller bypasses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import timedelta

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from promptcache.errors import CacheUnavailable
from promptcache.keys import Keys


@dataclass(frozen=True, slots=True)
class CacheEntry:
    entry_id: str
    blob_sha256: str
    content_type: str
    width: int
    height: int
    prompt_used: str
    canonical_prompt: str
    optimizer_version: str
    created_at: float
    generation_ms: float = 0.0  # what a hit on this entry saves

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> CacheEntry:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class ExactCache:
    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl: timedelta) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = ttl

    async def get(self, cache_key: str) -> CacheEntry | None:
        try:
            raw = await self.redis.getex(self.keys.exact(cache_key), ex=self.ttl)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"cache store unavailable: {exc}") from exc
        if raw is None:
            return None
        try:
            return CacheEntry.from_json(raw)
        except (ValueError, TypeError):
            await self.delete(cache_key)  # a record we cannot read is a miss, not an error
            return None

    async def get_many(self, cache_keys: list[str]) -> dict[str, CacheEntry | None]:
        """Several keys in one round trip (each TTL refreshed, as `get`)."""
        unique = list(dict.fromkeys(cache_keys))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in unique:
                    pipe.getex(self.keys.exact(key), ex=self.ttl)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"cache store unavailable: {exc}") from exc
        found: dict[str, CacheEntry | None] = {}
        for key, raw in zip(unique, replies, strict=True):
            try:
                found[key] = None if raw is None else CacheEntry.from_json(raw)
            except (ValueError, TypeError):
                found[key] = None  # unreadable: a miss; `get` deletes it when it meets it
        return found

    async def put(self, cache_key: str, entry: CacheEntry) -> None:
        try:
            await self.redis.set(self.keys.exact(cache_key), entry.to_json(), ex=self.ttl)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"cache store unavailable: {exc}") from exc

    async def is_flagged(self, blob_sha256: str) -> bool:
        """An operator flagged this image as bad (`promptcache flag`): never serve it again."""
        try:
            return bool(await self.redis.sismember(self.keys.flagged_blobs, blob_sha256))
        except (RedisError, OSError):
            return False  # the web process refuses flagged files too (410)

    async def delete(self, cache_key: str) -> None:
        try:
            await self.redis.delete(self.keys.exact(cache_key))
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(f"cache store unavailable: {exc}") from exc
