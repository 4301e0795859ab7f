"""What the service is doing, read for `promptcache stats` and the dashboard.

Streams, groups and workers from the streams Redis; entries and bytes from the cache store;
hourly rollups from PostgreSQL (consumers/storage/stats.py); the latest results from the
results stream; the health of each part.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import redis.asyncio as aioredis
from psycopg.rows import dict_row
from pydantic import ValidationError
from redis.exceptions import RedisError

from promptcache.keys import GENERATE_GROUP, JANITOR_GROUP, PERSISTER_GROUP, REQUESTS_GROUP, Keys
from promptcache.storage import stats
from promptcache.stream_ids import id_order
from schemas.events import Result


def _name(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


async def stream_stats(redis: aioredis.Redis, keys: Keys,
                       cache: aioredis.Redis | None = None) -> dict[str, Any]:
    """Stream lengths, group lag and pending, worker health reports, images the quality gate
    rejected by reason; entries and bytes from the cache store (`cache`, default: the same
    server)."""
    out: dict[str, Any] = {"streams": {}, "workers": []}
    for stream, groups in ((name, groups) for shard in keys.all_shards() for name, groups in (
            (shard.requests, [REQUESTS_GROUP]), (shard.generate, [GENERATE_GROUP]),
            (shard.results, []), (shard.dead_letter, []),
            (shard.changes, [PERSISTER_GROUP, JANITOR_GROUP]))):
        info: dict[str, Any] = {"length": await redis.xlen(stream), "groups": {}}
        if groups and info["length"] is not None:
            try:
                for group in await redis.xinfo_groups(stream):
                    info["groups"][_name(group["name"])] = {
                        "pending": group["pending"], "lag": group.get("lag"),
                        "consumers": group["consumers"]}
            except aioredis.ResponseError:
                pass
        out["streams"][stream] = info
    reports = []
    async for key in redis.scan_iter(match=keys.health("*"), count=500):
        raw = await redis.get(key)
        if raw:
            reports.append(json.loads(raw))
    out["workers"] = merge_shard_reports(reports)
    cache = cache or redis
    stored = await cache.get(keys.stored_bytes)
    out["stored_bytes"] = int(stored) if stored else 0
    out["entries"] = int(await cache.zcard(keys.lru))
    out["semantic"] = await semantic_stats(cache, keys)
    out["images_rejected"] = {_name(k): int(v)
                              for k, v in (await redis.hgetall(keys.metrics_quality)).items()}
    return out


def merge_shard_reports(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One health report per worker process: a sharded process reports once per shard
    (`consumer/shard`); its counts are added up, its latest time kept."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        name = str(report.get("consumer", "?")).split("/")[0]
        into = merged.setdefault(name, {"consumer": name})
        for item, value in report.items():
            if item == "consumer":
                continue
            if item == "at":
                into["at"] = max(into.get("at", 0.0), value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                into[item] = into.get(item, 0) + value
            else:
                into.setdefault(item, value)
    return list(merged.values())


async def semantic_stats(cache: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """Each worker's in-memory index (entries, bytes) and the tier's decision counters."""
    indexes = []
    async for key in cache.scan_iter(match=keys.semantic_index_stats("*"), count=500):
        if raw := await cache.get(key):
            indexes.append({"consumer": _name(key).rsplit(":", 1)[-1], **json.loads(raw)})
    counters = {_name(k): int(v) for k, v in (await cache.hgetall(keys.metrics_semantic)).items()}
    return {"vectors": int(await cache.hlen(keys.semantic_vectors)),
            "indexes": sorted(indexes, key=lambda i: i["consumer"]), "decisions": counters}


def database_stats(database_url: str, since: timedelta = timedelta(hours=24),
                   scope: str | None = None) -> dict[str, Any]:
    """Entries now, and the hourly rollups of the last `since`; with `scope`, that scope's only
    ("" the shared scope; evictions are not counted per scope)."""
    with psycopg.connect(database_url, row_factory=dict_row, connect_timeout=5) as conn:
        entries = conn.execute(
            "SELECT count(*) AS entries, coalesce(sum(image_bytes + thumbnail_bytes), 0)::bigint"
            " AS bytes FROM cache_entries"
            + ("" if scope is None else " WHERE scope IS NULL" if scope == ""
               else " WHERE scope = %s"),
            (scope,) if scope else ()).fetchone() or {}
        rows = conn.execute("SELECT * FROM stats_hourly WHERE hour >= now() - %s"
                            + (" AND scope = %s" if scope is not None else ""),
                            (since, scope) if scope is not None else (since,)).fetchall()
        evictions = conn.execute(
            "SELECT reason, sum(evictions)::bigint AS evictions, sum(bytes_freed)::bigint"
            " AS bytes_freed FROM evictions_hourly WHERE hour >= now() - %s GROUP BY reason",
            (since,)).fetchall()
    return {**entries, **stats.summarise(rows, evictions, since)}


def scopes(database_url: str, since: timedelta = timedelta(hours=24)) -> list[str]:
    """The scopes with results in the last `since` ('' is the shared scope), busiest first."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT scope FROM stats_hourly WHERE hour >= now() - %s"
                            " GROUP BY scope ORDER BY sum(requests) DESC LIMIT 200",
                            (since,)).fetchall()
    return [row[0] for row in rows]


