"""The janitor: stream trimming that never drops what a group still needs, one active at a time."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from consumers.janitor import Janitor, safe_trim_id
from consumers.keys import REQUESTS_GROUP
from consumers.streams import ensure_group
from tests.helpers import CountingGenerator, send, worker_for


def _janitor(redis, keys, consumer="j1", **kw) -> Janitor:
    return Janitor(redis=redis, keys=keys, consumer=consumer, block=timedelta(milliseconds=50),
                   **kw)


async def test_trimming_keeps_pending_and_undelivered_entries(redis, keys):
    await ensure_group(redis, keys.requests, REQUESTS_GROUP)
    await ensure_group(redis, keys.requests, "slow-group")
    ids = [await send(redis, keys.requests, request_id=f"r{i}", prompt="x") for i in range(10)]
    # "workers" read and acked 6, holds the 7th pending; "slow-group" read only 3
    got = await redis.xreadgroup(REQUESTS_GROUP, "c", {keys.requests: ">"}, count=7)
    await redis.xack(keys.requests, REQUESTS_GROUP, *[m for m, _ in got[0][1]][:6])
    await redis.xreadgroup("slow-group", "c", {keys.requests: ">"}, count=3)
    await redis.xack(keys.requests, "slow-group", *ids[:3])

    assert await safe_trim_id(redis, keys.requests) == f"{ids[2].split('-')[0]}-{int(ids[2].split('-')[1]) + 1}"
    await _janitor(redis, keys).trim_streams()
    left = [m.decode() for m, _ in await redis.xrange(keys.requests)]
    assert left == ids[3:]


async def test_stream_without_groups_is_not_trimmed(redis, keys):
    await redis.xadd(keys.requests, {"data": b"x"})
    await _janitor(redis, keys).trim_streams()
    assert await redis.xlen(keys.requests) == 1


async def test_janitor_accounts_stored_bytes_and_trims_after_processing(redis, keys, settings):
    for i in range(3):
        await send(redis, keys.requests, request_id=f"b{i}", prompt=f"bytes {i}")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    janitor = _janitor(redis, keys)
    await janitor.run(burst=True)
    stored = int(await redis.get(keys.stored_bytes))
    on_disk = sum(p.stat().st_size for p in settings.data_dir.rglob("*") if p.is_file())
    assert stored == on_disk > 0
    assert await redis.xlen(keys.requests) == 0  # all answered: nothing left to keep
    assert await redis.get(keys.janitor_lock) is None  # released on exit


async def test_only_one_janitor_works_at_a_time_and_a_dead_ones_lock_expires(redis, keys):
    first = _janitor(redis, keys, "j1", lock_ttl=timedelta(milliseconds=300))
    second = _janitor(redis, keys, "j2", lock_ttl=timedelta(milliseconds=300))
    assert await first._hold_lock() and not await second._hold_lock()
    assert await first._hold_lock()  # the holder extends it
    await asyncio.sleep(0.4)  # j1 "crashed": its lock ran out
    assert await second._hold_lock() and not await first._hold_lock()
    await redis.delete(keys.janitor_lock)
