"""The worker loop: read requests in batches, run each through the pipeline concurrently, and
answer every one exactly once (result, rejection, failure or dead letter).

Hits never wait behind generations: each request is its own task, the pipeline bounds only the
generations (`generation_concurrency`), and the reader keeps reading up to `max_in_flight`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import Counter
from datetime import timedelta

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from structlog.contextvars import bound_contextvars

from consumers import intake
from consumers.errors import GenerationFailed, RequestRejected
from consumers.keys import REQUESTS_GROUP, Keys
from consumers.pipeline import Outcome, Pipeline
from consumers.streams import Delivery, GroupReader, Publisher, entry_time_ms, is_nogroup, now_ms
from schemas.events import DeadLetter, ErrorInfo, Request, Result

log = structlog.get_logger(__name__)


def consumer_name() -> str:
    return f"{socket.gethostname()}#{os.getpid()}"


class Worker:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, pipeline: Pipeline,
                 consumer: str | None = None, batch_size: int = 32, max_in_flight: int = 256,
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
        self.max_in_flight = max_in_flight
        self.max_deliveries = max_deliveries
        self.claim_idle = claim_idle
        self.health_interval = health_interval
        self.shutdown_grace = shutdown_grace
        self.reader = GroupReader(redis, keys.requests, REQUESTS_GROUP, self.consumer,
                                  claim_idle=claim_idle, block=block)
        self.publisher = Publisher(redis, requests_stream=keys.requests, group=REQUESTS_GROUP,
                                   dead_letter_stream=keys.dead_letter,
                                   changes_stream=keys.changes, done_ttl=done_ttl)
        self.counters: Counter[str] = Counter()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop reading; what is in flight finishes (or stays pending for another worker)."""
        self._stopping.set()

    async def run(self, *, burst: bool = False) -> None:
        """Serve until stop(); with burst=True, return once the stream has nothing for us."""
        log.info("worker_started", consumer=self.consumer, stream=self.keys.requests)
        await self._ensure_group_with_retry()
        renewer = asyncio.create_task(self._renew_leases())
        health = asyncio.create_task(self._report_health())
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                free = self.max_in_flight - len(self._in_flight)
                if free <= 0:
                    await asyncio.wait(list(self._in_flight.values()), timeout=1.0,
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    deliveries = await self.reader.read(min(self.batch_size, free),
                                                        skip=tuple(self._in_flight))
                    backoff = 0.1
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    log.warning("redis_unreachable", error=str(exc), retry_in=backoff)
                    await self._sleep_unless_stopping(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                except RedisError as exc:
                    if is_nogroup(exc):
                        log.warning("group_missing_recreating", stream=self.keys.requests)
                        await self._ensure_group_with_retry()
                        continue
                    raise
                for delivery in deliveries:
                    if delivery.message_id not in self._in_flight:
                        task = asyncio.create_task(self._handle(delivery))
                        self._in_flight[delivery.message_id] = task
                        task.add_done_callback(
                            lambda _t, mid=delivery.message_id: self._in_flight.pop(mid, None))
                if burst and not deliveries:
                    if not self._in_flight:
                        break
                    await asyncio.wait(list(self._in_flight.values()), timeout=1.0,
                                       return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._drain()
            renewer.cancel()
            health.cancel()
            await asyncio.gather(renewer, health, return_exceptions=True)
            await self._write_health()
            log.info("worker_stopped", consumer=self.consumer, **self.counters)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _ensure_group_with_retry(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.reader.ensure_group()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis_unreachable", error=str(exc), retry_in=delay)
                if self._stopping.is_set():
                    raise
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, 5.0)

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        log.info("draining", in_flight=len(self._in_flight))
        done, pending = await asyncio.wait(list(self._in_flight.values()),
                                           timeout=self.shutdown_grace.total_seconds())
        for task in pending:  # left pending in the stream: another worker takes them over
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("left_pending", count=len(pending))

    async def _renew_leases(self) -> None:
        interval = max(self.claim_idle.total_seconds() / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reader.renew(list(self._in_flight))
            except RedisError as exc:
                log.warning("lease_renewal_failed", error=str(exc))

    async def _report_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval.total_seconds())
            await self._write_health()

    async def _write_health(self) -> None:
        state = {"consumer": self.consumer, "at": time.time(), "in_flight": len(self._in_flight),
                 **self.counters}
        try:
            await self.redis.set(self.keys.health(self.consumer), json.dumps(state),
                                 ex=max(int(self.health_interval.total_seconds() * 3), 1))
        except RedisError as exc:
            log.warning("health_write_failed", error=str(exc))
        log.info("worker_health", **state)

    # one delivery ------------------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        with bound_contextvars(message_id=delivery.message_id, redelivered=delivery.redelivered):
            try:
                await self._process(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the one place that catches everything: leave pending
                self.counters["retry_later"] += 1
                log.exception("processing_failed_left_pending", error=str(exc),
                              times_delivered=delivery.times_delivered)

    async def _process(self, delivery: Delivery) -> None:
        decoded = intake.decode(delivery.fields)
        if isinstance(decoded, intake.Undeliverable):
            await self._dead_letter(delivery, decoded.error, request_id=None)
            return
        if isinstance(decoded, intake.Rejected):
            result = Result(request_id=decoded.request_id, status="rejected", error=decoded.error)
            await self._publish(delivery, decoded.request_id, decoded.reply_to, Outcome(result))
            return
        request: Request = decoded
        with bound_contextvars(request_id=request.request_id):
            if delivery.times_delivered > self.max_deliveries:
                await self._dead_letter(delivery, ErrorInfo(
                    code="delivery_limit_exceeded",
                    message=f"processing failed {delivery.times_delivered - 1} times"),
                    request_id=request.request_id, reply_to=request.reply_to)
                return
            if await self.publisher.already_done(self.keys.done(request.request_id)):
                await self.reader.ack(delivery.message_id)
                self.counters["duplicate"] += 1
                log.info("duplicate_acked")
                return
            try:
                outcome = await self.pipeline.process(request)
            except RequestRejected as exc:
                outcome = Outcome(Result(request_id=request.request_id, status="rejected",
                                         error=ErrorInfo(code=exc.code, message=exc.message)))
            except GenerationFailed as exc:
                outcome = Outcome(Result(request_id=request.request_id, status="failed",
                                         error=ErrorInfo(code=exc.code, message=exc.message)))
            await self._publish(delivery, request.request_id, request.reply_to, outcome)

    async def _publish(self, delivery: Delivery, request_id: str, reply_to: str | None,
                       outcome: Outcome) -> None:
        latency = round(now_ms() - entry_time_ms(delivery.message_id), 2)
        result = outcome.result.model_copy(update={"latency_ms": latency})
        changes = [c.model_copy(update={"latency_ms": latency}).model_dump_json(exclude_none=True)
                   for c in outcome.changes]
        published = await self.publisher.publish_result(
            message_id=delivery.message_id, done_key=self.keys.done(request_id),
            stream=reply_to or self.keys.results, data=result.model_dump_json(), changes=changes)
        outcome_name = result.cache if result.status == "ok" and result.cache else result.status
        if published:
            self.counters[outcome_name] += 1
            log.info("result_published", status=result.status, cache=result.cache,
                     latency_ms=latency, error=result.error.code if result.error else None)
        else:
            self.counters["duplicate"] += 1
            log.info("duplicate_acked")

    async def _dead_letter(self, delivery: Delivery, error: ErrorInfo, *, request_id: str | None,
                           reply_to: str | None = None) -> None:
        letter = DeadLetter(
            stream=self.keys.requests, message_id=delivery.message_id,
            entry={k.decode("utf-8", "replace"): v[:65536].decode("utf-8", "replace")
                   for k, v in delivery.fields.items()},
            error=error, delivery_count=delivery.times_delivered, consumer=self.consumer,
            request_id=request_id, dead_lettered_at=time.time())
        result = None
        if request_id is not None:
            failed = Result(request_id=request_id, status="failed", error=error,
                            latency_ms=round(now_ms() - entry_time_ms(delivery.message_id), 2))
            result = (reply_to or self.keys.results, failed.model_dump_json(),
                      self.keys.done(request_id))
        await self.publisher.dead_letter(message_id=delivery.message_id,
                                         data=letter.model_dump_json(), result=result)
        self.counters["dead_lettered"] += 1
        log.warning("dead_lettered", code=error.code, error=error.message,
                    times_delivered=delivery.times_delivered)
