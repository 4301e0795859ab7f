"""Every Redis name, built in one place."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

REQUESTS_GROUP = "workers"
GENERATE_GROUP = "generators"
PERSISTER_GROUP = "persister"
JANITOR_GROUP = "janitor"
SEMANTIC_LOG_MAXLEN = 10_000  # a worker further behind than this reloads its index


def shard_of(request_id: str, shards: int) -> int:
    """The shard a request goes to: crc32 of its id (UTF-8) mod N (shared/CONTRACT.md), so a
    resubmitted id always lands where its done marker is."""
    return zlib.crc32(request_id.encode("utf-8")) % shards if shards > 1 else 0


@dataclass(frozen=True, slots=True)
class Keys:
    """Names under `prefix`. One server, one shard (the default): today's names,
    `promptcache:requests`, `promptcache:cache:exact:...`.

    Sharded (`shards` > 1, or any Redis/Valkey Cluster): the request path of shard s, meaning
    its streams, done markers, outbox and the counters its publish script increments, lives
    under the hash tag `{prefix:s}`, one slot per shard, so each atomic publish stays in one
    slot and the shards spread over the cluster's primaries. On a cluster, everything else
    (cache entries, registry, semantic tier, locks, health) is under `{prefix}`: one slot, so the
    registry's scripts stay atomic (benchmarks/cluster.py measures what that slot carries).
    A `Keys` names one shard's request path (`shard`, 0 by default): `for_shard(s)` and
    `all_shards()` give the others."""

    prefix: str = "promptcache"
    shards: int = 1
    cluster: bool = False  # the streams server is a cluster
    shard: int = 0
    cache_cluster: bool | None = None  # the cache store is a cluster (None: as `cluster`)

    @property
    def sharded(self) -> bool:
        return self.cluster or self.shards > 1

    @property
    def base(self) -> str:
        """What the names outside the request path start with: the cache store's one hash
        tag when it is a cluster (its scripts touch several keys); those kept on the streams
        server (health, janitor lock, quality counters) are single-key."""
        return f"{{{self.prefix}}}" if self.cache_is_cluster else self.prefix

    @property
    def cache_is_cluster(self) -> bool:
        return self.cluster if self.cache_cluster is None else self.cache_cluster

    @property
    def path(self) -> str:
        """What this shard's request-path names start with."""
        return f"{{{self.prefix}:{self.shard}}}" if self.sharded else self.prefix

    def for_shard(self, shard: int) -> Keys:
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} out of range 0..{self.shards - 1}")
        return self if shard == self.shard else replace(self, shard=shard)

    def all_shards(self) -> list[Keys]:
        return [self.for_shard(s) for s in range(self.shards)]

    def for_request(self, request_id: str) -> Keys:
        """The shard a producer sends `request_id` to."""
        return self.for_shard(shard_of(request_id, self.shards))

    # the request path of this shard ------------------------------------------------------
    @property
    def requests(self) -> str:
        return f"{self.path}:requests"

    @property
    def results(self) -> str:
        return f"{self.path}:results"

    @property
    def generate(self) -> str:
        """Internal: misses handed from the fast path to the generation stage."""
        return f"{self.path}:generate"

    @property
    def dead_letter(self) -> str:
        return f"{self.path}:dead-letter"

    @property
    def changes(self) -> str:
        """Change events for PostgreSQL and the janitor: one stream per shard (the publish
        script writes its batch's events beside its results); events from outside a publish
        (evictions) go to shard 0's."""
        return f"{self.path}:changes"

    @property
    def outbox(self) -> str:
        """Results staged (with their requests marked done and acked) before they are
        published: durable mode (until the server's append-only file has them), and, on a
        cluster, results for a reply_to stream in another slot."""
        return f"{self.path}:outbox"

    @property
    def changes_dead_letter(self) -> str:
        """Change events PostgreSQL refused (or that cannot be read): set aside by the
        persister so the rest are written; `promptcache dead-letter` lists and replays them."""
        return f"{self.path}:changes:dead-letter"

    def done(self, request_id: str) -> str:
        return f"{self.path}:done:{request_id}"

    # metrics: monotonic counters and histogram buckets, incremented with each result (per
    # shard: the publish script writes them; readers add up `all_shards()`)
    @property
    def metrics_results(self) -> str:
        return f"{self.path}:metrics:results"

    @property
    def metrics_scopes(self) -> str:
        """Results counted per scope: field "scope|tier|status" (requests with a scope only)."""
        return f"{self.path}:metrics:results-by-scope"

    def metrics_latency(self, tier: str) -> str:
        return f"{self.path}:metrics:latency:{tier}"

    # outside the request path ------------------------------------------------------------
    def exact(self, cache_key: str) -> str:
        return f"{self.base}:cache:exact:{cache_key}"

    def health(self, consumer: str) -> str:
        return f"{self.base}:health:{consumer}"

    @property
    def shard_count(self) -> str:
        """The deployment's N, set by the first worker or janitor (SET NX): every process must
        split the request path the same way (`promptcache.client.check_shards`)."""
        return f"{self.base}:config:shards"

    @property
    def janitor_lock(self) -> str:
        return f"{self.base}:janitor:lock"

    @property
    def metrics_quality(self) -> str:
        """hash reason -> generated images the quality gate rejected (promptcache/quality.py)."""
        return f"{self.base}:metrics:quality"

    # the entry registry (cache Redis): durable indexes, so no TTL
    @property
    def entries(self) -> str:
        return f"{self.base}:cache:entries"

    @property
    def lru(self) -> str:
        return f"{self.base}:cache:lru"

    @property
    def blob_refs(self) -> str:
        return f"{self.base}:cache:blob-refs"

    @property
    def stored_bytes(self) -> str:
        return f"{self.base}:cache:stored-bytes"

    @property
    def blob_deleting(self) -> str:
        """hash sha256 -> {until, by, bytes}: blob files being deleted (registry.py)."""
        return f"{self.base}:cache:blob-deleting"

    @property
    def scope_bytes(self) -> str:
        """hash scope -> bytes its entries use (PROMPTCACHE_SCOPE_STORAGE_LIMIT)."""
        return f"{self.base}:cache:scope-bytes"

    def flight(self, cache_key: str) -> str:
        """The identical single-flight lock of a cache key."""
        return f"{self.base}:cache:flight:{cache_key}"

    @property
    def metrics_scopes_named(self) -> str:
        """set of the scopes /metrics names (the rest are "other"): sticky."""
        return f"{self.base}:metrics:results-by-scope:named"

    @property
    def flagged_blobs(self) -> str:
        """Set of image sha256s an operator flagged as bad: never served again (no TTL)."""
        return f"{self.base}:cache:flagged-blobs"

    # the semantic tier (cache Redis)
    @property
    def semantic_vectors(self) -> str:
        """hash entry_id -> prompt embedding record; removed with the entry (no TTL)."""
        return f"{self.base}:semantic:vectors"

    @property
    def semantic_log(self) -> str:
        """stream of adds and removals that every worker's in-memory index follows."""
        return f"{self.base}:semantic:log"

    @property
    def semantic_inflight(self) -> str:
        """hash flight lock -> a generation in flight (prompt, partition, vector) or just done
        (cache key): what similar misses wait for."""
        return f"{self.base}:semantic:inflight"

    @property
    def semantic_deferred(self) -> str:
        """hash entry_id -> entry stored while a worker's model was loading (cache key, params
        key, prompt): indexed once a model is ready (SemanticTier.index_deferred). Bounded."""
        return f"{self.base}:semantic:deferred"

    def embedding(self, model: str, dim: int, text_hash: str) -> str:
        return f"{self.base}:semantic:embedding:{model}:{dim}:{text_hash}"

    @property
    def metrics_semantic(self) -> str:
        """hash of counters: refused:<reason>, skipped:<reason>, hits, candidates."""
        return f"{self.base}:metrics:semantic"

    def semantic_index_stats(self, consumer: str) -> str:
        return f"{self.base}:semantic:index:{consumer}"
