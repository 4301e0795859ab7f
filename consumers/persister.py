"""The persister: consumer group `persister` on the change stream, writing PostgreSQL in batches.

PostgreSQL being down never touches results: change events wait in the stream (pending or not
yet read) and are written, idempotently, once it is back.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import psycopg
import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from promptcache.keys import PERSISTER_GROUP, Keys
from promptcache.storage.db import MetadataStore
from promptcache.streams import GroupReader
from schemas.events import ChangeEvent

log = structlog.get_logger(__name__)


class Persister:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, store: MetadataStore, consumer: str,
                 batch_size: int = 200, claim_idle: timedelta = timedelta(seconds=60),
                 block: timedelta = timedelta(seconds=1)) -> None:
        self.store = store
        self.batch_size = batch_size
        self.reader = GroupReader(redis, keys.changes, PERSISTER_GROUP, consumer,
                                  claim_idle=claim_idle, block=block)
        self.written = 0
        self._next_prune = 0.0
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, burst: bool = False) -> None:
        await self.reader.ensure_group()
        while not self._stopping.is_set():
            try:
                deliveries = await self.reader.read(self.batch_size)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis_unreachable", error=str(exc))
                await self._pause(1.0)
                continue
            if not deliveries:
                if burst:
                    return
                continue
            events, ids = [], []
            for delivery in deliveries:
                ids.append(delivery.message_id)
                try:
                    events.append((delivery.message_id, ChangeEvent.model_validate_json(
                        delivery.fields.get(b"data", b""))))
                except ValidationError as exc:
                    log.error("change_event_unreadable", message_id=delivery.message_id,
                              error=str(exc))
            if not await self._write(events):
                return  # stopped while the database was down: the batch stays pending
            await self.reader.ack(*ids)
            self.written += len(events)
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + 600
                try:
                    await self.store.prune_applied()
                except (psycopg.Error, OSError) as exc:
                    log.warning("prune_failed", error=str(exc))

    async def _write(self, events: list[tuple[str, ChangeEvent]]) -> bool:
        """Retry the batch with backoff until it is written (True) or we are told to stop."""
        delay = 0.5
        while True:
            try:
                await self.store.apply_changes(events)
                return True
            except (psycopg.Error, OSError) as exc:
                log.warning("database_unavailable_backlog_kept", error=str(exc),
                            batch=len(events), retry_in=delay)
                if self._stopping.is_set():
                    return False
                await self._pause(delay)
                delay = min(delay * 2, 15.0)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass
