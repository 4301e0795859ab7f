"""The janitor: stream trimming that never drops what a group still needs, one active at a time."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from consumers.janitor import Janitor, safe_trim_id
from promptcache.keys import REQUESTS_GROUP
from promptcache.streams import ensure_group
from tests.conftest import wait_until
from tests.helpers import CountingGenerator, send, worker_for


def _janitor(redis, keys, consumer="j1", **kw) -> Janitor:
    kw.setdefault("changes_retention", timedelta(0))
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


async def test_change_events_are_kept_for_their_retention(redis, keys):
    from promptcache.keys import PERSISTER_GROUP

    await ensure_group(redis, keys.changes, PERSISTER_GROUP)
    for _ in range(3):
        await redis.xadd(keys.changes, {"data": b"{}"})
    got = await redis.xreadgroup(PERSISTER_GROUP, "p", {keys.changes: ">"}, count=10)
    await redis.xack(keys.changes, PERSISTER_GROUP, *[m for m, _ in got[0][1]])
    await _janitor(redis, keys, changes_retention=timedelta(hours=1)).trim_streams()
    assert await redis.xlen(keys.changes) == 3  # read by every group, but recent
    [(last, _)] = await redis.xrevrange(keys.changes, count=1)
    last_ms = int(last.split(b"-")[0])

    async def clock_past_the_last_event() -> bool:  # ids are milliseconds: MINID keeps `now`'s
        return int(time.time() * 1000) > last_ms

    await wait_until(clock_past_the_last_event)
    await _janitor(redis, keys, changes_retention=timedelta(0)).trim_streams()
    assert await redis.xlen(keys.changes) == 0


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

    async def lock_ran_out() -> bool:  # j1 "crashed": nobody extends its lock
        return not await redis.exists(keys.janitor_lock)

    await wait_until(lock_ran_out, timeout=10)
    assert await second._hold_lock() and not await first._hold_lock()
    await redis.delete(keys.janitor_lock)


# --- TTL, storage cap, orphans (with the registry) ---------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from consumers.wiring import blob_store, registry, streams_client  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.helpers import results, running  # noqa: E402


def _disk_bytes(settings) -> int:
    """Bytes of the files under the data dir; a file the janitor deletes between the listing
    and its stat() counts as gone."""
    total = 0
    for p in settings.data_dir.rglob("*"):
        if p.name.endswith(".tmp"):
            continue
        try:
            if p.is_file():
                total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _full_janitor(redis, keys, settings, consumer="j1", **kw) -> Janitor:
    blobs = blob_store(settings)
    return Janitor(redis=redis, keys=keys, consumer=consumer, blobs=blobs,
                   registry=registry(redis, keys, blobs, settings), ttl=settings.ttl,
                   interval=timedelta(milliseconds=100), block=timedelta(milliseconds=50),
                   **kw)


async def test_small_cap_holds_under_hundreds_of_distinct_prompts(redis, keys, tmp_path, redis_url):
    cap = 400_000
    settings = make_settings(tmp_path, redis_url, keys, storage_limit=cap)
    small = {"width": 256, "height": 256}
    await ensure_group(redis, keys.changes, "observer")  # keeps every change event untrimmed
    for i in range(240):
        await send(redis, keys.requests, request_id=f"cap-{i}", prompt=f"distinct scene {i}",
                   params=small)
    # each process has its own connection pool, as in production
    c1, c2 = streams_client(redis_url), streams_client(redis_url)
    w1 = worker_for(settings, c1, CountingGenerator(), consumer="w1")
    w2 = worker_for(settings, c2, CountingGenerator(), consumer="w2")
    janitor = _full_janitor(redis, keys, settings)
    samples, biggest = [], 0
    async with running(w1), running(w2):
        jtask = asyncio.create_task(janitor.run())

        async def answered() -> bool:
            samples.append(_disk_bytes(settings))
            return len(await results(redis, keys.results)) == 240

        await wait_until(answered, timeout=120, interval=0.02)
        janitor.stop()
        await jtask
    await c1.aclose()
    await c2.aclose()
    got = await results(redis, keys.results)
    biggest = max(r.width for r in got)  # every request answered, all 256 px
    one_image = max(p.stat().st_size for p in settings.images_dir.rglob("*.png"))
    one_thumb = max(p.stat().st_size for p in settings.thumbnails_dir.rglob("*.webp"))
    assert biggest == 256 and {r.status for r in got} == {"ok"}
    assert max(samples) <= cap + one_image + one_thumb, (max(samples), cap)
    reg = registry(redis, keys, blob_store(settings), settings)
    assert _disk_bytes(settings) == await reg.stored() <= cap
    assert await reg.count() < 240  # it really evicted
    evicted = [e for _, e in await redis.xrange(keys.changes) if b'"entry_evicted"' in e[b"data"]]
    assert len(evicted) >= 240 - await reg.count()
    assert await janitor.sweep_orphans() == (0, 0)


async def test_expired_entries_are_gone_within_one_interval(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, ttl="1s")
    await send(redis, keys.requests, request_id="t1", prompt="a fading photograph")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    assert _disk_bytes(settings) > 0
    reg = registry(redis, keys, blob_store(settings), settings)

    async def unused_for_a_ttl() -> bool:  # the janitor's own test: last use before now - ttl
        return bool(await reg.expired(time.time() - 1.0, limit=1))

    await wait_until(unused_for_a_ttl, timeout=10, interval=0.05)
    janitor = _full_janitor(redis, keys, settings)
    await janitor.run(burst=True)
    assert await reg.count() == 0 and await reg.stored() == 0
    assert _disk_bytes(settings) == 0
    assert not [k async for k in redis.scan_iter(match=keys.exact("*"))]
    assert janitor.evicted == {"ttl": 1}
    await send(redis, keys.requests, request_id="t2", prompt="a fading photograph")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    assert [r.cache for r in await results(redis, keys.results)] == ["miss", "miss"]


async def test_hits_keep_an_entry_alive(redis, keys, tmp_path, redis_url):
    ttl = 3.0
    settings = make_settings(tmp_path, redis_url, keys, ttl=f"{ttl:g}s")
    gen = CountingGenerator()
    created = time.time()
    await send(redis, keys.requests, request_id="h0", prompt="a well-loved picture")
    await worker_for(settings, redis, gen).run(burst=True)
    janitor = _full_janitor(redis, keys, settings)
    reg = registry(redis, keys, blob_store(settings), settings)

    async def unused_for_a_third_of_the_ttl() -> bool:
        return bool(await reg.expired(time.time() - ttl / 3, limit=1))

    hits = 0
    while time.time() - created <= ttl + 0.5:  # until it would have expired without the hits
        await wait_until(unused_for_a_third_of_the_ttl, timeout=10, interval=0.05)
        hits += 1
        await send(redis, keys.requests, request_id=f"h{hits}", prompt="a well-loved picture")
        await worker_for(settings, redis, gen).run(burst=True)
        await janitor.run(burst=True)
    assert [r.cache for r in await results(redis, keys.results)] == ["miss"] + ["exact"] * hits
    assert janitor.evicted == {} and await reg.count() == 1


async def test_racing_janitors_never_double_free(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, storage_limit=10_000_000)
    for i in range(30):
        await send(redis, keys.requests, request_id=f"r{i}", prompt=f"scene {i}",
                   params={"width": 256, "height": 256})
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    before = _disk_bytes(settings)
    reg_a = registry(redis, keys, blob_store(settings), settings)
    reg_b = registry(redis, keys, blob_store(settings), settings)
    reg_a.limit_bytes = reg_b.limit_bytes = before // 3
    # two evictors at once (a janitor restarted mid-eviction, and a writer making room)
    by_a, by_b = await asyncio.gather(reg_a.evict_lru(reason="storage_limit"),
                                      reg_b.evict_lru(reason="storage_limit"))
    stored = await reg_a.stored()
    assert stored == _disk_bytes(settings) <= before // 3
    # each entry was freed by one evictor only (so one eviction event each), none a survivor
    evicted = [e.entry.entry_id for e in by_a + by_b]
    survivors = {k.decode() for k in await redis.hkeys(keys.entries)}
    assert len(evicted) == len(set(evicted)) == 30 - await reg_a.count() > 0
    assert not survivors & set(evicted)
    assert sum(e.freed for e in by_a + by_b) == before - stored


async def test_orphan_files_and_entries_without_files_are_swept(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys)
    for i in range(3):
        await send(redis, keys.requests, request_id=f"o{i}", prompt=f"orphan test {i}")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    blobs = blob_store(settings)
    stray = blobs.put(b"not referenced by any entry", "image/png", b"thumb")
    old = time.time() - 7200
    for path in (blobs.image_path(stray.image_name), blobs.thumbnail_path(stray.thumbnail_name)):
        os.utime(path, (old, old))
    fresh = blobs.put(b"being written right now", "image/png", b"thumb2")
    victim = (await results(redis, keys.results))[0]
    sha = victim.image_url.rsplit("/", 1)[1].split(".")[0]
    blobs.image_path(f"{sha}.png").unlink()
    reg = registry(redis, keys, blobs, settings)
    for raw_id, raw in (await redis.hgetall(keys.entries)).items():  # make entries old enough
        record = json.loads(raw)
        record["created"] = time.time() - 7200
        await redis.hset(keys.entries, raw_id, json.dumps(record))
    janitor = _full_janitor(redis, keys, settings)
    files, entries = await janitor.sweep_orphans()
    assert (files, entries) == (2, 1)
    assert blobs.image_path(fresh.image_name).exists()  # inside the grace time: kept
    assert await reg.count() == 2
    assert await reg.stored() == _disk_bytes(settings) - fresh.image_bytes - fresh.thumbnail_bytes


async def test_idle_consumers_with_nothing_pending_are_removed(redis, keys, settings):
    await ensure_group(redis, keys.requests, REQUESTS_GROUP)
    await redis.xreadgroup(REQUESTS_GROUP, "gone#1", {keys.requests: ">"}, count=1)
    await send(redis, keys.requests, request_id="held", prompt="x")
    await redis.xreadgroup(REQUESTS_GROUP, "busy#2", {keys.requests: ">"}, count=1)

    async def both_idle() -> bool:
        return all(c["idle"] > 250 for c in await redis.xinfo_consumers(keys.requests,
                                                                         REQUESTS_GROUP))

    await wait_until(both_idle, timeout=10)
    janitor = _full_janitor(redis, keys, settings, consumer_idle=timedelta(milliseconds=200))
    assert await janitor.remove_dead_consumers() == 1
    names = [c["name"] for c in await redis.xinfo_consumers(keys.requests, REQUESTS_GROUP)]
    assert names == [b"busy#2"]
