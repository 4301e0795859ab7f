"""The persister's statistics stay exact on the batched hit path: the real worker answers misses,
repeated hits and rejections, the persister writes them in bulk, and PostgreSQL says exactly
what was answered. Real Valkey, real PostgreSQL."""

from __future__ import annotations

import math
from collections import Counter
from datetime import timedelta

import psycopg
import pytest

from consumers.persister import Persister
from promptcache.keys import PERSISTER_GROUP, Keys
from promptcache.storage.db import MetadataStore
from schemas.events import ChangeEvent
from tests.helpers import REFUSED, CountingGenerator, results, send, worker_for

PROMPTS = [f"a watercolour of harbour number {i} at dawn" for i in range(6)]


async def _answer_a_mix(redis, keys, settings) -> CountingGenerator:
    """6 misses and a failure; then prompt i repeated i+1 times (exact hits, in worker batches),
    with rejections mixed in."""
    gen = CountingGenerator(fail_with={"doomed harbour": REFUSED})
    for i, prompt in enumerate(PROMPTS):
        await send(redis, keys.requests, request_id=f"m{i}", prompt=prompt)
    await send(redis, keys.requests, request_id="f0", prompt="doomed harbour")
    await worker_for(settings, redis, gen).run(burst=True)
    for i, prompt in enumerate(PROMPTS):
        for j in range(i + 1):
            await send(redis, keys.requests, request_id=f"h{i}-{j}", prompt=prompt.upper())
        await send(redis, keys.requests, request_id=f"r{i}", prompt="...")  # empty_prompt
    await worker_for(settings, redis, gen).run(burst=True)
    return gen


async def _persist(redis, keys, db, batch_size: int = 200) -> Persister:
    store = MetadataStore(db)
    persister = Persister(redis=redis, keys=keys, store=store, consumer="p",
                          batch_size=batch_size, block=timedelta(milliseconds=100))
    try:
        await persister.run(burst=True)
    finally:
        await store.aclose()
    return persister


