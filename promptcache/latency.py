"""The latency histogram every part shares: workers count results into these buckets (Redis),
the persister rolls them up per hour (PostgreSQL), `/metrics` and `promptcache stats` read them."""

from __future__ import annotations

import bisect

# upper bounds in ms; one more bucket (+Inf) follows. Generation can take minutes.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 15, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 30000, 60000, 120000, 300000)


def bucket_of(latency_ms: float) -> int:
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)