async def recent_results(redis: aioredis.Redis, keys: Keys, cache: aioredis.Redis | None = None,
                         count: int = 48) -> list[dict[str, Any]]:
    """The latest results on the results stream (newest first), leaving out those whose image
    was flagged. Results published to a request's own `reply_to` stream are not seen here."""
    rows: list[dict[str, Any]] = []
    newest: list[tuple[bytes, dict[bytes, bytes]]] = []
    for shard in keys.all_shards():  # every shard's newest, merged by entry time
        newest += await redis.xrevrange(shard.results, count=count)
    newest.sort(key=lambda entry: id_order(entry[0].decode()), reverse=True)
    for mid, fields in newest[:count]:
        try:
            result = Result.model_validate_json(fields[b"data"])
        except (ValidationError, KeyError):
            continue
        sha = _sha_of(result.image_url)
        rows.append({
            "id": mid.decode(), "at": int(mid.decode().split("-", 1)[0]) / 1000,
            "request_id": result.request_id, "status": result.status, "cache": result.cache,
            "similarity": result.similarity, "latency_ms": result.latency_ms,
            "entry_id": result.entry_id, "prompt": result.prompt_used,
            "matched_prompt": result.matched_prompt, "image_url": result.image_url,
            "blob_sha256": sha,
            "thumbnail": f"/thumbnails/{sha}.webp" if sha else None,
            "image": f"/images/{sha}.{result.image_url.split('?', 1)[0].rsplit('.', 1)[-1]}"
                     if sha and result.image_url else None,
            "error": result.error.code if result.error else None})
    shas = [r["blob_sha256"] for r in rows if r["blob_sha256"]]
    if shas:
        flagged = await (cache or redis).smismember(keys.flagged_blobs, shas)
        bad = {sha for sha, hit in zip(shas, flagged, strict=True) if hit}
        rows = [r for r in rows if r["blob_sha256"] not in bad]
    return rows


def _sha_of(url: str | None) -> str | None:
    """The blob's sha256 from an image URL (`…/images/<sha256>.png`)."""
    if not url:
        return None
    name = url.rsplit("/", 1)[-1].split(".", 1)[0]
    return name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None


