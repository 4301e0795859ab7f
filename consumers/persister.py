"""The persister: consumer group `persister` on the change stream, writing PostgreSQL in batches.

A `GroupLoop` reads a batch; the batch is written in one transaction (`MetadataStore.
apply_changes`) and acknowledged. What can go wrong is told apart:

- Text PostgreSQL cannot hold (NUL, lone surrogates) never reaches it: every string of every
  event is made safe first (`promptcache.storage.safe_text`).
- A data error (PostgreSQL refuses what one event holds: SQLSTATE class 22 or 23, or an event
  we cannot convert) is isolated by bisecting the batch, each half in its own transaction. The
  event at fault goes to the changes dead letter (`promptcache:changes:dead-letter`, listed and
  replayed by `promptcache dead-letter`) and is acknowledged; the rest are written. An event that
  cannot even be read goes there too.
- Anything else is an outage (PostgreSQL down, admin shutdown, a timeout): the batch is retried
  with backoff until it is written, for as long as it takes, while the loop renews the leases
  of what it holds so no other persister takes the batch over. Nothing is dropped, results never
  wait: change events wait in the stream and are written, idempotently, once PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta

import psycopg
import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError

from consumers.group import UNREACHABLE, GroupLoop, Stopper
from promptcache.keys import PERSISTER_GROUP, Keys
from promptcache.storage.db import MetadataStore, is_data_error
from promptcache.storage.safe_text import loads_safe, needs_care, safe_text
from promptcache.streams import Delivery, GroupReader
from schemas.events import ChangeEvent, DeadLetter, ErrorInfo

log = structlog.get_logger(__name__)

UNREADABLE = "change_unreadable"  # not a change event (bad JSON, or fields out of the schema)
UNWRITABLE = "change_unwritable"  # PostgreSQL refuses what it holds


@dataclass(frozen=True, slots=True)
class _Refused:
    delivery: Delivery
    code: str
    message: str


def parse(raw: bytes) -> ChangeEvent:
    """A change event with every string safe for PostgreSQL. The strict JSON parser takes what
    holds no escapes; anything else (a NUL, a lone surrogate, invalid UTF-8) is decoded
    leniently and cleaned. Raises ValueError when it is not a change event at all."""
    if not needs_care(raw):
        try:
            return ChangeEvent.model_validate_json(raw)
        except ValidationError:
            pass  # invalid UTF-8, raw surrogates: the careful path says what is wrong
    return ChangeEvent.model_validate(loads_safe(raw))


class Persister:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, store: MetadataStore, consumer: str,
                 batch_size: int = 200, claim_idle: timedelta = timedelta(seconds=60),
                 block: timedelta = timedelta(seconds=1)) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store
        self.consumer = consumer
        self.stopper = Stopper()
        self.loop = GroupLoop(
            GroupReader(redis, keys.changes, PERSISTER_GROUP, consumer, claim_idle=claim_idle,
                        block=block),
            self._handle, name="persister", batch_size=batch_size, capacity=batch_size,
            stopper=self.stopper, claim_idle=claim_idle)
        self.batches = 0  # batches read and finished (each written in one transaction)
        self.written = 0
        self.dead_lettered = 0
        self._next_prune = 0.0

    @property
    def reader(self) -> GroupReader:
        return self.loop.reader

    def stop(self) -> None:
        """Stop reading; a batch being retried through an outage stays pending."""
        self.stopper.stop()


    def _event_id(self, message_id: str) -> str:
        """What PostgreSQL remembers an applied event by: its change stream's entry id, with
        the shard when streams are sharded (ids of two streams can be equal)."""
        return f"{self.keys.shard}/{message_id}" if self.keys.sharded else message_id

    async def run(self, *, burst: bool = False) -> None:
        """Until stop(); with burst=True, until the change stream has nothing for us."""
        await self.loop.ensure_group()
        renewing = asyncio.create_task(self.loop.renew_leases())
        try:
            await self.loop.run(burst=burst)
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
        log.info("persister_stopped", consumer=self.consumer, written=self.written,
                 dead_lettered=self.dead_lettered)

    async def _handle(self, deliveries: list[Delivery]) -> None:
        events: list[tuple[Delivery, ChangeEvent]] = []
        refused: list[_Refused] = []
        for delivery in deliveries:
            try:
                events.append((delivery, parse(delivery.fields.get(b"data", b""))))
            except (ValueError, RecursionError) as exc:  # ValidationError, JSONDecodeError
                refused.append(_Refused(delivery, UNREADABLE, str(exc)))
        written = await self._write(events)
        if written is None:
            return  # stopped during an outage: the batch stays pending for the next persister
        refused += written
        self.batches += 1
        self.written += len(events) - len(written)
        try:
            for item in refused:
                await self._dead_letter(item)
            bad = {item.delivery.message_id for item in refused}
            if good := [d.message_id for d in deliveries if d.message_id not in bad]:
                await self.reader.ack(*good)
        except UNREACHABLE as exc:  # written, not acknowledged: redelivered, skipped then
            log.warning("ack_failed_left_pending", error=str(exc), batch=len(deliveries))
            return
        await self._prune_now_and_then()

    async def _write(self, events: list[tuple[Delivery, ChangeEvent]]) -> list[_Refused] | None:
        """Write the batch, retrying through outages with backoff: the events PostgreSQL
        refused, or None when stop() came first."""
        delay = 0.5
        while True:
            try:
                return await self._isolate(events)
            except Exception as exc:  # noqa: BLE001 - not the events' fault: wait and retry
                log.warning("database_unavailable_backlog_kept", error=str(exc),
                            error_type=type(exc).__name__,
                            sqlstate=getattr(exc, "sqlstate", None), batch=len(events),
                            retry_in=delay)
                if self.stopper.stopping:
                    return None
                await self.stopper.sleep(delay)
                delay = min(delay * 2, 15.0)
                if self.stopper.stopping:
                    return None

    async def _isolate(self, events: list[tuple[Delivery, ChangeEvent]]) -> list[_Refused]:
        """Write `events`; on a data error write each half on its own, down to the single
        events at fault (returned). An outage propagates: what was written stays written,
        and the retry skips it (applied_changes)."""
        if not events:
            return []
        try:
            await self.store.apply_changes([(self._event_id(d.message_id), e)
                                            for d, e in events])
            return []
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(events) == 1:
                return [_Refused(events[0][0], UNWRITABLE, f"{type(exc).__name__}: {exc}")]
            log.info("data_error_bisecting", batch=len(events), error=str(exc)[:200])
        middle = len(events) // 2
        return await self._isolate(events[:middle]) + await self._isolate(events[middle:])

    async def _dead_letter(self, item: _Refused) -> None:
        """XADD to the changes dead letter + XACK, atomically."""
        delivery = item.delivery
        letter = DeadLetter(
            stream=self.keys.changes, message_id=delivery.message_id,
            entry={safe_text(k.decode("utf-8", "replace")): v.decode("utf-8", "replace")
                   for k, v in delivery.fields.items()},
            error=ErrorInfo(code=item.code, message=safe_text(item.message)[:1000]),
            delivery_count=delivery.times_delivered, consumer=self.consumer,
            dead_lettered_at=time.time())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.changes_dead_letter, {"data": letter.model_dump_json()})
            pipe.xack(self.keys.changes, PERSISTER_GROUP, delivery.message_id)
            await pipe.execute()
        self.dead_lettered += 1
        log.error("change_dead_lettered", code=item.code, error=item.message[:500],
                  message_id=delivery.message_id)

    async def _prune_now_and_then(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + 600
        try:
            await self.store.prune_applied()
        except (psycopg.Error, OSError) as exc:
            log.warning("prune_failed", error=str(exc))
