"""Every Redis name, built in one place."""

from __future__ import annotations

from dataclasses import dataclass

REQUESTS_GROUP = "workers"
GENERATE_GROUP = "generators"
PERSISTER_GROUP = "persister"
JANITOR_GROUP = "janitor"
SEMANTIC_LOG_MAXLEN = 10_000  # a worker further behind than this reloads its index


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "promptcache"

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def results(self) -> str:
        return f"{self.prefix}:results"

    @property
    def generate(self) -> str:
        """Internal: misses handed from the fast path to the generation stage."""
        return f"{self.prefix}:generate"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead-letter"

    @property
    def changes(self) -> str:
        return f"{self.prefix}:changes"

    @property
    def outbox(self) -> str:
        """Durable mode: results staged (with their requests marked done and acked) until the
        server's append-only file has them, then published."""
        return f"{self.prefix}:outbox"

    @property
    def changes_dead_letter(self) -> str:
        """Change events PostgreSQL refused (or that cannot be read): set aside by the
        persister so the rest are written; `promptcache dead-letter` lists and replays them."""
        return f"{self.prefix}:changes:dead-letter"

    def done(self, request_id: str) -> str:
        return f"{self.prefix}:done:{request_id}"

    def exact(self, cache_key: str) -> str:
        return f"{self.prefix}:cache:exact:{cache_key}"

    def health(self, consumer: str) -> str:
        return f"{self.prefix}:health:{consumer}"

    @property
    def janitor_lock(self) -> str:
        return f"{self.prefix}:janitor:lock"

    # metrics: monotonic counters and histogram buckets, incremented with each result
    @property
    def metrics_results(self) -> str:
        return f"{self.prefix}:metrics:results"

    @property
    def metrics_scopes(self) -> str:
        """Results counted per scope: field "scope|tier|status" (requests with a scope only)."""
        return f"{self.prefix}:metrics:results-by-scope"

    def metrics_latency(self, tier: str) -> str:
        return f"{self.prefix}:metrics:latency:{tier}"

    @property
    def metrics_quality(self) -> str:
        """hash reason -> generated images the quality gate rejected (promptcache/quality.py)."""
        return f"{self.prefix}:metrics:quality"

    # the entry registry (cache Redis): durable indexes, so no TTL
    @property
    def entries(self) -> str:
        return f"{self.prefix}:cache:entries"

    @property
    def lru(self) -> str:
        return f"{self.prefix}:cache:lru"

    @property
    def blob_refs(self) -> str:
        return f"{self.prefix}:cache:blob-refs"

    @property
    def stored_bytes(self) -> str:
        return f"{self.prefix}:cache:stored-bytes"

    @property
    def flagged_blobs(self) -> str:
        """Set of image sha256s an operator flagged as bad: never served again (no TTL)."""
        return f"{self.prefix}:cache:flagged-blobs"

    # the semantic tier (cache Redis)
    @property
    def semantic_vectors(self) -> str:
        """hash entry_id -> prompt embedding record; removed with the entry (no TTL)."""
        return f"{self.prefix}:semantic:vectors"

    @property
    def semantic_log(self) -> str:
        """stream of adds and removals that every worker's in-memory index follows."""
        return f"{self.prefix}:semantic:log"

    @property
    def semantic_inflight(self) -> str:
        """hash flight lock -> a generation in flight (prompt, partition, vector) or just done
        (cache key): what similar misses wait for."""
        return f"{self.prefix}:semantic:inflight"

    @property
    def semantic_deferred(self) -> str:
        """hash entry_id -> entry stored while a worker's model was loading (cache key, params
        key, prompt): indexed once a model is ready (SemanticTier.index_deferred). Bounded."""
        return f"{self.prefix}:semantic:deferred"

    def embedding(self, model: str, dim: int, text_hash: str) -> str:
        return f"{self.prefix}:semantic:embedding:{model}:{dim}:{text_hash}"

    @property
    def metrics_semantic(self) -> str:
        """hash of counters: refused:<reason>, skipped:<reason>, hits, candidates."""
        return f"{self.prefix}:metrics:semantic"

    def semantic_index_stats(self, consumer: str) -> str:
        return f"{self.prefix}:semantic:index:{consumer}"
