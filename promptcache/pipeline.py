"""One request, start to finish: prepare (optimise, canonicalise, key) -> exact tier ->
semantic tier -> generate -> store -> outcome.

The worker runs it in two stages on two streams: `promptcache:requests` (every request:
`prepare`, `lookup_many` for a whole batch, `similar` for the exact misses) and
`promptcache:generate` (the misses handed on: `generate`). Knows the cache tiers, the generator
and the stores; knows nothing of stream ids.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import structlog
from redis.exceptions import RedisError

from promptcache.cache.exact import CacheEntry, ExactCache
from promptcache.flight.identical import Flight, Found
from promptcache.cache.registry import NO_ROOM, EntryRegistry, Registered
from promptcache.errors import CacheUnavailable, GenerationFailed
from promptcache.generators.base import GenerationRequest, Generator
from promptcache.optimizer import PolicySettings, optimize
from promptcache.prompts import NormalizedParams, cache_key, normalize_params
from promptcache.flight.similar import SimilarFlights
from promptcache.semantic.tier import SemanticTier
from promptcache.storage.blobs import BlobStore, StoredBlob
from promptcache.thumbnails import make_thumbnail
from schemas.events import CacheStatus, ChangeEvent, Params, Request, Result

log = structlog.get_logger(__name__)


def new_entry_id() -> str:
    return f"e_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class StorageFull(Exception):
    """Nothing could be evicted to make room: the request stays pending and is retried."""


class LookAgain(Exception):
    """The leader of identical misses was answered from a similar prompt's entry, so it made no
    entry for this key: its followers look for themselves."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """A request's answer, and what happened to the cache on the way (entries stored or
    evicted: recorded whoever publishes the answer). A hit says what generation it saved."""

    result: Result
    changes: list[ChangeEvent] = field(default_factory=list)
    saved_generation_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request in canonical form: what the tiers and the generator work from."""

    request: Request
    params: NormalizedParams
    canonical: str
    prompt_used: str
    negative: str | None
    key: str
    optimizer_version: str
    dropped: tuple[str, ...] = ()
    params_key: str = ""  # the key without the prompt: the semantic tier's hard partition


PREPARED_CACHE_SIZE = 4096
_PrepareKey = tuple[str, str | None, Params, bool]


