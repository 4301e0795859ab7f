"""The worker: two stages on two streams, answering every request exactly once.

- The fast path reads `promptcache:requests` (group `workers`) in batches, up to `max_in_flight`
  at once: decode, validate, look up the cache tiers, and publish hits, rejections and dead
  letters. A miss is handed off (XADD to `promptcache:generate` + XACK, atomically).
- The generation stage reads `promptcache:generate` (group `generators`) only while it has a free
  slot (`generation_concurrency`), so a burst of misses spreads over every worker instead of
  queueing behind the one that read it, and hits never wait behind generations.

Each stage renews the lease on what it holds (XCLAIM JUSTID), takes over what dead consumers left
(XAUTOCLAIM), dead-letters what keeps failing past `max_deliveries`, and on stop() finishes or
leaves pending what it holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from structlog.contextvars import bound_contextvars

from promptcache import intake
from promptcache.errors import GenerationFailed, PipelineError, RequestRejected
from promptcache.keys import GENERATE_GROUP, REQUESTS_GROUP, Keys
from promptcache.pipeline import Outcome, Pipeline
from promptcache.latency import bucket_of
from promptcache.streams import (
    Delivery,
    GroupReader,
    Publisher,
    Source,
    entry_time_ms,
    is_nogroup,
    now_ms,
)
from schemas.events import (
    ChangeEvent,
    DeadLetter,
    ErrorInfo,
    GenerationJob,
    Request,
    Result,
    Status,
)

log = structlog.get_logger(__name__)


def consumer_name() -> str:
    return f"{socket.gethostname()}#{os.getpid()}"


def _answer_with_error(request: Request, status: Status, exc: PipelineError) -> Outcome:
    return Outcome(Result(request_id=request.request_id, status=status,
                          error=ErrorInfo(code=exc.code, message=exc.message)))


@dataclass
class Stage:
    name: str
    reader: GroupReader
    capacity: int
    handle: Callable[[Delivery], Awaitable[None]]
    in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    drained: bool = False  # last read found nothing (burst mode's "done" test)

    @property
    def source(self) -> Source:
        return Source(self.reader.stream, self.reader.group)


class Worker:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, pipeline: Pipeline,
                 consumer: str | None = None, batch_size: int = 32, max_in_flight: int = 256,
                 generation_concurrency: int = 4,
                 claim_idle: timedelta = timedelta(seconds=60),
                 block: timedelta = timedelta(seconds=1), max_deliveries: int = 5,
                 done_ttl: timedelta = timedelta(days=7),
                 health_interval: timedelta = timedelta(seconds=10),
                 shutdown_grace: timedelta = timedelta(seconds=30)) -> None:
        self.redis = redis
        self.keys = keys
        self.pipeline = pipeline
        self.consumer = consumer or consumer_name()
        self.batch_size = batch_size
        self.max_deliveries = max_deliveries
        self.claim_idle = claim_idle
        self.health_interval = health_interval
        self.shutdown_grace = shutdown_grace
        self.fast = Stage("requests", GroupReader(
            redis, keys.requests, REQUESTS_GROUP, self.consumer, claim_idle=claim_idle,
            block=block), max_in_flight, self._handle_request)
        self.slow = Stage("generate", GroupReader(
            redis, keys.generate, GENERATE_GROUP, self.consumer, claim_idle=claim_idle,
            block=block), generation_concurrency, self._handle_job)
        self.publisher = Publisher(redis, dead_letter_stream=keys.dead_letter,
                                   changes_stream=keys.changes, done_ttl=done_ttl)
        self.counters: Counter[str] = Counter()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop reading; what is in flight finishes (or stays pending for another worker)."""
        self._stopping.set()

    async def run(self, *, burst: bool = False) -> None:
        """Serve until stop(); with burst=True, return once both streams have nothing for us."""
        log.info("worker_started", consumer=self.consumer, stream=self.keys.requests)
        for stage in (self.fast, self.slow):
            await self._ensure_group(stage)
        helpers = [asyncio.create_task(self._renew_leases()),
                   asyncio.create_task(self._report_health())]
        try:
            await asyncio.gather(self._consume(self.fast, burst), self._consume(self.slow, burst))
        finally:
            await asyncio.gather(self._drain(self.fast), self._drain(self.slow))
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._write_health()
            log.info("worker_stopped", consumer=self.consumer, **self.counters)

    def _idle(self) -> bool:
        return all(s.drained and not s.in_flight for s in (self.fast, self.slow))

    async def _consume(self, stage: Stage, burst: bool) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            free = stage.capacity - len(stage.in_flight)
            if free <= 0:
                await asyncio.wait(list(stage.in_flight.values()), timeout=1.0,
                                   return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                deliveries = await stage.reader.read(min(self.batch_size, free),
                                                     skip=tuple(stage.in_flight))
                backoff = 0.1
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis_unreachable", stage=stage.name, error=str(exc), retry_in=backoff)
                await self._sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except RedisError as exc:
                if not is_nogroup(exc):
                    raise
                log.warning("group_missing_recreating", stream=stage.reader.stream)
                await self._ensure_group(stage)
                continue
            for delivery in deliveries:
                task = asyncio.create_task(self._guarded(stage, delivery))
                stage.in_flight[delivery.message_id] = task
                task.add_done_callback(
                    lambda _t, mid=delivery.message_id: stage.in_flight.pop(mid, None))
            stage.drained = not deliveries
            if burst and not deliveries:
                if self._idle():
                    return
                pending = [*self.fast.in_flight.values(), *self.slow.in_flight.values()]
                if pending:
                    await asyncio.wait(pending, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(0.01)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _ensure_group(self, stage: Stage) -> None:
        delay = 0.1
        while True:
            try:
                await stage.reader.ensure_group()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis_unreachable", error=str(exc), retry_in=delay)
                if self._stopping.is_set():
                    raise
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, 5.0)

    async def _drain(self, stage: Stage) -> None:
        if not stage.in_flight:
            return
        log.info("draining", stage=stage.name, in_flight=len(stage.in_flight))
        _, pending = await asyncio.wait(list(stage.in_flight.values()),
                                        timeout=self.shutdown_grace.total_seconds())
        for task in pending:  # left pending in the stream: another worker takes them over
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("left_pending", stage=stage.name, count=len(pending))

    async def _renew_leases(self) -> None:
        interval = max(self.claim_idle.total_seconds() / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            for stage in (self.fast, self.slow):
                try:
                    await stage.reader.renew(list(stage.in_flight))
                except RedisError as exc:
                    log.warning("lease_renewal_failed", stage=stage.name, error=str(exc))

    async def _report_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval.total_seconds())
            await self._write_health()

    async def _write_health(self) -> None:
        state = {"consumer": self.consumer, "at": time.time(),
                 "in_flight": len(self.fast.in_flight), "generating": len(self.slow.in_flight),
                 **self.counters}
        try:
            await self.redis.set(self.keys.health(self.consumer), json.dumps(state),
                                 ex=max(int(self.health_interval.total_seconds() * 3), 1))
        except RedisError as exc:
            log.warning("health_write_failed", error=str(exc))
        log.info("worker_health", **state)

    # one entry ----------------------------------------------------------------------------

    async def _guarded(self, stage: Stage, delivery: Delivery) -> None:
        """Handle one entry. A Redis hiccup is retried here a few times (the handler is safe to
        re-run: a stored image is found again in the cache); anything else, or a Redis outage
        that outlasts the retries, leaves the entry pending for XAUTOCLAIM."""
        with bound_contextvars(stage=stage.name, message_id=delivery.message_id,
                               redelivered=delivery.redelivered):
            for attempt, pause in enumerate((0.05, 0.25, 1.0, None)):
                try:
                    await stage.handle(delivery)
                    return
                except asyncio.CancelledError:
                    raise
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    if pause is None or self._stopping.is_set():
                        self._left_pending(exc, delivery)
                        return
                    log.warning("redis_error_retrying", error=str(exc), attempt=attempt + 1)
                    await asyncio.sleep(pause)
                except Exception as exc:  # the one place that catches everything
                    self._left_pending(exc, delivery)
                    return

    def _left_pending(self, exc: Exception, delivery: Delivery) -> None:
        self.counters["retry_later"] += 1
        log.exception("processing_failed_left_pending", error=str(exc),
                      times_delivered=delivery.times_delivered)

    async def _handle_request(self, delivery: Delivery) -> None:
        source = self.fast.source
        decoded = intake.decode(delivery.fields)
        if isinstance(decoded, intake.Undeliverable):
            await self._dead_letter(source, delivery, decoded.error)
            return
        if isinstance(decoded, intake.Rejected):
            result = Result(request_id=decoded.request_id, status="rejected", error=decoded.error)
            await self._publish(source, delivery.message_id, delivery.message_id,
                                decoded.reply_to, Outcome(result))
            return
        request: Request = decoded
        with bound_contextvars(request_id=request.request_id):
            if await self._settled_before(source, delivery, request, delivery.message_id):
                return
            try:
                outcome = await self.pipeline.lookup(request)
            except RequestRejected as exc:
                outcome = _answer_with_error(request, "rejected", exc)
            if outcome is not None:
                await self._publish(source, delivery.message_id, delivery.message_id,
                                    request.reply_to, outcome)
                return
            job = GenerationJob(request=request, origin_id=delivery.message_id)
            await self.publisher.hand_off(source, delivery.message_id, self.keys.generate,
                                          job.model_dump_json(exclude_none=True))
            self.slow.drained = False  # there is work for the generation stage now
            self.counters["handed_off"] += 1

    async def _handle_job(self, delivery: Delivery) -> None:
        source = self.slow.source
        try:
            job = GenerationJob.model_validate_json(delivery.fields.get(b"data", b""))
        except ValidationError as exc:  # only a bug or a hand-written entry gets here
            await self._dead_letter(source, delivery, ErrorInfo(
                code="invalid_request", message=f"unreadable generation job: {exc}"[:500]))
            return
        request = job.request
        with bound_contextvars(request_id=request.request_id):
            if await self._settled_before(source, delivery, request, job.origin_id):
                return
            try:
                outcome = await self.pipeline.generate(request)
            except RequestRejected as exc:
                outcome = _answer_with_error(request, "rejected", exc)
            except GenerationFailed as exc:
                outcome = _answer_with_error(request, "failed", exc)
            await self._publish(source, delivery.message_id, job.origin_id, request.reply_to,
                                outcome)

    async def _settled_before(self, source: Source, delivery: Delivery, request: Request,
                              origin_id: str) -> bool:
        """True when this delivery needs no more work: past the delivery limit, or answered."""
        if delivery.times_delivered > self.max_deliveries:
            await self._dead_letter(source, delivery, ErrorInfo(
                code="delivery_limit_exceeded",
                message=f"processing failed {delivery.times_delivered - 1} times"),
                request=request, origin_id=origin_id)
            return True
        if await self.publisher.already_done(self.keys.done(request.request_id)):
            await self.publisher.ack(source, delivery.message_id)
            self.counters["duplicate"] += 1
            log.info("duplicate_acked")
            return True
        return False

    async def _publish(self, source: Source, message_id: str, origin_id: str,
                       reply_to: str | None, outcome: Outcome) -> None:
        latency = round(now_ms() - entry_time_ms(origin_id), 2)
        result = outcome.result.model_copy(update={"latency_ms": latency})
        answered = ChangeEvent(type="request_answered", entry_id=result.entry_id or "",
                               at=time.time(), request_id=result.request_id, tier=result.cache,
                               status=result.status,
                               reason=result.error.code if result.error else None)
        changes = [c.model_copy(update={"latency_ms": latency}).model_dump_json(exclude_none=True)
                   for c in (*outcome.changes, answered)]
        tier = result.cache or ""
        counters = [(self.keys.metrics_results, f"{tier}|{result.status}", 1),
                    (self.keys.metrics_latency(tier or result.status), str(bucket_of(latency)), 1),
                    (self.keys.metrics_latency(tier or result.status), "sum", latency)]
        published = await self.publisher.publish_result(
            source, message_id, done_key=self.keys.done(result.request_id),
            stream=reply_to or self.keys.results, data=result.model_dump_json(), changes=changes,
            counters=counters)
        if published:
            self.counters[result.cache if result.status == "ok" and result.cache
                          else result.status] += 1
            log.info("result_published", status=result.status, cache=result.cache,
                     latency_ms=latency, error=result.error.code if result.error else None)
        else:
            self.counters["duplicate"] += 1
            log.info("duplicate_acked")

    async def _dead_letter(self, source: Source, delivery: Delivery, error: ErrorInfo, *,
                           request: Request | None = None, origin_id: str | None = None) -> None:
        letter = DeadLetter(
            stream=source.stream, message_id=delivery.message_id,
            entry={k.decode("utf-8", "replace"): v[:65536].decode("utf-8", "replace")
                   for k, v in delivery.fields.items()},
            error=error, delivery_count=delivery.times_delivered, consumer=self.consumer,
            request_id=request.request_id if request else None, dead_lettered_at=time.time())
        result = None
        if request is not None:
            failed = Result(request_id=request.request_id, status="failed", error=error,
                            latency_ms=round(now_ms() - entry_time_ms(
                                origin_id or delivery.message_id), 2))
            result = (request.reply_to or self.keys.results, failed.model_dump_json(),
                      self.keys.done(request.request_id))
        await self.publisher.dead_letter(source, delivery.message_id,
                                         data=letter.model_dump_json(), result=result)
        self.counters["dead_lettered"] += 1
        log.warning("dead_lettered", code=error.code, error=error.message,
                    times_delivered=delivery.times_delivered)