def _snapshot(db: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(db) as conn:
        return {
            "stats": conn.execute(
                # float sums rounded: adding the same numbers in another order may differ in
                # the last bit
                "SELECT tier, status, sum(requests)::int, round(sum(latency_ms_sum)::numeric, 6),"
                " sum(generator_calls)::int, round(sum(generator_seconds)::numeric, 9),"
                " round(sum(generator_seconds_avoided)::numeric, 9), sum(bytes_stored)::bigint"
                " FROM stats_hourly GROUP BY tier, status ORDER BY tier, status").fetchall(),
            "buckets": conn.execute(
                "SELECT tier, status, latency_buckets FROM stats_hourly"
                " ORDER BY tier, status").fetchall(),
            "entries": conn.execute(
                "SELECT entry_id, hit_count, generation_ms, image_bytes + thumbnail_bytes,"
                " last_used_at >= created_at FROM cache_entries ORDER BY entry_id").fetchall(),
            "hits": conn.execute("SELECT entry_id, request_id, tier, latency_ms FROM cache_hits"
                                 " ORDER BY request_id").fetchall(),
            "origins": conn.execute("SELECT entry_id, request_id, tier FROM entry_origins"
                                    " ORDER BY request_id").fetchall(),
        }


async def test_statistics_from_batched_answers_are_exact(redis, keys, settings, db):
    gen = await _answer_a_mix(redis, keys, settings)
    answered = await results(redis, keys.results)
    events = [ChangeEvent.model_validate_json(f[b"data"])
              for _, f in await redis.xrange(keys.changes)]
    assert not [e for e in events if e.type in ("entry_hit", "request_answered")]
    assert sum(len(e.answers or ()) for e in events) == len(answered) == 6 + 1 + 21 + 6

    persister = await _persist(redis, keys, db, batch_size=2)  # hits and entries split apart
    assert (await redis.xpending(keys.changes, PERSISTER_GROUP))["pending"] == 0
    assert persister.written == len(events) and persister.dead_lettered == 0
    got = _snapshot(db)

    # what was answered, from the results stream
    def label(r):
        return (r.cache if r.status == "ok" else "", r.status)

    count = Counter(label(r) for r in answered)
    latency: dict[tuple[str, str], float] = Counter()
    for r in answered:
        latency[label(r)] += r.latency_ms
    entries = {row[0]: row for row in got["entries"]}
    hit_results = [r for r in answered if r.status == "ok" and r.cache == "exact"]
    hits_per_entry = Counter(r.entry_id for r in hit_results)
    made = [r for r in answered if r.cache == "miss"]
    assert len(made) == len(gen.calls) - 1 == 6 and len(entries) == 6  # + the refused call
    # a hit saves its entry's generation time as the cache record keeps it (0.1 ms)
    expected_avoided = sum(round(entries[r.entry_id][2], 1) for r in hit_results) / 1000
    expected_bytes = sum(row[3] for row in entries.values())

    stats = {(tier, status): rest for tier, status, *rest in got["stats"]}
    assert set(stats) == set(count) == {("exact", "ok"), ("miss", "ok"), ("", "rejected"),
                                        ("", "failed")}
    for key, (requests, latency_sum, calls, seconds, avoided, stored) in stats.items():
        assert requests == count[key], key
        assert math.isclose(latency_sum, latency[key], rel_tol=1e-9, abs_tol=1e-6), key
        if key == ("miss", "ok"):
            assert calls == 6 and stored == expected_bytes
            assert math.isclose(seconds, sum(row[2] for row in entries.values()) / 1000)
        else:
            assert calls == 0 and stored == 0 and seconds == 0
        expect = expected_avoided if key == ("exact", "ok") else 0
        assert math.isclose(avoided, expect, rel_tol=1e-9, abs_tol=1e-9), key
    for tier, status, buckets in got["buckets"]:
        assert sum(buckets) == stats[(tier, status)][0]
    assert {e: row[1] for e, row in entries.items()} == dict(hits_per_entry)
    assert sorted(hits_per_entry.values()) == [1, 2, 3, 4, 5, 6]
    assert all(row[4] for row in entries.values())
    assert [(e, rid, tier) for e, rid, tier, _ in got["hits"]] == sorted(
        ((r.entry_id, r.request_id, "exact") for r in hit_results), key=lambda t: t[1])
    assert [lat for *_, lat in got["hits"]] == [
        r.latency_ms for r in sorted(hit_results, key=lambda r: r.request_id)]
    assert [rid for _, rid, _ in got["origins"]] == [f"m{i}" for i in range(6)]

    # redelivered (another persister, a crash before XACK): nothing counts twice
    await redis.xgroup_setid(keys.changes, PERSISTER_GROUP, "0")
    again = await _persist(redis, keys, db)
    assert again.written == len(events)
    assert _snapshot(db) == got


async def test_the_order_events_arrive_in_changes_nothing(redis, keys, settings, db, redis_url):
    """Hits persisted before their entry (another persister got the entry's batch) still count:
    the same events in reverse order leave PostgreSQL the same."""
    await _answer_a_mix(redis, keys, settings)
    await _persist(redis, keys, db, batch_size=3)
    forward = _snapshot(db)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("TRUNCATE cache_entries, cache_hits, applied_changes, stats_hourly,"
                     " entry_origins, evicted_entries")
    backwards = Keys(f"{keys.prefix}-rev")
    for _, fields in reversed(await redis.xrange(keys.changes)):
        await redis.xadd(backwards.changes, fields)
    try:
        await _persist(redis, backwards, db, batch_size=3)
        assert _snapshot(db) == forward
        assert sum(row[1] for row in forward["entries"]) == 21
    finally:
        await redis.delete(backwards.changes)


async def test_old_per_request_events_are_still_written(redis, keys, db):
    """entry_hit and request_answered (before requests_answered) mean the same as before."""
    stored = ChangeEvent(type="entry_stored", entry_id="e1", at=1_700_000_000.0, cache_key="k1",
                         tier="miss", request_id="a", prompt="p", canonical_prompt="p",
                         params={"model": "m"}, optimizer_version="2", generator="g",
                         blob_sha256="0" * 64, content_type="image/png", width=64, height=64,
                         image_bytes=100, thumbnail_bytes=10, generation_ms=2000.0)
    old = [stored,
           ChangeEvent(type="request_answered", entry_id="e1", at=1_700_000_000.5,
                       request_id="a", tier="miss", status="ok", latency_ms=2100.0),
           ChangeEvent(type="entry_hit", entry_id="e1", at=1_700_000_001.0, request_id="b",
                       tier="exact", latency_ms=3.0, generation_ms=2000.0),
           ChangeEvent(type="request_answered", entry_id="e1", at=1_700_000_001.0,
                       request_id="b", tier="exact", status="ok", latency_ms=3.0)]
    for event in old:
        await redis.xadd(keys.changes, {"data": event.model_dump_json(exclude_none=True)})
    await _persist(redis, keys, db)
    got = _snapshot(db)
    assert got["stats"] == [("exact", "ok", 1, 3.0, 0, 0.0, 2.0, 0),
                            ("miss", "ok", 1, 2100.0, 1, 2.0, 0.0, 110)]
    assert got["entries"] == [("e1", 1, 2000.0, 110, True)]
    assert got["hits"] == [("e1", "b", "exact", 3.0)]


def _stored(entry_id: str, at: float) -> ChangeEvent:
    return ChangeEvent(type="entry_stored", entry_id=entry_id, at=at, cache_key=f"k-{entry_id}",
                       tier="miss", request_id=f"r-{entry_id}", prompt="p", canonical_prompt="p",
                       params={"model": "m"}, optimizer_version="2", generator="g",
                       blob_sha256="0" * 64, content_type="image/png", width=64, height=64,
                       image_bytes=100, thumbnail_bytes=10, generation_ms=2000.0,
                       embedding="AACAPwAAAAA=", embedding_model="m", partition="part")


async def test_an_eviction_read_before_its_entry_leaves_no_row(db):
    """Sharded streams: an entry's entry_stored and its entry_evicted travel on different
    change streams, so a persister can read the eviction first (or in another batch). Either
    order leaves no row for the evicted entry; an entry never evicted is written."""
    store = MetadataStore(db)
    evicted = ChangeEvent(type="entry_evicted", entry_id="gone-late", at=1_700_000_002.0,
                          reason="ttl")
    evicted_in_order = ChangeEvent(type="entry_evicted", entry_id="gone", at=1_700_000_002.0,
                                   reason="ttl")
    try:
        await store.apply_changes([("1/1-0", evicted)])  # shard 1 first
        await store.apply_changes([("0/1-0", _stored("gone-late", 1_700_000_000.0)),
                                   ("0/1-1", _stored("gone", 1_700_000_000.0)),
                                   ("0/1-2", _stored("kept", 1_700_000_000.0))])
        await store.apply_changes([("1/1-1", evicted_in_order)])
    finally:
        await store.aclose()
    with psycopg.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT entry_id FROM cache_entries")] == ["kept"]
        assert [r[0] for r in conn.execute("SELECT entry_id FROM semantic_entries")] == ["kept"]


@pytest.mark.parametrize("batch_size", [1, 50])
async def test_one_transaction_per_batch(redis, keys, settings, db, batch_size):
    """Every batch the persister reads is one transaction (its events share applied_at, the
    transaction's start time), however many events and answers it holds."""
    await _answer_a_mix(redis, keys, settings)
    events = await redis.xlen(keys.changes)
    persister = await _persist(redis, keys, db, batch_size=batch_size)
    with psycopg.connect(db) as conn:
        transactions, applied = conn.execute(
            "SELECT count(DISTINCT applied_at), count(*) FROM applied_changes").fetchone()
    assert applied == events == persister.written
    assert transactions == persister.batches
    assert persister.batches == (events if batch_size == 1 else 1)


async def test_a_late_embedding_gets_its_durable_copy(redis, keys, db):
    """An entry indexed after it was stored (the model was loading) sends `entry_embedded`:
    the persister writes its semantic_entries row as it does for entry_stored's vector."""
    import base64
    import time

    import numpy as np

    vector = base64.b64encode(np.ones(4, dtype="<f4").tobytes()).decode()
    event = ChangeEvent(type="entry_embedded", entry_id="e_late", at=time.time(), cache_key="k",
                        canonical_prompt="a lighthouse", partition="p", embedding_model="m",
                        embedding=vector)
    await redis.xadd(keys.changes, {"data": event.model_dump_json(exclude_none=True)})
    await _persist(redis, keys, db)
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT entry_id, partition, model, dim FROM semantic_entries"
                            " WHERE entry_id = 'e_late'").fetchall()
    assert rows == [("e_late", "p", "m", 4)]
