"""Building the parts from Settings, and running one process until a signal stops it."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from promptcache.cache.bypass import BypassImages
from promptcache.cache.exact import ExactCache
from promptcache.flight.identical import Flight
from promptcache.cache.registry import EntryRegistry, Forget
from promptcache.client import check_shards
from promptcache.config import Settings
from promptcache.errors import ConfigError
from promptcache.generators import Generator, build_generator
from consumers.group import Stopper
from consumers.janitor import Janitor
from promptcache.optimizer import PolicySettings
from promptcache.keys import Keys
from consumers.persister import Persister
from promptcache.pipeline import Pipeline
from promptcache.quality import GatePolicy, QualityGate, RejectionCounter
from promptcache.semantic.embeddings import CachedEmbedder, build_embedder
from promptcache.semantic.index import VectorIndex
from promptcache.flight.similar import SimilarFlights
from promptcache.semantic import store as semantic_store
from promptcache.semantic.store import IndexFollower, SemanticStore
from promptcache.semantic.tier import SemanticTier
from promptcache.storage.blobs import BlobStore
from promptcache.storage.store import Blobs
from promptcache.storage.db import MetadataStore
from consumers.worker import Worker, consumer_name
from schemas.events import ChangeEvent

log = structlog.get_logger(__name__)


def require_redis_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is not set (or run `promptcache up`, which starts an "
                          "embedded server when it is unset)")
    return settings.redis_url


def streams_client(url: str, max_connections: int = 64, *,
                   cluster: bool = False) -> aioredis.Redis:
    """The streams Redis. A blocking pool: under a burst, requests wait for a connection
    instead of failing with "Too many connections". BLOCK (<= 2 s) stays well under the 5 s
    socket timeout. On a cluster (`cluster`: `Settings.keys()` tells), a cluster client found
    from this one node: it follows MOVED/ASK and, after a failover, finds the new primary; it
    has a connection limit per node (no blocking pool: a burst beyond it is an error, retried
    like an outage)."""
    if cluster:
        # a killed primary's slots are unserved for about the node timeout (2-4 s measured
        # with a 2 s timeout): retried with backoff for up to about 15 s before it is an error
        return cluster_client(url, max_connections=max(max_connections, 64) * 4,
                              socket_timeout=5, socket_connect_timeout=3,
                              retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 20))
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=30, socket_timeout=5,
        socket_connect_timeout=3, health_check_interval=15)
    return aioredis.Redis(connection_pool=pool)


def streams_client_for(settings: Settings) -> aioredis.Redis:
    """The streams client of a command-line call (REDIS_URL required)."""
    return streams_client(require_redis_url(settings), cluster=settings.keys().cluster)


def sync_client(url: str, *, cluster: bool, **options: Any) -> Any:
    """A synchronous client (the Prometheus collector runs in a thread): a RedisCluster on a
    cluster, else a plain Redis."""
    import redis as syncredis
    from redis.cluster import RedisCluster as SyncRedisCluster

    if cluster:
        return SyncRedisCluster.from_url(url, **options)
    return syncredis.Redis.from_url(url, **options)


def cluster_client(url: str, **options: Any) -> aioredis.Redis:
    """redis-py's asyncio RedisCluster (typed as a Redis: the commands used here are common to
    both). The slot map is refreshed on MOVED and on connection errors, which is how a client
    finds a replica promoted in a failover."""
    from redis.asyncio.cluster import RedisCluster

    client: Any = RedisCluster.from_url(url, **options)
    return client  # type: ignore[no-any-return]


def cache_client(url: str, settings: Settings, *, cluster: bool = False) -> aioredis.Redis:
    """The cache store fails fast: a slow or absent server means bypass, not a stalled worker."""
    timeout = max(settings.cache_timeout.total_seconds(), 0.005)
    if cluster:
        return cluster_client(url, max_connections=256, socket_timeout=max(timeout, 0.25),
                              socket_connect_timeout=max(timeout, 0.25),
                              retry=Retry(NoBackoff(), 1))
    # a blocking pool: a burst waits (at most the timeout) for a connection instead of failing
    # with "Too many connections" and bypassing the cache
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=max(timeout, 1.0), socket_timeout=timeout,
        socket_connect_timeout=timeout, retry_on_timeout=False)
    return aioredis.Redis(connection_pool=pool)


def blob_store(settings: Settings) -> Blobs:
    """PROMPTCACHE_BLOBS: the local directories (default) or an S3-compatible bucket, whose
    objects results may point at directly (PROMPTCACHE_BLOBS_PUBLIC_URL).

    A public base is refused with URL signing: a bucket or CDN URL cannot carry our HMAC, so
    the URLs would silently be unsigned and never expire; and with local files, which have no
    URL but the web process's (PROMPTCACHE_PUBLIC_URL, a CDN may front that)."""
    if settings.blobs_public_url:  # empty: unset
        if not settings.blobs.startswith("s3://"):
            raise ConfigError("PROMPTCACHE_BLOBS_PUBLIC_URL needs PROMPTCACHE_BLOBS=s3://bucket/"
                              "prefix (local images are served by `promptcache web`: point "
                              "PROMPTCACHE_PUBLIC_URL at it, or at a CDN in front of it)")
        if settings.url_signing_key is not None:
            raise ConfigError("PROMPTCACHE_BLOBS_PUBLIC_URL and PROMPTCACHE_URL_SIGNING_KEY "
                              "exclude each other: a bucket or CDN URL cannot carry the "
                              "signature and would never expire (unset PROMPTCACHE_BLOBS_"
                              "PUBLIC_URL to keep signed URLs via `promptcache web`)")
    if settings.blobs.startswith("s3://"):
        from promptcache.storage.s3 import S3BlobStore  # obstore only loaded when used

        return S3BlobStore(settings.blobs, public_base=settings.blobs_public_url or None)
    return BlobStore(settings.images_dir, settings.thumbnails_dir)


