"""Hourly statistics: rolled up from change events by the persister, read by `promptcache stats`.

Latency percentiles come from fixed histogram buckets summed over the hours asked for, so a month
of rollups (720 hours x a handful of tier/status rows) is read and merged in milliseconds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from promptcache.latency import LATENCY_BUCKETS_MS, bucket_of
from schemas.events import ChangeEvent

HIT_TIERS = ("exact", "semantic", "coalesced")


def hour_of(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC).replace(minute=0, second=0, microsecond=0)


@dataclass
class ResultRow:
    requests: int = 0
    latency_ms_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    generator_calls: int = 0
    generator_seconds: float = 0.0
    generator_seconds_avoided: float = 0.0
    bytes_stored: int = 0


@dataclass(frozen=True, slots=True)
class Hit:
    """One request an entry answered from the cache: a row of `cache_hits`."""

    entry_id: str
    request_id: str
    tier: str
    latency_ms: float | None
    at: datetime


@dataclass
class Rollup:
    """What one batch of change events adds: result rows by (hour, scope, tier, status; scope ''
    is the shared one), evictions by
    (hour, reason), and the hits of entries (one per answered request served from the cache)."""

    results: dict[tuple[datetime, str, str, str], ResultRow] = field(
        default_factory=lambda: defaultdict(ResultRow))
    evictions: dict[tuple[datetime, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0]))
    hits: list[Hit] = field(default_factory=list)

    def answered(self, at: float, tier: str | None, status: str,
                 latency_ms: float | None, scope: str | None = None) -> ResultRow:
        row = self.results[(hour_of(at), scope or "", tier or "", status)]
        latency = _finite(latency_ms)
        row.requests += 1
        row.latency_ms_sum += latency
        row.buckets[bucket_of(latency)] += 1
        return row


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) and value >= 0 else 0.0


def rollup(events: Sequence[ChangeEvent]) -> Rollup:
    """Aggregate one batch. Each figure comes from the one event that records it, so a figure
    does not depend on which batch (or persister) an event lands in:
    - a result row per answer of `requests_answered` (and per old `request_answered`), with the
      generation seconds a hit saved;
    - generator calls, seconds and bytes from `entry_stored` (one per generation), counted in
      the row of its hour, its tier (`miss` or `bypass`) and `ok`;
    - a hit of an entry per hit answer (and per old `entry_hit`, whose saved seconds go to the
      row of its hour and tier)."""
    out = Rollup()
    for e in events:
        if e.type == "requests_answered":
            for a in e.answers or ():
                row = out.answered(e.at, a.tier, a.status, a.latency_ms, a.scope)
                if a.status == "ok" and a.tier in HIT_TIERS and a.entry_id:
                    row.generator_seconds_avoided += _finite(a.generation_ms) / 1000
                    out.hits.append(Hit(a.entry_id, a.request_id, a.tier or "", a.latency_ms,
                                        _ts(e.at)))
        elif e.type == "request_answered":  # before requests_answered (one event per request)
            out.answered(e.at, e.tier, e.status or "", e.latency_ms)
        elif e.type == "entry_hit" and e.request_id:  # likewise
            row = out.results[(hour_of(e.at), "", e.tier or "", "ok")]
            row.generator_seconds_avoided += _finite(e.generation_ms) / 1000
            out.hits.append(Hit(e.entry_id, e.request_id, e.tier or "", e.latency_ms,
                                _ts(e.at)))
        elif e.type == "entry_stored" and e.request_id:
            row = out.results[(hour_of(e.at), e.scope or "", e.tier or "miss", "ok")]
            row.generator_calls += 1
            row.generator_seconds += _finite(e.generation_ms) / 1000
            row.bytes_stored += (e.image_bytes or 0) + (e.thumbnail_bytes or 0)
        elif e.type == "entry_evicted":
            counts = out.evictions[(hour_of(e.at), e.reason or "unknown")]
            counts[0] += 1
            counts[1] += (e.image_bytes or 0)
    return out


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


UPSERT_RESULTS = """
INSERT INTO stats_hourly AS s (hour, scope, tier, status, requests, latency_ms_sum,
    latency_buckets, generator_calls, generator_seconds, generator_seconds_avoided, bytes_stored)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (hour, scope, tier, status) DO UPDATE SET
    requests = s.requests + EXCLUDED.requests,
    latency_ms_sum = s.latency_ms_sum + EXCLUDED.latency_ms_sum,
    latency_buckets = (SELECT array_agg(a + b ORDER BY i) FROM unnest(s.latency_buckets,
                       EXCLUDED.latency_buckets) WITH ORDINALITY AS t(a, b, i)),
    generator_calls = s.generator_calls + EXCLUDED.generator_calls,
    generator_seconds = s.generator_seconds + EXCLUDED.generator_seconds,
    generator_seconds_avoided = s.generator_seconds_avoided + EXCLUDED.generator_seconds_avoided,
    bytes_stored = s.bytes_stored + EXCLUDED.bytes_stored
