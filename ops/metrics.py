"""Prometheus metrics for `promptcache web`, read from Redis at scrape time.

Workers increment counters and latency buckets in the same MULTI/EXEC that publishes each
result, so the figures are exact across every worker process and survive restarts; the web
process turns them into the exposition format, with gauges read live (stream lag and pending
per group, bytes and entries in the cache, the storage limit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from promptcache.keys import Keys
from promptcache.latency import LATENCY_BUCKETS_MS
from promptcache.quality import REASONS

TIERS_AND_STATUSES = ("exact", "semantic", "coalesced", "miss", "bypass", "rejected", "failed")


class RedisCollector(Collector):
    """A collector over a *sync* Redis client (prometheus-client collects synchronously;
    the web server runs it in a thread)."""

    def __init__(self, client: redis.Redis, keys: Keys, storage_limit: int,
                 cache: redis.Redis | None = None, top_scopes: int = 10) -> None:
        self.client = client  # the streams Redis: counters, histograms, stream groups
        self.top_scopes = top_scopes
        self.cache = cache or client  # the cache store: bytes and entries
        self.keys = keys
        self.storage_limit = storage_limit

    def collect(self) -> Iterator[Metric]:
        results = CounterMetricFamily("promptcache_results", "Results published, by cache tier "
                                      "and status", labels=["cache", "status"])
        for raw, value in self._summed(lambda k: k.metrics_results).items():
            tier, _, status = raw.partition("|")
            results.add_metric([tier, status], value)
        yield results
        yield self._by_scope()

        latency = HistogramMetricFamily(
            "promptcache_request_latency_seconds", "Request entry to result published, by tier "
            "(generation included for miss)", labels=["cache"])
        for tier in TIERS_AND_STATUSES:
            raw = self._summed(lambda k, tier=tier: k.metrics_latency(tier))
            if not raw:
                continue
            running, buckets = 0.0, []
            for i, bound in enumerate((*LATENCY_BUCKETS_MS, float("inf"))):
                running += raw.get(str(i), 0.0)
                buckets.append(("+Inf" if bound == float("inf") else str(bound / 1000), running))
            latency.add_metric([tier], buckets, sum_value=raw.get("sum", 0.0) / 1000)
        yield latency

        rejected = CounterMetricFamily("promptcache_images_rejected", "Generated images the "
                                       "quality gate rejected (never cached), by reason",
                                       labels=["reason"])
        counts = {k.decode(): float(v)
                  for k, v in self.client.hgetall(self.keys.metrics_quality).items()}
        for reason in sorted(set(REASONS) | set(counts)):
            rejected.add_metric([reason], counts.get(reason, 0.0))
        yield rejected

        stored = GaugeMetricFamily("promptcache_stored_bytes", "Bytes of images and thumbnails")
        stored.add_metric([], float(self.cache.get(self.keys.stored_bytes) or 0))
        yield stored
        limit = GaugeMetricFamily("promptcache_storage_limit_bytes", "The storage cap")
        limit.add_metric([], float(self.storage_limit))
        yield limit
        entries = GaugeMetricFamily("promptcache_entries", "Cache entries")
        entries.add_metric([], float(self.cache.zcard(self.keys.lru)))
        yield entries

        yield from self._semantic()

        lag = GaugeMetricFamily("promptcache_stream_lag", "Entries not yet delivered to the "
                                "group", labels=["stream", "group"])
        pending = GaugeMetricFamily("promptcache_stream_pending", "Entries delivered and not "
                                    "acknowledged", labels=["stream", "group"])
        for stream in (name for k in self.keys.all_shards()
                       for name in (k.requests, k.generate, k.changes)):
            try:
                groups = self.client.xinfo_groups(stream)
            except redis.ResponseError:
                continue
            for group in groups:
                name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
                lag.add_metric([stream, name], float(group.get("lag") or 0))
                pending.add_metric([stream, name], float(group["pending"]))
        yield lag
        yield pending

    def _summed(self, name: Callable[[Keys], str]) -> dict[str, float]:
        """A counters hash added up over every shard (each shard's publish script counts its
        own results)."""
        total: dict[str, float] = {}
        for shard in self.keys.all_shards():
            for field, value in self.client.hgetall(name(shard)).items():
                total[field.decode()] = total.get(field.decode(), 0.0) + float(value)
        return total

    def _by_scope(self) -> Metric:
        """Results of scoped requests, labelled by scope: at most `top_scopes` scopes by name
        (the busiest when a slot was free; sticky), the rest summed as "other", so the label's
        cardinality stays bounded however many tenants there are. (Requests without a scope
        are in promptcache_results only.)"""
        family = CounterMetricFamily(
            "promptcache_scope_results", "Results published for requests with a scope, by "
            f"scope (at most {self.top_scopes} by name; the rest as \"other\"), tier and status",
            labels=["scope", "cache", "status"])
        counts: dict[tuple[str, str, str], float] = {}
        for raw, value in self._summed(lambda k: k.metrics_scopes).items():
            scope, tier, status = (raw.split("|") + ["", ""])[:3]
            counts[(scope, tier, status)] = value
        totals: dict[str, float] = {}
        for (scope, _, _), value in counts.items():
            totals[scope] = totals.get(scope, 0.0) + value
        # which scopes are named is sticky (a Redis set that only grows, to `top_scopes`): a
        # named scope's series, and "other", never go down because the ranking changed; the
        # only decreases of "other" are the at most `top_scopes` promotions
        named_key = self.keys.metrics_scopes_named
        top = {m.decode() for m in self.client.smembers(named_key)}
        room = self.top_scopes - len(top)
        if room > 0:
            busiest = [s for s in sorted(totals, key=lambda s: (-totals[s], s)) if s not in top]
            if busiest[:room]:
                self.client.sadd(named_key, *busiest[:room])
                top |= set(busiest[:room])
        merged: dict[tuple[str, str, str], float] = {}
        for (scope, tier, status), value in counts.items():
            label = (scope if scope in top else "other", tier, status)
            merged[label] = merged.get(label, 0.0) + value
        for labels, value in sorted(merged.items()):
            family.add_metric(list(labels), value)
        return family

    def _semantic(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "promptcache_semantic_decisions", "Semantic-tier candidates refused by the verifier "
            "and lookups kept exact-only, by reason", labels=["outcome", "reason"])
        for raw, value in self.cache.hgetall(self.keys.metrics_semantic).items():
            outcome, _, reason = raw.decode().partition(":")
            decisions.add_metric([outcome, reason], float(value))
        yield decisions
        entries = GaugeMetricFamily("promptcache_semantic_index_entries", "Vectors in a worker's "
                                    "in-memory index", labels=["consumer"])
        memory = GaugeMetricFamily("promptcache_semantic_index_bytes", "Memory of a worker's "
                                   "in-memory index", labels=["consumer"])
        prefix = self.keys.semantic_index_stats("")
        for key in self.cache.scan_iter(match=f"{prefix}*", count=1000):
            raw = self.cache.get(key)
            if raw is None:
                continue
            stats = json.loads(raw)
            consumer = key.decode()[len(prefix):]
            entries.add_metric([consumer], float(stats.get("entries", 0)))
            memory.add_metric([consumer], float(stats.get("memory_bytes", 0)))
        yield entries
        yield memory