def registry(cache_redis: aioredis.Redis, keys: Keys, blobs: Blobs,
             settings: Settings) -> EntryRegistry:
    """The registry, and the semantic tier's vectors forgotten in the step that evicts."""
    return EntryRegistry(cache_redis, keys, blobs, limit_bytes=int(settings.storage_limit),
                         forget=semantic_forget(keys))


def semantic_forget(keys: Keys) -> Forget:
    forget_keys, forget_args = semantic_store.forget_keys(keys)
    return Forget(semantic_store.FORGET, forget_keys, forget_args)


def build_semantic(settings: Settings, cache_redis: aioredis.Redis | None) -> SemanticTier | None:
    """The semantic tier, or None (PROMPTCACHE_EMBEDDINGS=off, or no cache store)."""
    if settings.embeddings == "off" or cache_redis is None:
        return None
    keys = settings.keys()
    api_key = settings.embeddings_api_key.get_secret_value() if settings.embeddings_api_key \
        else None
    inner = build_embedder(settings.embeddings, base_url=settings.embeddings_url,
                           model=settings.embeddings_model, api_key=api_key,
                           dim=settings.embeddings_dim, threads=settings.embedding_threads,
                           runtime=settings.embedding_runtime,
                           cache_dir=settings.data_dir / "models")
    assert inner is not None
    store = SemanticStore(cache_redis, keys)
    return SemanticTier(embedder=CachedEmbedder(inner, shared=store),
                        index=VectorIndex(inner.model, inner.dim), store=store,
                        threshold=settings.semantic_threshold, top_k=settings.semantic_top_k,
                        verifier=settings.semantic_verifier)


class SemanticLoop:
    """A worker process's semantic upkeep: load the model (exact-only until then), then keep
    the in-memory index equal to the shared one."""

    def __init__(self, tier: SemanticTier, follow_redis: aioredis.Redis, settings: Settings,
                 consumer: str) -> None:
        self.tier = tier
        self.follower = IndexFollower(follow_redis, settings.keys(), tier.index,
                                      consumer=consumer,
                                      max_entries=settings.semantic_max_entries)
        self.stopper = Stopper()

    def stop(self) -> None:
        self.stopper.stop()
        self.follower.stop()

    async def run(self, burst: bool = False) -> None:
        delay = 1.0
        while not self.stopper.stopping:
            try:
                await self.tier.warm()
                # the model's objects live as long as the process: out of the collector's way
                # (they multiplied full-collection pauses about 7x, on every request's path)
                gc.freeze()
                log.debug("gc_frozen", permanent_objects=gc.get_freeze_count())
                break
            except Exception as exc:  # noqa: BLE001 - exact-only until the embedder works
                log.warning("semantic_tier_unavailable", error=str(exc), retry_in=delay)
                await self.stopper.sleep(delay)
                delay = min(delay * 2, 60.0)
        if not self.stopper.stopping:
            await self.follower.run(burst=burst)
        await self.tier.embedder.aclose()


