"""One consumer of one group, as a loop: what the worker's two stages, the persister and the
janitor share.

A `GroupLoop` reads batches (what dead consumers left first, then new entries), hands each batch
to its handler, renews the lease (XCLAIM JUSTID) on everything it holds so nobody else takes it
over, reconnects with backoff when Redis is unreachable, recreates a group that was deleted, and
on stop() stops reading. A handler either finishes the batch before returning, or hands entries
to tasks with `hold()`; the loop reads no more than `capacity` entries at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from promptcache.streams import Delivery, GroupReader, is_nogroup

log = structlog.get_logger(__name__)

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class Stopper:
    """A stop flag, and a sleep that ends as soon as stop() is called."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def stop(self) -> None:
        self._event.set()

    @property
    def stopping(self) -> bool:
        return self._event.is_set()

    async def sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def wait(self) -> None:
        await self._event.wait()


class GroupLoop:
    def __init__(self, reader: GroupReader, handle: Callable[[list[Delivery]], Awaitable[None]],
                 *, name: str, batch_size: int, capacity: int, stopper: Stopper,
                 claim_idle: timedelta) -> None:
        self.reader = reader
        self.handle = handle
        self.name = name
        self.batch_size = batch_size
        self.capacity = capacity
        self.stopper = stopper
        self.claim_idle = claim_idle
        # entries read and not finished: None while the handler works on its batch, the task
        # that finishes an entry once the handler has handed it on with hold()
        self.held: dict[str, asyncio.Task[None] | None] = {}
        self.drained = False  # the last read found nothing (burst mode's "done" test)

    def hold(self, message_id: str, task: asyncio.Task[None]) -> None:
        """Keep an entry held (leases renewed) until `task` finishes it."""
        self.held[message_id] = task
        task.add_done_callback(lambda _t: self.held.pop(message_id, None))

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for t in self.held.values() if t is not None]

    async def ensure_group(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.reader.ensure_group()
                return
            except UNREACHABLE as exc:
                log.warning("redis_unreachable", stage=self.name, error=str(exc), retry_in=delay)
                if self.stopper.stopping:
                    raise
                await self.stopper.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run(self, *, burst: bool = False,
                  idle: Callable[[], bool] | None = None) -> None:
        """Until stop(); with burst=True, until a read finds nothing and `idle()` (default:
        nothing held) says there is no more work coming."""
        backoff = 0.1
        while not self.stopper.stopping:
            free = self.capacity - len(self.held)
            if free <= 0:
                await asyncio.wait(self.tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                deliveries = await self.reader.read(min(self.batch_size, free),
                                                    skip=tuple(self.held))
                backoff = 0.1
            except UNREACHABLE as exc:
                log.warning("redis_unreachable", stage=self.name, error=str(exc),
                            retry_in=backoff)
                await self.stopper.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except RedisError as exc:
                if not is_nogroup(exc):
                    raise
                log.warning("group_missing_recreating", stream=self.reader.stream)
                await self.ensure_group()
                continue
            self.drained = not deliveries
            if deliveries:
                for d in deliveries:
                    self.held.setdefault(d.message_id, None)
                try:
                    await self.handle(deliveries)
                except UNREACHABLE as exc:  # the batch stays pending: re-read or claimed later
                    log.warning("redis_unreachable", stage=self.name, error=str(exc),
                                retry_in=backoff, batch=len(deliveries))
                    await self.stopper.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                except Exception as exc:  # noqa: BLE001 - the loop outlives any one batch
                    log.exception("batch_failed_left_pending", stage=self.name, error=str(exc),
                                  batch=len(deliveries))
                    await self.stopper.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                finally:
                    for d in deliveries:  # what the handler did not hand to a task is done
                        if self.held.get(d.message_id, 0) is None:
                            del self.held[d.message_id]
            elif burst:
                if (idle or (lambda: not self.held))():
                    return
                if tasks := self.tasks:
                    await asyncio.wait(tasks, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(0.01)

    async def renew_leases(self) -> None:
        """Forever: every third of `claim_idle`, reset the idle time of what is held."""
        interval = max(self.claim_idle.total_seconds() / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            await self.renew_now()

    async def renew_now(self) -> None:
        try:
            await self.reader.renew(list(self.held))
        except RedisError as exc:
            log.warning("lease_renewal_failed", stage=self.name, error=str(exc))

    async def drain(self, grace: timedelta) -> None:
        """Wait up to `grace` for held tasks; cancel the rest (left pending for another)."""
        tasks = self.tasks
        if not tasks:
            return
        log.info("draining", stage=self.name, in_flight=len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=grace.total_seconds())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("left_pending", stage=self.name, count=len(pending))
