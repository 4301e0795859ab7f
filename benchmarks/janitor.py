"""Janitor and statistics speed: eviction rate, a pass over 1,000,000 synthetic entries, and
`promptcache stats` over a month of hourly rollups.

    .venv/bin/python benchmarks/janitor.py [--entries 1000000] [--quick]

Starts its own Valkey and PostgreSQL (embedded), prints a table and writes
benchmarks/results/janitor-latest.json. Medians of repeated runs; this machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from promptcache import logs  # noqa: E402
from promptcache.cache.registry import EntryRegistry, Registered  # noqa: E402
from ops.embedded_servers import EmbeddedPostgres, EmbeddedValkey  # noqa: E402
from consumers.janitor import Janitor  # noqa: E402
from promptcache.keys import Keys  # noqa: E402
from promptcache.storage.blobs import BlobStore  # noqa: E402
from promptcache.storage.migrate import apply  # noqa: E402
from promptcache.latency import LATENCY_BUCKETS_MS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def say(text: str) -> None:
    print(text, flush=True)


async def fill(redis: aioredis.Redis, keys: Keys, count: int, *, created: float,
               start: int = 0) -> None:
    """Synthetic registry entries (no files), pipelined in chunks."""
    chunk = 10_000
    for base in range(start, start + count, chunk):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(base, min(base + chunk, start + count)):
                entry = Registered(f"e_{i:08d}", f"k{i}", f"{i:064x}", "image/png", 40_000,
                                   created)
                pipe.hset(keys.entries, entry.entry_id, entry.to_json())
                pipe.zadd(keys.lru, {entry.entry_id: created})
                pipe.hset(keys.blob_refs, entry.blob, 1)
            pipe.incrby(keys.stored_bytes, 40_000 * (min(base + chunk, start + count) - base))
            await pipe.execute()
        if (base // chunk) % 10 == 0:
            say(f"  filled {min(base + chunk, start + count) - start:,}/{count:,}")


async def eviction_rate(redis: aioredis.Redis, tmp: Path, count: int) -> dict[str, float]:
    keys = Keys("bench-evict")
    blobs = BlobStore(tmp / "images", tmp / "thumbs")
    registry = EntryRegistry(redis, keys, blobs, limit_bytes=10**12)
    now = time.time()
    for i in range(count):  # real files, so eviction really deletes them
        blob = blobs.put(f"image {i}".encode(), "image/png", f"thumb {i}".encode())
        await registry.register(Registered(f"e{i}", f"k{i}", blob.sha256, "image/png",
                                           blob.image_bytes + blob.thumbnail_bytes, now + i))
    registry.limit_bytes = 0
    started = time.perf_counter()
    evicted = await registry.evict_lru(reason="storage_limit")
    seconds = time.perf_counter() - started
    assert len(evicted) == count and not any((tmp / "images").rglob("*.png"))
    return {"entries": count, "seconds": round(seconds, 3), "per_second": round(count / seconds)}


async def janitor_pass(redis: aioredis.Redis, total: int) -> dict[str, object]:
    keys = Keys("bench-pass")
    old, fresh = time.time() - 40 * 86400, time.time()
    say(f"filling {total:,} synthetic entries ...")
    await fill(redis, keys, total - 1000, created=fresh)
    await fill(redis, keys, 1000, created=old, start=total)
    registry = EntryRegistry(redis, keys, BlobStore(Path("/nonexistent/i"), Path("/nonexistent/t")),
                             limit_bytes=10**15)
    janitor = Janitor(redis=redis, keys=keys, consumer="bench", registry=registry,
                      ttl=timedelta(days=30))
    timings = {}
    started = time.perf_counter()
    await janitor.enforce()  # 1,000 expired among `total`
    timings["pass_evicting_1000_s"] = round(time.perf_counter() - started, 3)
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        await janitor.enforce()  # nothing to do now
        runs.append(time.perf_counter() - started)
    timings["pass_evicting_0_median_ms"] = round(statistics.median(runs) * 1000, 2)
    timings["entries"] = await registry.count()
    timings["evicted"] = janitor.evicted
    timings["redis_used_memory_mb"] = round(
        (await redis.info("memory"))["used_memory"] / 1e6, 1)
    return timings


def stats_speed(database_url: str) -> dict[str, float]:
    from ops.status import database_stats

    hours = 30 * 24
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rows = []
    for h in range(hours):
        for tier, status in (("exact", "ok"), ("semantic", "ok"), ("miss", "ok"),
                             ("coalesced", "ok"), ("bypass", "ok"), ("", "rejected"),
                             ("", "failed")):
            buckets = [h % 7 + i for i in range(len(LATENCY_BUCKETS_MS) + 1)]
            rows.append((now - timedelta(hours=h), tier, status, sum(buckets), 1000.0, buckets,
                         10, 20.0, 30.0, 4000))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO stats_hourly (hour, tier, status, requests, latency_ms_sum,"
            " latency_buckets, generator_calls, generator_seconds, generator_seconds_avoided,"
            " bytes_stored) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", rows)
    runs = []
    for _ in range(20):
        started = time.perf_counter()
        figures = database_stats(database_url, timedelta(days=31))
        runs.append(time.perf_counter() - started)
    assert figures["requests"] > 0
    return {"rollup_rows": len(rows), "median_ms": round(statistics.median(runs) * 1000, 1),
            "max_ms": round(max(runs) * 1000, 1)}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 entries")
    args = parser.parse_args()
    total = 100_000 if args.quick else args.entries
    logs.configure("WARNING", "console")
    with tempfile.TemporaryDirectory(prefix="pc-bench-janitor-") as tmp_dir:
        tmp = Path(tmp_dir)
        valkey = EmbeddedValkey(tmp / "valkey").start()
        postgres = EmbeddedPostgres(tmp / "pg").start()
        redis = aioredis.Redis.from_url(valkey.url, socket_timeout=60)
        try:
            apply(postgres.url, ROOT / "migrations")
            say("eviction rate (registry + exact key + files) ...")
            evict = await eviction_rate(redis, tmp, 5000)
            say(f"  {evict}")
            passed = await janitor_pass(redis, total)
            say(f"  {passed}")
            say("stats over a month of rollups ...")
            stats = stats_speed(postgres.url)
            say(f"  {stats}")
        finally:
            await redis.aclose()
            valkey.stop()
            postgres.stop()
    report = {"benchmark": "janitor", "at": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
              "eviction": evict, "janitor_pass": passed, "stats": stats}
    say("")
    say(f"{'eviction':<34}{evict['per_second']:>10,} entries/s   (target >= 1,000)")
    say(f"{'janitor pass, 1,000 of ' + format(total, ',') + ' expired':<34}"
        f"{passed['pass_evicting_1000_s']:>10} s")
    say(f"{'janitor pass, nothing expired':<34}{passed['pass_evicting_0_median_ms']:>10} ms")
    say(f"{'stats over 30 days of rollups':<34}{stats['median_ms']:>10} ms median"
        f" ({stats['max_ms']} max; target < 200)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "janitor-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    say("wrote benchmarks/results/janitor-latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