# what the pipeline needs from the process for its guarantees
def pipeline_guards(settings: Settings, redis: aioredis.Redis, keys: Keys, blobs: Blobs,
                    entries: EntryRegistry | None) -> dict[str, Any]:
    """Pipeline keyword arguments: `publish_changes` writes change events (evictions) to the
    change stream at once, whatever later happens to the request; `bypass` deletes images
    written without a registration after `bypass_keep`, at most `bypass_share` of the cap."""

    async def publish_changes(events: Sequence[ChangeEvent]) -> None:
        async with redis.pipeline(transaction=True) as pipe:
            for event in events:
                pipe.xadd(keys.changes, {"data": event.model_dump_json(exclude_none=True)})
            await pipe.execute()

    return {"publish_changes": publish_changes,
            "bypass": BypassImages(blobs, entries, keep_s=settings.bypass_keep.total_seconds(),
                                   budget_bytes=int(int(settings.storage_limit)
                                                    * settings.bypass_share))}
# --- end of issue 14 wiring -------------------------------------------------------------------


def quality_gate(settings: Settings, redis: aioredis.Redis, keys: Keys) -> QualityGate | None:
    """The quality gate (None: PROMPTCACHE_QUALITY_GATE=off), counting rejections by reason
    in the streams Redis beside the result counters."""
    if not settings.quality_gate:
        return None
    return QualityGate(GatePolicy(min_std=settings.quality_min_std,
                                  brisque_max=settings.quality_brisque_max),
                       counter=RejectionCounter(redis, keys.metrics_quality))


def build_pipeline(settings: Settings, *, redis: aioredis.Redis,
                   cache_redis: aioredis.Redis | None, generator: Generator,
                   semantic: SemanticTier | None = None, keys: Keys | None = None) -> Pipeline:
    """The tiers, shared by every shard's worker in a process."""
    keys = keys or settings.keys()
    blobs = blob_store(settings)
    entries = registry(cache_redis, keys, blobs, settings) if cache_redis else None
    pipeline = Pipeline(generator=generator,
                        exact=ExactCache(cache_redis, keys, settings.ttl) if cache_redis else None,
                        blobs=blobs, public_url=settings.effective_public_url,
                        signer=settings.url_signer(),
                        scope_limit_bytes=int(settings.scope_storage_limit or 0),
                        thumbnail_size=settings.thumbnail_size,
                        registry=entries,
                        policy=PolicySettings(explicit=settings.policy_explicit,
                                              gore=settings.policy_gore,
                                              hate=settings.policy_hate,
                                              real_person=settings.policy_real_person),
                        flight=Flight(cache_redis, keys, ttl=settings.flight_lock_ttl)
                        if cache_redis else None, semantic=semantic,
                        similar_flights=SimilarFlights(
                            cache_redis, keys, semantic,
                            max_wait_s=settings.generator_timeout.total_seconds())
                        if cache_redis and semantic else None,
                        quality=quality_gate(settings, redis, keys),
                        **pipeline_guards(settings, redis, keys, blobs, entries))
    if semantic is not None:  # entries indexed late (model loading) get their durable copy
        semantic.on_embedded = pipeline.publish_changes
    return pipeline