"""
UPSERT_EVICTIONS = """
INSERT INTO evictions_hourly AS e (hour, reason, evictions, bytes_freed) VALUES (%s, %s, %s, %s)
ON CONFLICT (hour, reason) DO UPDATE SET evictions = e.evictions + EXCLUDED.evictions,
    bytes_freed = e.bytes_freed + EXCLUDED.bytes_freed
"""


# Rows in key order: persisters updating the same hourly rows lock them in the same order, so
# they wait for each other instead of deadlocking.

def result_params(rows: dict[tuple[datetime, str, str, str], ResultRow]
                  ) -> list[tuple[Any, ...]]:
    return [(hour, scope, tier, status, r.requests, r.latency_ms_sum, r.buckets,
             r.generator_calls, r.generator_seconds, r.generator_seconds_avoided, r.bytes_stored)
            for (hour, scope, tier, status), r in sorted(rows.items())]


def eviction_params(rows: dict[tuple[datetime, str], list[int]]) -> list[tuple[Any, ...]]:
    return [(hour, reason, n, freed) for (hour, reason), (n, freed) in sorted(rows.items())]


def percentile(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile from histogram counts, interpolated inside its bucket."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = LATENCY_BUCKETS_MS[i - 1] if i > 0 else 0.0
            high = LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else low * 2
            return round(low + (high - low) * (rank - seen) / count, 1)
        seen += count
    return None


def summarise(rows: Sequence[dict[str, Any]], evictions: Sequence[dict[str, Any]],
              since: timedelta) -> dict[str, Any]:
    """Merge hourly rows into the figures `promptcache stats` shows."""
    by_tier: dict[str, dict[str, Any]] = {}
    hourly: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    totals = defaultdict(float)
    for r in rows:
        label = r["tier"] if r["status"] == "ok" else r["status"]
        entry = by_tier.setdefault(label, {"requests": 0, "buckets": [0] * len(r["latency_buckets"])})
        entry["requests"] += r["requests"]
        entry["buckets"] = [a + b for a, b in zip(entry["buckets"], r["latency_buckets"], strict=True)]
        hourly[r["hour"].isoformat()][label] += r["requests"]
        for column in ("requests", "generator_calls", "generator_seconds",
                       "generator_seconds_avoided", "bytes_stored"):
            totals[column] += r[column]
    hits = sum(v["requests"] for k, v in by_tier.items() if k in HIT_TIERS)
    ok = sum(v["requests"] for k, v in by_tier.items()
             if k in (*HIT_TIERS, "miss", "bypass"))
    return {
        "since_hours": since.total_seconds() / 3600,
        "requests": int(totals["requests"]),
        "hit_rate": round(hits / ok, 4) if ok else None,
        "generator_calls": int(totals["generator_calls"]),
        "generator_calls_avoided": hits,
        "generator_seconds": round(totals["generator_seconds"], 1),
        "generator_seconds_avoided": round(totals["generator_seconds_avoided"], 1),
        "bytes_stored": int(totals["bytes_stored"]),
        "by_tier": {k: {"requests": v["requests"], "p50_ms": percentile(v["buckets"], 0.5),
                        "p95_ms": percentile(v["buckets"], 0.95),
                        "p99_ms": percentile(v["buckets"], 0.99)}
                    for k, v in sorted(by_tier.items())},
        "evictions": {e["reason"]: {"evictions": e["evictions"], "bytes_freed": e["bytes_freed"]}
                      for e in evictions},
        "hourly": {h: dict(v) for h, v in sorted(hourly.items())},
    }
