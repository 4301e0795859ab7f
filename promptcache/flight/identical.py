"""Single flight across workers: one generation per cache key at a time, whoever asks.

The first worker to miss a key takes a lock in the cache store (`SET key token NX PX ttl`), keeps
it alive every `ttl / 3` while it generates (a compare-and-`PEXPIRE` script) and gives it back
with a compare-and-`DEL` script once the entry is stored. Every other worker that misses the same
key meanwhile waits: it polls for the entry (found: answered `coalesced` from it) and for the lock
(gone without an entry, because the holder failed or died: it tries to take it itself). A holder
killed outright stops renewing, so its lock expires and a waiter takes over within `ttl`.

The lock lives in the cache store, so it shares its fate: when the store is down, `lead_or_follow`
answers None and the caller generates without a lock (the bypass path).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Generic, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from promptcache.cache.compare import COMPARE_AND_DELETE
from promptcache.keys import Keys
from promptcache.stream_ids import millis

log = structlog.get_logger(__name__)

T = TypeVar("T")

# KEYS[1] = lock, ARGV[1] = token, ARGV[2] = ttl in ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


@dataclass
class Lease:
    """A held lock; renewed in the background until `release()`."""

    flight: Flight
    name: str
    token: str
    _renewer: asyncio.Task[None] | None = field(default=None, repr=False)
    released: bool = False

    async def release(self) -> None:
        self.released = True
        if self._renewer is not None:
            # Never wait on the renewer unbounded: a cancel that lands inside a Redis call can
            # come back as a (caught) timeout error instead of CancelledError, and the renewer
            # would then sleep on, renewing the lock for ever; `released` stops it regardless.
            self._renewer.cancel()
            await asyncio.wait({self._renewer}, timeout=1.0)
        try:
            await self.flight.release_script(keys=[self.name], args=[self.token])
        except (RedisError, OSError) as exc:  # it expires on its own within the TTL
            log.warning("flight_lock_release_failed", error=str(exc))

    async def _renew(self, every: float, ttl_ms: int) -> None:
        while not self.released:
            await asyncio.sleep(every)
            if self.released:
                return
            try:
                kept = await self.flight.renew_script(keys=[self.name], args=[self.token, ttl_ms])
            except (RedisError, OSError) as exc:
                log.warning("flight_lock_renewal_failed", error=str(exc))
                continue
            if not kept:  # expired (a long pause) and maybe taken: at worst two generations
                log.warning("flight_lock_lost")
                return


@dataclass(frozen=True, slots=True)
class Found(Generic[T]):
    """What another worker made while this one waited."""

    value: T


class Flight:
    """Cross-worker single flight on the cache store; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, ttl: timedelta = timedelta(seconds=30),
                 poll: timedelta = timedelta(milliseconds=50),
                 max_wait: timedelta = timedelta(minutes=10)) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = ttl
        self.poll = poll
        self.max_wait = max_wait
        self.renew_script = redis.register_script(_RENEW)
        self.release_script = redis.register_script(COMPARE_AND_DELETE)

    def lock_name(self, cache_key: str) -> str:
        return self.keys.flight(cache_key)

    async def _try_lock(self, name: str) -> Lease | None:
        token = secrets.token_hex(16)
        if not await self.redis.set(name, token, nx=True, px=millis(self.ttl)):
            return None
        lease = Lease(self, name, token)
        every = max(self.ttl.total_seconds() / 3, 0.01)
        lease._renewer = asyncio.create_task(lease._renew(every, millis(self.ttl)))
        return lease

    async def lead_or_follow(self, cache_key: str,
                             find: Callable[[], Awaitable[T | None]]) -> Lease | Found[T] | None:
        """A Lease: generate, store, then `release()`. Found: another worker made it.
        None: the cache store is unreachable (or the wait ran past `max_wait`): go ahead
        without a lock."""
        name = self.lock_name(cache_key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait.total_seconds()
        delay = self.poll.total_seconds()
        waited = False
        try:
            while True:
                lease = await self._try_lock(name)
                if lease is not None:
                    # the holder stores the entry before releasing, and may have released
                    # between the caller's look and this lock: look once more
                    if (value := await find()) is not None:
                        await lease.release()
                        return Found(value)
                    if waited:
                        log.info("flight_lock_taken_over")
                    return lease
                if not waited:
                    log.debug("flight_waiting")
                waited = True
                if (value := await find()) is not None:
                    return Found(value)
                if loop.time() > deadline:
                    log.warning("flight_wait_gave_up", waited_s=self.max_wait.total_seconds())
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        except (RedisError, OSError) as exc:
            log.warning("flight_lock_unavailable", error=str(exc))
            return None