def build_worker(settings: Settings, *, redis: aioredis.Redis, cache_redis: aioredis.Redis | None,
                 generator: Generator, consumer: str | None = None,
                 semantic: SemanticTier | None = None, shard: int = 0,
                 pipeline: Pipeline | None = None) -> Worker:
    """The worker of one shard (the only one unless PROMPTCACHE_SHARDS > 1)."""
    keys = settings.keys().for_shard(shard)
    if pipeline is None:
        pipeline = build_pipeline(settings, redis=redis, cache_redis=cache_redis,
                                  generator=generator, semantic=semantic, keys=keys)
    return Worker(redis=redis, keys=keys, pipeline=pipeline, consumer=consumer,
                  batch_size=settings.batch_size, max_in_flight=settings.max_in_flight,
                  # the process's generation slots, split between its shards' workers
                  generation_concurrency=-(-settings.generation_concurrency // keys.shards),
                  claim_idle=settings.claim_idle, block=settings.block,
                  max_deliveries=settings.max_deliveries, done_ttl=settings.done_ttl,
                  health_interval=settings.health_interval,
                  durable_results=settings.durable_results)


def clients(settings: Settings, keys: Keys, *, fail_fast: bool = True) -> tuple[aioredis.Redis,
                                                                               aioredis.Redis]:
    """The streams client, and the cache store's: the same one when the URLs are equal, else
    (`fail_fast`, the workers') one that gives up after PROMPTCACHE_CACHE_TIMEOUT. Cluster
    clients where `keys` (`settings.keys()`) found clusters."""
    redis = streams_client(require_redis_url(settings), cluster=keys.cluster)
    cache_url = settings.effective_cache_redis_url or ""
    if cache_url == settings.redis_url:
        return redis, redis
    cluster = keys.cache_is_cluster
    return redis, (cache_client(cache_url, settings, cluster=cluster) if fail_fast
                   else streams_client(cache_url, cluster=cluster))


async def reachable_keys(settings: Settings, stopper: Stopper | None = None) -> Keys:
    """`settings.keys()`, once the streams server answers whether it is a cluster: a service
    started before its Redis waits for it (with backoff) instead of exiting. A refused login
    is a configuration error, not a wait."""
    delay = 0.5
    while True:
        try:
            return settings.keys()
        except RedisAuthenticationError:
            raise
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if stopper is not None and stopper.stopping:
                raise
            log.warning("redis_unreachable_at_start", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def run_worker(settings: Settings, *, burst: bool = False,
                     consumer: str | None = None) -> list[Worker]:
    """A worker per shard (+ a persister per shard when DATABASE_URL is set), one pipeline
    between them, until SIGTERM/SIGINT or, in burst, idle."""
    keys = await reachable_keys(settings)
    consumer = consumer or consumer_name()
    async with AsyncExitStack() as stack:
        redis, cache_redis = clients(settings, keys)
        stack.push_async_callback(redis.aclose)
        await check_shards(redis, keys, claim=True)
        if cache_redis is not redis:
            stack.push_async_callback(cache_redis.aclose)
        generator = build_generator(settings)
        stack.push_async_callback(generator.aclose)
        semantic = build_semantic(settings, cache_redis)
        pipeline = build_pipeline(settings, redis=redis, cache_redis=cache_redis,
                                  generator=generator, semantic=semantic, keys=keys)
        workers = [build_worker(settings, redis=redis, cache_redis=cache_redis,
                                generator=generator, consumer=consumer, semantic=semantic,
                                shard=s, pipeline=pipeline) for s in range(keys.shards)]
        loops: list[tuple[Callable[[], None], Callable[..., Awaitable[None]]]] = [
            (w.stop, w.run) for w in workers]
        if semantic is not None:
            # the follower blocks on the log: not the 50 ms fail-fast client
            follow_redis = redis if cache_redis is redis else streams_client(
                settings.effective_cache_redis_url or "", 4, cluster=keys.cache_is_cluster)
            if follow_redis is not redis:
                stack.push_async_callback(follow_redis.aclose)
            semantic_loop = SemanticLoop(semantic, follow_redis, settings, consumer)
            loops.append((semantic_loop.stop, semantic_loop.run))
        if settings.database_url:
            for shard in keys.all_shards():  # a connection each: one transaction at a time
                store = MetadataStore(settings.database_url)
                stack.push_async_callback(store.aclose)
                persister = Persister(redis=redis, keys=shard, store=store, consumer=consumer,
                                      claim_idle=settings.claim_idle, block=settings.block)
                loops.append((persister.stop, persister.run))
        else:
            log.warning("no_database_url", detail="metadata is not persisted to PostgreSQL")
        await run_until_signal(loops, burst=burst)
        return workers
    raise AssertionError("unreachable")


async def run_janitor(settings: Settings, *, burst: bool = False) -> Janitor:
    keys = await reachable_keys(settings)
    async with AsyncExitStack() as stack:
        redis, cache_redis = clients(settings, keys, fail_fast=False)
        stack.push_async_callback(redis.aclose)
        await check_shards(redis, keys, claim=True)
        if cache_redis is not redis:
            stack.push_async_callback(cache_redis.aclose)
        blobs = blob_store(settings)
        janitor = Janitor(redis=redis, keys=keys, consumer=consumer_name(),
                          registry=registry(cache_redis, keys, blobs, settings), blobs=blobs,
                          ttl=settings.ttl, interval=settings.janitor_interval,
                          lock_ttl=settings.janitor_lock_ttl,
                          results_retention=settings.results_retention,
                          changes_retention=settings.changes_retention,
                          consumer_idle=settings.consumer_idle,
                          orphan_grace=settings.orphan_grace,
                          orphan_interval=settings.orphan_interval, block=settings.block)
        await run_until_signal([(janitor.stop, janitor.run)], burst=burst)
        return janitor
    raise AssertionError("unreachable")


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}: {task.get_coro()!r}", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


async def run_until_signal(loops: list[tuple[Callable[[], None], Callable[..., Awaitable[None]]]],
                           *, burst: bool = False) -> None:
    """Run loops together; SIGTERM/SIGINT calls every stop(); the first to fail stops the rest."""
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        log.info("stop_requested")
        for stop, _ in loops:
            stop()

    installed = []
    try:  # `kill -USR2 <pid>`: every asyncio task's stack to stderr (what a stuck process awaits)
        loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)
        installed.append(signal.SIGUSR2)
    except (NotImplementedError, RuntimeError):
        pass
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_all)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    tasks = [asyncio.create_task(run(burst=burst)) for _, run in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                stop_all()
        await asyncio.gather(*tasks)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