class Pipeline:
    """Two stages, run by the worker on two streams:

    - `lookup` (fast, every request): canonicalise and ask the cache tiers; None means "generate".
    - `generate` (slow, bounded by the worker): look again (another worker may have made it
      meanwhile), then generate, store, and describe the new entry.
    """

    def __init__(self, *, generator: Generator, exact: ExactCache | None, blobs: BlobStore,
                 public_url: str, thumbnail_size: int = 256,
                 registry: EntryRegistry | None = None,
                 policy: PolicySettings | None = None, flight: Flight | None = None,
                 semantic: SemanticTier | None = None,
                 similar_flights: SimilarFlights | None = None) -> None:
        self.generator = generator
        self.policy = policy or PolicySettings()
        self.exact = exact
        self.registry = registry
        self.room_timeout_s = 30.0
        self.blobs = blobs
        self.public_url = public_url.rstrip("/")
        self.thumbnail_size = thumbnail_size
        # In-process single flight: identical misses in this worker wait for one generation;
        # its leader takes the cross-worker lock (`flight`) so other workers wait for it too.
        self._in_flight: dict[str, asyncio.Future[CacheEntry]] = {}
        self.flight = flight
        self.semantic = semantic
        self.similar_flights = similar_flights  # rewrites of a prompt in flight wait for it
        # prepare() memoised: the same prompt, negative, params and optimize flag always give
        # the same keys, so a repeat costs a dict lookup instead of the optimizer and hashing
        self._prepared: OrderedDict[_PrepareKey, Prepared] = OrderedDict()

    def _urls(self, blob_sha256: str, content_type: str) -> tuple[str, str]:
        ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[content_type]
        return (f"{self.public_url}/images/{blob_sha256}.{ext}",
                f"{self.public_url}/thumbnails/{blob_sha256}.webp")

    def prepare(self, request: Request) -> Prepared:
        """Optimise (raises Refused: a `rejected` answer that never reaches the cache or the
        generator) and form the key from the user's canonical prompt, before enhancers.
        Memoised on everything that affects the outcome (the policy and generator are fixed
        for the pipeline's life); refusals are not memoised."""
        memo: _PrepareKey = (request.prompt, request.negative_prompt, request.params,
                             request.options.optimize)
        cached = self._prepared.get(memo)
        if cached is not None:
            self._prepared.move_to_end(memo)
            return dataclasses.replace(cached, request=request)
        prepared = self._prepare(request)
        self._prepared[memo] = prepared
        if len(self._prepared) > PREPARED_CACHE_SIZE:
            self._prepared.popitem(last=False)
        return prepared

    def _prepare(self, request: Request) -> Prepared:
        params = normalize_params(request.params, default_model=self.generator.default_model)
        optimized = optimize(request.prompt, request.negative_prompt,
                             enabled=request.options.optimize, policy=self.policy,
                             truncates=self.generator.truncates_prompt)
        if optimized.dropped:
            log.debug("prompt_fitted_to_window", dropped=list(optimized.dropped))
        key = cache_key(optimized.key_prompt, optimized.key_negative, params,
                        optimizer_version=optimized.key_version)
        params_key = cache_key("", optimized.key_negative, params,
                               optimizer_version=optimized.key_version)
        return Prepared(request, params, optimized.key_prompt, optimized.prompt_used,
                        optimized.negative_used, key, optimized.version, optimized.dropped,
                        params_key)

    async def _cached(self, prepared: Prepared) -> tuple[CacheEntry | None, bool]:
        """(entry, cache usable) for the exact key."""
        if self.exact is None:
            return None, False
        try:
            entry = await self.exact.get(prepared.key)
        except CacheUnavailable as exc:
            log.warning("cache_unavailable", error=str(exc))
            return None, False
        # the registry is trusted: an entry's files go only with its registration (and the
        # janitor's orphan sweep drops an entry whose file is gone), so no stat() per hit
        return entry, True

    async def lookup_many(self, prepared: list[Prepared]) -> dict[str, CacheEntry | None] | None:
        """The exact tier for a whole batch in one round trip: entry (or None) by cache key;
        None when the cache store is unavailable (the batch bypasses)."""
        if self.exact is None:
            return None
        try:
            return await self.exact.get_many([p.key for p in prepared])
        except CacheUnavailable as exc:
            log.warning("cache_unavailable", error=str(exc))
            return None

    async def lookup(self, request: Request) -> Outcome | None:
        """The fast path: an answer from the cache, or None when the image must be generated."""
        prepared = self.prepare(request)
        if request.options.cache != "use":
            return None
        entry, usable = await self._cached(prepared)
        if entry is not None:
            return self.hit(prepared, entry, "exact")
        return await self.similar(prepared) if usable else None

    async def similar(self, prepared: Prepared, *, count: bool = True) -> Outcome | None:
        """The semantic tier: the most similar verified entry of the same params partition."""
        if self.semantic is None or self.exact is None:
            return None
        search = await self.semantic.find(prepared.canonical, prepared.params_key, count=count)
        for neighbour in search.accepted:
            try:
                entry = await self.exact.get(neighbour.meta.cache_key)
            except CacheUnavailable as exc:
                log.warning("cache_unavailable", error=str(exc))
                return None
            if entry is None:
                self.semantic.index.remove(neighbour.meta.entry_id)  # expired meanwhile
                continue
            return self.hit(prepared, entry, "semantic", similarity=neighbour.similarity,
                             matched_prompt=neighbour.meta.prompt)
        return None

    async def generate(self, request: Request) -> Outcome:
        """The slow path. Raises GenerationFailed when the generator cannot make the image."""
        prepared = self.prepare(request)
        mode = request.options.cache
        cache_usable = self.exact is not None
        if mode == "use":
            entry, cache_usable = await self._cached(prepared)
            if entry is not None:  # made by another request while this one queued
                return self.hit(prepared, entry, "coalesced")
            if cache_usable and (similar := await self.similar(prepared, count=False)):
                return similar  # a near-identical prompt was stored while this one queued
            if (leader := self._in_flight.get(prepared.key)) is not None:
                try:
                    return self.hit(prepared, await asyncio.shield(leader), "coalesced")
                except Exception:  # noqa: BLE001 - the leader failed: try ourselves
                    pass
        future: asyncio.Future[CacheEntry] | None = None
        if mode == "use" and prepared.key not in self._in_flight:
            future = asyncio.get_running_loop().create_future()
            self._in_flight[prepared.key] = future
        try:
            lease = None
            if future is not None and cache_usable and self.flight is not None:
                async def find() -> CacheEntry | None:
                    return (await self._cached(prepared))[0]

                joined = await self.flight.lead_or_follow(prepared.key, find)
                if isinstance(joined, Found):  # another worker generated it meanwhile
                    self._in_flight.pop(prepared.key, None)
                    future.set_result(joined.value)
                    return self.hit(prepared, joined.value, "coalesced")
                lease = joined  # None: the cache store is down, generate without a lock
            if lease is not None and self.similar_flights is not None and \
                    (served := await self._wait_for_similar(prepared, lease.name)) is not None:
                await lease.release()
                if future is not None:  # identical followers here look for themselves
                    self._in_flight.pop(prepared.key, None)
                    future.set_exception(LookAgain())
                    future.exception()
                return served
            try:
                outcome, entry = await self._generate_announced(
                    prepared, cache_usable, lease.name if lease is not None else None)
            finally:
                if lease is not None:
                    await lease.release()
        except BaseException as exc:
            if future is not None:
                self._in_flight.pop(prepared.key, None)
                future.set_exception(exc if isinstance(exc, Exception) else
                                     RuntimeError("cancelled"))
                future.exception()  # retrieved: no "never retrieved" warning
            raise
        if future is not None:
            self._in_flight.pop(prepared.key, None)
            future.set_result(entry)
        return outcome

    async def _wait_for_similar(self, prepared: Prepared, lock: str) -> Outcome | None:
        """A rewrite of this prompt is being generated: wait for it and answer from its entry."""
        assert self.similar_flights is not None and self.exact is not None
        holder = await self.similar_flights.find(prepared.canonical, prepared.params_key, lock)
        if holder is None:
            return None
        finished = await self.similar_flights.wait(holder)
        if finished.cache_key is None:
            return None  # it failed or died: generate
        try:
            entry = await self.exact.get(finished.cache_key)
        except CacheUnavailable as exc:
            log.warning("cache_unavailable", error=str(exc))
            return None
        if entry is None or not self.blobs.exists(entry.blob_sha256, entry.content_type):
            return None
        return self.hit(prepared, entry, "semantic", similarity=holder.similarity,
                         matched_prompt=holder.prompt)

    async def _generate_announced(self, prepared: Prepared, cache_usable: bool,
                                  lock: str | None) -> tuple[Outcome, CacheEntry]:
        """Generate, with the prompt announced to similar misses while it is being made (when
        this holds the key's flight lock): they get the entry, or are let go if it fails."""
        flights = self.similar_flights
        if lock is None or flights is None or not await flights.announce(
                lock, prepared.canonical, prepared.params_key):
            return await self._generate_and_store(prepared, cache_usable)
        stored: str | None = None
        try:
            outcome, entry = await self._generate_and_store(prepared, cache_usable)
            if outcome.result.cache == "miss":  # registered under its key
                stored = prepared.key
            return outcome, entry
        finally:
            await flights.finish(lock, stored)  # before the lock goes: waiters read this first

    async def _generate_and_store(self, prepared: Prepared,
                                  cache_usable: bool) -> tuple[Outcome, CacheEntry]:
        request, params, key = prepared.request, prepared.params, prepared.key
        canonical, prompt_used, negative = prepared.canonical, prepared.prompt_used, prepared.negative
        version = prepared.optimizer_version
        mode = request.options.cache
        started = time.monotonic()
        image = await self.generator.generate(GenerationRequest(
            prompt=prompt_used, negative_prompt=negative, model=params.model,
            width=params.width, height=params.height, steps=params.steps,
            guidance=params.guidance, sampler=params.sampler, seed=params.seed))
        generation_ms = (time.monotonic() - started) * 1000
        thumbnail = await asyncio.to_thread(make_thumbnail, image.data, self.thumbnail_size)
        blob = self.blobs.describe(image.data, image.content_type, thumbnail)
        if self.exact is not None and await self.exact.is_flagged(blob.sha256):
            # a deterministic backend (same prompt, params and seed) made the flagged bytes again
            raise GenerationFailed("the generator made an image an operator flagged as bad; "
                                   "it is not served (change the seed or the prompt)",
                                   code="image_flagged")
        entry = CacheEntry(entry_id=new_entry_id(), blob_sha256=blob.sha256,
                           content_type=image.content_type, width=image.width,
                           height=image.height, prompt_used=prompt_used,
                           canonical_prompt=canonical, optimizer_version=version,
                           created_at=time.time(), generation_ms=round(generation_ms, 1))
        # reserve the bytes (evicting LRU entries when the cap needs it), then write
        changes: list[ChangeEvent] = []
        registered = cache_usable and await self._register(entry, key, blob, changes)
        await asyncio.to_thread(self.blobs.write, blob, image.data, thumbnail)

        status: CacheStatus = "miss"
        if mode == "bypass" or not registered:
            status = "bypass"
        elif self.exact is not None:
            try:
                await self.exact.put(key, entry)
            except CacheUnavailable as exc:
                log.warning("cache_unavailable", error=str(exc))
                status = "bypass"
        embedding: str | None = None
        if status == "miss" and self.semantic is not None:
            vector = await self.semantic.add(entry_id=entry.entry_id, cache_key=key,
                                             params_key=prepared.params_key, canonical=canonical)
            if vector is not None:  # the durable copy in PostgreSQL goes with the change event
                embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        image_url, thumbnail_url = self._urls(blob.sha256, image.content_type)
        stored = ChangeEvent(
            type="entry_stored", entry_id=entry.entry_id, at=entry.created_at, cache_key=key,
            tier=status, request_id=request.request_id, prompt=request.prompt,
            canonical_prompt=canonical, negative_prompt=negative, params=params.as_dict(),
            optimizer_version=version, generator=self.generator.name,
            blob_sha256=blob.sha256, content_type=image.content_type, width=image.width,
            height=image.height, image_bytes=blob.image_bytes,
            thumbnail_bytes=blob.thumbnail_bytes, generation_ms=generation_ms,
            embedding=embedding, partition=prepared.params_key if embedding else None,
            embedding_model=self.semantic.embedder.model if embedding and self.semantic
            else None)
        result = Result(request_id=request.request_id, status="ok", cache=status,
                        entry_id=entry.entry_id, image_url=image_url,
                        thumbnail_url=thumbnail_url, width=image.width, height=image.height,
                        content_type=image.content_type, prompt_used=prompt_used,
                        dropped=list(prepared.dropped) or None, optimizer_version=version)
        return Outcome(result, [*changes, stored]), entry

    async def _register(self, entry: CacheEntry, key: str, blob: StoredBlob,
                        changes: list[ChangeEvent]) -> bool:
        """Record the entry in the registry (TTL, LRU, storage cap). Evictions it forced are
        added to `changes`. False when the cache store cannot take it: the image is still
        written and served, and the janitor's orphan sweep removes it after its grace time."""
        if self.registry is None:
            return True
        record = Registered(entry.entry_id, key, blob.sha256, blob.content_type,
                            blob.image_bytes + blob.thumbnail_bytes, entry.created_at)
        if record.bytes > self.registry.limit_bytes:
            log.warning("image_larger_than_storage_limit", bytes=record.bytes)
            return False  # serve it, do not cache it (the orphan sweep removes the file)
        deadline = time.monotonic() + self.room_timeout_s
        try:
            while await self.registry.register(record) == NO_ROOM:
                evicted = await self.registry.evict_lru(need=record.bytes, reason="storage_limit")
                changes += [e.change_event("storage_limit") for e in evicted]
                if not evicted:  # someone else is evicting (or writing): wait for room
                    if time.monotonic() > deadline:
                        raise StorageFull(f"no room for {record.bytes} bytes under the "
                                          f"storage limit after {self.room_timeout_s:.0f}s")
                    await asyncio.sleep(0.02)
            return True
        except (RedisError, OSError) as exc:
            log.warning("cache_unavailable", error=str(exc))
            return False

    def hit(self, prepared: Prepared, entry: CacheEntry, tier: CacheStatus, *,
             similarity: float | None = None, matched_prompt: str | None = None) -> Outcome:
        request = prepared.request
        image_url, thumbnail_url = self._urls(entry.blob_sha256, entry.content_type)
        result = Result(request_id=request.request_id, status="ok", cache=tier,
                        similarity=None if similarity is None else round(similarity, 4),
                        matched_prompt=matched_prompt,
                        entry_id=entry.entry_id, image_url=image_url,
                        thumbnail_url=thumbnail_url, width=entry.width, height=entry.height,
                        content_type=entry.content_type, prompt_used=entry.prompt_used,
                        dropped=list(prepared.dropped) or None,
                        optimizer_version=entry.optimizer_version)
        return Outcome(result, saved_generation_ms=entry.generation_ms)