def generator_health(recent: list[dict[str, Any]], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The generator, as the latest results show it: the newest result that called it (a miss
    or bypass, or a generator_* failure) says whether it is answering."""
    for row in recent:
        if row["status"] == "failed" and (row["error"] or "").startswith(("generator_",
                                                                         "delivery_")):
            return {"status": "failing", "detail": f"last generation failed: {row['error']}",
                    "at": row["at"]}
        if row["status"] == "ok" and row["cache"] in ("miss", "bypass"):
            return {"status": "ok", "detail": "last generation succeeded", "at": row["at"]}
    if not workers:
        return {"status": "unknown", "detail": "no worker is reporting", "at": None}
    return {"status": "unknown", "detail": "no generation among the latest results", "at": None}


async def ping(redis: aioredis.Redis | None) -> dict[str, Any]:
    if redis is None:
        return {"status": "not configured"}
    started = time.perf_counter()
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        return {"status": "down", "detail": str(exc)}
    return {"status": "ok", "ms": round((time.perf_counter() - started) * 1000, 1)}


@dataclass
class RateMeter:
    """Requests per second per tier, from the monotonic result counters sampled at each read
    (over the last `window` seconds of samples)."""

    window: float = 60.0
    samples: deque[tuple[float, dict[str, float]]] = field(default_factory=lambda: deque(maxlen=720))

    def sample(self, totals: dict[str, float], now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        self.samples.append((now, totals))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        first_at, first = self.samples[0]
        span = now - first_at
        if span < 0.5:
            return {"per_second": None, "by_tier": {}, "over_seconds": round(span, 1)}
        by_tier = {k: round(max(v - first.get(k, 0.0), 0.0) / span, 2) for k, v in totals.items()}
        return {"per_second": round(sum(by_tier.values()), 2), "by_tier": by_tier,
                "over_seconds": round(span, 1)}


async def result_totals(redis: aioredis.Redis, keys: Keys) -> dict[str, float]:
    """Results published so far, by tier (or status when not ok), across every worker."""
    totals: dict[str, float] = {}
    for shard in keys.all_shards():
        for raw, value in (await redis.hgetall(shard.metrics_results)).items():
            tier, _, status = raw.decode().partition("|")
            label = tier if status == "ok" else status
            totals[label] = totals.get(label, 0.0) + float(value)
    return totals


def render_stats(streams: dict[str, Any], db: dict[str, Any] | None) -> str:
    lines = ["streams"]
    for name, info in streams["streams"].items():
        groups = ", ".join(f"{g}: pending {v['pending']}, lag {v['lag']}"
                           for g, v in info["groups"].items())
        lines.append(f"  {name:<32} length {info['length']:<8} {groups}")
    lines.append("workers (last health report)")
    for w in sorted(streams["workers"], key=lambda w: w["consumer"]):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(w.items())
                           if k not in ("consumer", "at"))
        lines.append(f"  {w['consumer']:<32} {counts}  ({time.time() - w['at']:.0f}s ago)")
    if not streams["workers"]:
        lines.append("  none reporting")
    lines.append(f"cache: {streams['entries']:,} entries, {streams['stored_bytes']:,} bytes stored")
    rejected = streams.get("images_rejected") or {}
    lines.append("quality gate rejected: " + (", ".join(
        f"{reason} {n:,}" for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
        if rejected else "none"))
    if semantic := streams.get("semantic"):
        lines.append(f"semantic tier: {semantic['vectors']:,} vectors shared")
        for index in semantic["indexes"]:
            lines.append(f"  {index['consumer']:<32} {index.get('entries', 0):,} in memory,"
                         f" {index.get('memory_bytes', 0) / 1e6:.1f} MB ({index.get('model')})")
            if others := index.get("other_models"):
                lines.append(f"  {'':<32} {others:,} embedded by another model: exact-only "
                             "until `promptcache reindex`")
        refused = {k.split(":", 1)[1]: v for k, v in semantic["decisions"].items()
                   if k.startswith("refused:")}
        skipped = {k.split(":", 1)[1]: v for k, v in semantic["decisions"].items()
                   if k.startswith("skipped:")}
        if refused:
            lines.append("  verifier refused: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(refused.items(), key=lambda kv: -kv[1])))
        if skipped:
            lines.append("  exact-only lookups: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])))
    if db is not None:
        hit_rate = f"{db['hit_rate']:.1%}" if db["hit_rate"] is not None else "-"
        lines += [
            f"last {db['since_hours']:g} hours (PostgreSQL rollups)",
            f"  requests {db['requests']:,}   hit rate {hit_rate}   generator calls"
            f" {db['generator_calls']:,} made, {db['generator_calls_avoided']:,} avoided"
            f" ({db['generator_seconds_avoided']:,} s saved)   bytes stored {db['bytes_stored']:,}",
            f"  {'tier':<12}{'requests':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"]
        for tier, row in db["by_tier"].items():
            lines.append(f"  {tier:<12}{row['requests']:>10,}{_ms(row['p50_ms'])}"
                         f"{_ms(row['p95_ms'])}{_ms(row['p99_ms'])}")
        for reason, row in db["evictions"].items():
            lines.append(f"  evicted ({reason}): {row['evictions']:,} entries,"
                         f" {row['bytes_freed']:,} bytes")
        lines.append(f"  entries in PostgreSQL {db['entries']:,} ({db['bytes']:,} bytes)")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{value:>10.1f}" if value is not None else f"{'-':>10}"
