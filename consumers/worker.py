"""The worker: two stages on two streams, answering every request exactly once.

- The request stage reads `promptcache:requests` (group `workers`) a batch at a time: it decodes
  and prepares every entry (the optimizer and keys memoised), looks up the exact keys of the
  whole batch in one round trip, and publishes every answer of the batch (hits, rejections,
  hand-offs of misses to `promptcache:generate`) in one script call that acknowledges the batch,
  marks each request done, counts the results and writes one `requests_answered` change event.
  Exact misses that the semantic tier may answer leave the batch for their own task (they embed
  the prompt), so hits never wait for them.
- The generation stage reads `promptcache:generate` (group `generators`) only while it has a
  free slot (`generation_concurrency`), so a burst of misses spreads over every worker instead
  of queueing behind the one that read it, and hits never wait behind generations.

Both stages are a `GroupLoop`: leases renewed on what they hold (XCLAIM JUSTID), what dead
consumers left taken over (XAUTOCLAIM), what keeps failing past `max_deliveries` dead-lettered,
and on stop() what they hold finished or left pending.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consumers.group import UNREACHABLE, GroupLoop, Stopper
from promptcache import intake
from promptcache.errors import GenerationFailed, PipelineError, RequestRejected
from promptcache.keys import GENERATE_GROUP, REQUESTS_GROUP, Keys, shard_of
from promptcache.latency import bucket_of
from promptcache.pipeline import Outcome, Pipeline, Prepared
from promptcache.streams import (
    TO_FALLBACK,
    Delivery,
    GroupReader,
    Outgoing,
    Publisher,
    Source,
    entry_time_ms,
    now_ms,
)
from schemas.events import (
    Answer,
    DeadLetter,
    ErrorInfo,
    GenerationJob,
    Request,
    Result,
    Status,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
RETRY_PAUSES = (0.05, 0.25, 1.0)  # a Redis hiccup: retried here before leaving entries pending


def consumer_name() -> str:
    return f"{socket.gethostname()}#{os.getpid()}"


def _answer_with_error(request: Request, status: Status, exc: PipelineError) -> Outcome:
    return Outcome(Result(request_id=request.request_id, status=status,
                          error=ErrorInfo(code=exc.code, message=exc.message)))


@dataclass(slots=True)
class _Answer:
    """One answer of a batch on its way to the publish script."""

    message_id: str
    origin_id: str  # the request entry's id: latency runs from its time
    reply_to: str | None
    outcome: Outcome
    scope: str | None = None  # the request's scope (per-scope counters and statistics)


class Worker:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, pipeline: Pipeline,
                 consumer: str | None = None, batch_size: int = 32, max_in_flight: int = 256,
                 generation_concurrency: int = 4,
                 claim_idle: timedelta = timedelta(seconds=60),
                 block: timedelta = timedelta(seconds=1), max_deliveries: int = 5,
                 done_ttl: timedelta = timedelta(days=7),
                 health_interval: timedelta = timedelta(seconds=10),
                 shutdown_grace: timedelta = timedelta(seconds=30),
                 durable_results: bool = False) -> None:
        self.redis = redis
        self.keys = keys
        self.pipeline = pipeline
        self.consumer = consumer or consumer_name()
        self.max_deliveries = max_deliveries
        self.health_interval = health_interval
        self.shutdown_grace = shutdown_grace
        self.stopper = Stopper()
        self.fast = GroupLoop(
            GroupReader(redis, keys.requests, REQUESTS_GROUP, self.consumer,
                        claim_idle=claim_idle, block=block),
            self._handle_requests, name="requests", batch_size=batch_size,
            capacity=max_in_flight, stopper=self.stopper, claim_idle=claim_idle)
        self.slow = GroupLoop(
            GroupReader(redis, keys.generate, GENERATE_GROUP, self.consumer,
                        claim_idle=claim_idle, block=block),
            self._start_jobs, name="generate", batch_size=batch_size,
            capacity=generation_concurrency, stopper=self.stopper, claim_idle=claim_idle)
        self.publisher = Publisher(redis, dead_letter_stream=keys.dead_letter,
                                   changes_stream=keys.changes, results_stream=keys.results,
                                   metrics_results=keys.metrics_results, done_ttl=done_ttl,
                                   outbox=keys.outbox, metrics_scopes=keys.metrics_scopes,
                                   durable=durable_results, cluster=keys.cluster)
        # one health record per shard's worker in a sharded process
        self.health_name = (f"{self.consumer}/{keys.shard}" if keys.shards > 1
                            else self.consumer)
        self.counters: Counter[str] = Counter()

    def stop(self) -> None:
        """Stop reading; what is in flight finishes (or stays pending for another worker)."""
        self.stopper.stop()

    async def run(self, *, burst: bool = False) -> None:
        """Serve until stop(); with burst=True, return once both streams have nothing for us."""
        log.info("worker_started", consumer=self.consumer, stream=self.keys.requests,
                 shard=self.keys.shard)
        for stage in (self.fast, self.slow):
            await stage.ensure_group()
        if self.publisher.durable:
            await self.publisher.check_durable()
            await self._retrying(self.publisher.flush_stale)  # a worker died between steps
        helpers = [asyncio.create_task(self.fast.renew_leases()),
                   asyncio.create_task(self.slow.renew_leases()),
                   asyncio.create_task(self._report_health())]
        try:
            await asyncio.gather(self.fast.run(burst=burst, idle=self._idle),
                                 self.slow.run(burst=burst, idle=self._idle))
        finally:
            await asyncio.gather(self.fast.drain(self.shutdown_grace),
                                 self.slow.drain(self.shutdown_grace))
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._write_health()
            log.info("worker_stopped", consumer=self.consumer, **self.counters)

    def _idle(self) -> bool:
        return all(s.drained and not s.held for s in (self.fast, self.slow))

    async def _report_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval.total_seconds())
            await self._write_health()

    async def _write_health(self) -> None:
        state = {"consumer": self.health_name, "at": time.time(),
                 "in_flight": len(self.fast.held), "generating": len(self.slow.held),
                 **self.counters}
        try:
            await self.redis.set(self.keys.health(self.health_name), json.dumps(state),
                                 ex=max(int(self.health_interval.total_seconds() * 3), 1))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("health_write_failed", error=str(exc))
        log.debug("worker_health", **state)

    # the request stage: a batch at a time -------------------------------------------------

    async def _handle_requests(self, deliveries: list[Delivery]) -> None:
        source = self.fast.reader.source
        answers: list[_Answer] = []
        handoffs: list[Outgoing] = []
        lookups: list[tuple[Delivery, Prepared]] = []
        for delivery in deliveries:
            try:
                decoded = intake.decode(delivery.fields, own_prefix=self.keys.prefix)
                if isinstance(decoded, intake.Undeliverable):
                    await self._guard(delivery, self._dead_letter(source, delivery, decoded.error))
                    continue
                if isinstance(decoded, intake.Rejected):
                    reply_to = decoded.reply_to
                    if reply_to is not None and intake.is_own_key(reply_to, self.keys.prefix):
                        reply_to = None
                    answers.append(_Answer(delivery.message_id, delivery.message_id, reply_to,
                                           Outcome(Result(request_id=decoded.request_id,
                                                          status="rejected", error=decoded.error))))
                    continue
                request: Request = decoded
                if shard_of(request.request_id, self.keys.shards) != self.keys.shard:
                    # answered here all the same; but its done marker is in this shard, so the
                    # same id sent to its own shard would be answered again: the producer must
                    # route by crc32(request_id) mod N
                    self.counters["misrouted"] += 1
                    if self.counters["misrouted"] == 1:
                        log.warning("request_on_the_wrong_shard", request_id=request.request_id,
                                    shard=self.keys.shard,
                                    expected=shard_of(request.request_id, self.keys.shards))
                if delivery.times_delivered > self.max_deliveries:
                    await self._guard(delivery, self._over_limit(source, delivery, request,
                                                                 delivery.message_id))
                    continue
                try:
                    prepared = self.pipeline.prepare(request)
                except RequestRejected as exc:
                    answers.append(_Answer(delivery.message_id, delivery.message_id,
                                           request.reply_to,
                                           _answer_with_error(request, "rejected", exc),
                                           request.scope))
                    continue
                if request.options.cache != "use":
                    handoffs.append(self._handoff(delivery.message_id, request))
                else:
                    lookups.append((delivery, prepared))
            except Exception as exc:  # noqa: BLE001 - one bad entry must not fail its batch
                log.exception("request_failed_left_pending", error=str(exc),
                              message_id=delivery.message_id,
                              times_delivered=delivery.times_delivered)
                if delivery.times_delivered > self.max_deliveries:  # it will never work: out
                    await self._guard(delivery, self._dead_letter(source, delivery, ErrorInfo(
                        code="delivery_limit_exceeded",
                        message=f"processing failed {delivery.times_delivered - 1} times: "
                                f"{type(exc).__name__}: {exc}"[:500])))
                else:
                    self.counters["retry_later"] += 1  # left pending: redelivered
        if lookups:
            found = await self._retrying(lambda: self.pipeline.lookup_many(
                [p for _, p in lookups]))
            similar: list[tuple[Delivery, Prepared]] = []
            for delivery, prepared in lookups:
                entry = found.get(prepared.key) if found is not None else None
                if entry is not None:
                    answers.append(_Answer(delivery.message_id, delivery.message_id,
                                           prepared.request.reply_to,
                                           self.pipeline.hit(prepared, entry, "exact"),
                                           prepared.request.scope))
                elif found is not None and self.pipeline.semantic is not None:
                    similar.append((delivery, prepared))
                else:
                    handoffs.append(self._handoff(delivery.message_id, prepared.request))
            if similar:  # the batch's exact misses: one task, off the hits' path
                task = asyncio.create_task(self._guard_all(
                    [d for d, _ in similar], self._look_similar(similar)))
                for delivery, _ in similar:
                    self.fast.hold(delivery.message_id, task)
        if answers or handoffs:
            await self._retrying(lambda: self._publish(source, answers, handoffs))

    def _handoff(self, message_id: str, request: Request) -> Outgoing:
        job = GenerationJob(request=request, origin_id=message_id)
        return Outgoing(message_id, self.keys.done(request.request_id), self.keys.generate,
                        job.model_dump_json(exclude_none=True), kind="h")

    async def _look_similar(self, lookups: list[tuple[Delivery, Prepared]]) -> None:
        """A batch's exact misses: the semantic tier for all of them at once, then one publish
        of the semantic hits and the hand-offs to the generation stage."""
        outcomes = await self._retrying(lambda: self.pipeline.similar_many(
            [p for _, p in lookups]))
        answers: list[_Answer] = []
        handoffs: list[Outgoing] = []
        for (delivery, prepared), outcome in zip(lookups, outcomes or [None] * len(lookups),
                                                 strict=True):
            if outcome is not None:
                answers.append(_Answer(delivery.message_id, delivery.message_id,
                                       prepared.request.reply_to, outcome,
                                       prepared.request.scope))
            else:
                handoffs.append(self._handoff(delivery.message_id, prepared.request))
        await self._retrying(lambda: self._publish(self.fast.reader.source, answers, handoffs))

    # the generation stage: one task per job -----------------------------------------------

    async def _start_jobs(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self.slow.hold(delivery.message_id, asyncio.create_task(
                self._guard(delivery, self._handle_job(delivery))))

    async def _handle_job(self, delivery: Delivery) -> None:
        source = self.slow.reader.source
        try:
            job = GenerationJob.model_validate_json(delivery.fields.get(b"data", b""))
        except ValidationError as exc:  # only a bug or a hand-written entry gets here
            await self._dead_letter(source, delivery, ErrorInfo(
                code="invalid_request", message=f"unreadable generation job: {exc}"[:500]))
            return
        request = job.request
        if delivery.times_delivered > self.max_deliveries:
            await self._over_limit(source, delivery, request, job.origin_id)
            return
        if await self.publisher.already_done(self.keys.done(request.request_id)):
            await self.publisher.ack(source, delivery.message_id)
            self.counters["duplicate"] += 1
            log.debug("duplicate_acked", request_id=request.request_id)
            return
        try:
            outcome = await self.pipeline.generate(request)
        except RequestRejected as exc:
            outcome = _answer_with_error(request, "rejected", exc)
        except GenerationFailed as exc:
            outcome = _answer_with_error(request, "failed", exc)
        answer = _Answer(delivery.message_id, job.origin_id, request.reply_to, outcome,
                         request.scope)
        # retried: a generation's answer must not wait for a redelivery (and its entry_stored
        # would be lost with it); publishing is exactly-once, so a retry is safe
        await self._retrying(lambda: self._publish(source, [answer]))
        log.debug("result_published", request_id=request.request_id,
                 status=outcome.result.status, cache=outcome.result.cache)

    # publishing -----------------------------------------------------------------------------

    async def _publish(self, source: Source, answers: Sequence[_Answer],
                       handoffs: Sequence[Outgoing] = ()) -> None:
        """Every answer and hand-off of a batch in one script call (see Publisher.publish)."""
        now = now_ms()
        rows: list[Outgoing] = []
        changes: list[str] = []
        for item in answers:
            latency = round(now - entry_time_ms(item.origin_id), 2)
            result = item.outcome.result.model_copy(update={"latency_ms": latency})
            rows.append(self._result_row(item.message_id, item.reply_to, result,
                                         item.outcome.saved_generation_ms, item.scope))
            changes += [c.model_copy(update={"latency_ms": latency}).model_dump_json(
                exclude_none=True) for c in item.outcome.changes]
        rows += handoffs
        flags = await self.publisher.publish(source, rows, changes=changes)
        for item, flag in zip(answers, flags, strict=False):
            result = item.outcome.result
            if not flag:
                self.counters["duplicate"] += 1
                continue
            self.counters[result.cache if result.status == "ok" and result.cache
                          else result.status] += 1
            if flag == TO_FALLBACK:
                self.counters["reply_to_unwritable"] += 1
                log.warning("reply_to_unwritable", request_id=result.request_id,
                            reply_to=item.reply_to)
        self.counters["handed_off"] += sum(1 for f in flags[len(answers):] if f)
        if handoffs:
            self.slow.drained = False  # there is work for the generation stage now

    def _result_row(self, message_id: str, reply_to: str | None, result: Result,
                    saved_generation_ms: float | None, scope: str | None = None) -> Outgoing:
        fallback = ""
        if reply_to:  # where the result goes when the reply_to cannot be written
            fallback = result.model_copy(update={"error": ErrorInfo(
                code="reply_to_unwritable",
                message=f"the result could not be written to reply_to {reply_to!r} (it holds "
                        f"another type of key)" + (
                            f"; the request's own error: {result.error.code}: "
                            f"{result.error.message}" if result.error else ""))}
            ).model_dump_json()
        tier = result.cache if result.status == "ok" else None
        latency = result.latency_ms or 0.0
        answer = Answer(request_id=result.request_id, status=result.status, tier=tier,
                        entry_id=result.entry_id, latency_ms=latency,
                        reason=result.error.code if result.error else None,
                        generation_ms=saved_generation_ms, similarity=result.similarity,
                        scope=scope)
        return Outgoing(message_id, self.keys.done(result.request_id),
                        reply_to or self.keys.results, result.model_dump_json(),
                        fallback=fallback, answer=answer.model_dump_json(exclude_none=True),
                        counter=f"{tier or ''}|{result.status}",
                        scope_counter=f"{scope}|{tier or ''}|{result.status}" if scope else "",
                        histogram=self.keys.metrics_latency(tier or result.status),
                        bucket=bucket_of(latency), latency_ms=latency)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """A Redis hiccup is retried a few times (every step is safe to repeat: publishing is
        exactly-once per request id); a longer outage propagates and the batch stays pending
        for XAUTOCLAIM."""
        for pause in (*RETRY_PAUSES, None):
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if pause is None or self.stopper.stopping:
                    raise
                log.warning("redis_error_retrying", error=str(exc), retry_in=pause)
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _guard_all(self, deliveries: list[Delivery],
                         work: Coroutine[object, object, None]) -> None:
        """`_guard` for work that answers several entries at once."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except UNREACHABLE as exc:
            self.counters["retry_later"] += len(deliveries)
            log.warning("redis_unreachable_left_pending", error=str(exc), batch=len(deliveries))
        except Exception as exc:  # noqa: BLE001
            self.counters["retry_later"] += len(deliveries)
            log.exception("processing_failed_left_pending", error=str(exc),
                          message_ids=[d.message_id for d in deliveries[:10]],
                          batch=len(deliveries))

    async def _guard(self, delivery: Delivery, work: Coroutine[object, object, None]) -> None:
        """The one place that catches everything: an unexpected failure, or a Redis outage that
        outlasts the retries, leaves the entry pending for XAUTOCLAIM (and, past
        `max_deliveries`, the dead letter)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except UNREACHABLE as exc:  # an outage: no traceback per request
            self.counters["retry_later"] += 1
            log.warning("redis_unreachable_left_pending", error=str(exc),
                        message_id=delivery.message_id)
        except Exception as exc:  # noqa: BLE001
            self.counters["retry_later"] += 1
            log.exception("processing_failed_left_pending", error=str(exc),
                          message_id=delivery.message_id,
                          times_delivered=delivery.times_delivered)

    # dead letters ---------------------------------------------------------------------------

    async def _over_limit(self, source: Source, delivery: Delivery, request: Request,
                          origin_id: str) -> None:
        await self._dead_letter(source, delivery, ErrorInfo(
            code="delivery_limit_exceeded",
            message=f"processing failed {delivery.times_delivered - 1} times"),
            request=request, origin_id=origin_id)

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
            reply_to = request.reply_to
            if reply_to is not None and intake.is_own_key(reply_to, self.keys.prefix):
                reply_to = None
            result = self._result_row(delivery.message_id, reply_to, failed,
                                      saved_generation_ms=None, scope=request.scope)
        await self.publisher.dead_letter(source, delivery.message_id,
                                         data=letter.model_dump_json(), result=result)
        self.counters["dead_lettered"] += 1
        log.warning("dead_lettered", code=error.code, error=error.message,
                    message_id=delivery.message_id, times_delivered=delivery.times_delivered)
