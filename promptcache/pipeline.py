"""One request, start to finish: prepare (optimise, canonicalise, key) -> exact tier ->
semantic tier -> generate -> quality gate -> store -> outcome.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog
from redis.exceptions import RedisError

from promptcache.cache.bypass import BypassImages
from promptcache.cache.exact import CacheEntry, ExactCache
from promptcache.flight.identical import Flight, Found
from promptcache.cache.registry import EntryRegistry, Registered
from promptcache.errors import CacheUnavailable, GenerationFailed, ImageTooLarge
from promptcache.generators.base import GenerationRequest, Generator
from promptcache.optimizer import PolicySettings, optimize
from promptcache.prompts import NormalizedParams, cache_key, normalize_params
from promptcache.quality import QualityGate
from promptcache.flight.similar import SimilarFlights
from promptcache.semantic.tier import SemanticTier
from promptcache.signing import UrlSigner
from promptcache.storage.blobs import StoredBlob
from promptcache.storage.store import Blobs
from promptcache.thumbnails import make_thumbnail
from schemas.events import CacheStatus, ChangeEvent, Params, Request, Result

log = structlog.get_logger(__name__)


def new_entry_id() -> str:
    return f"e_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class StorageFull(Exception):
    """Nothing could be evicted to make room: the request stays pending and is retried."""


PublishChanges = Callable[[Sequence[ChangeEvent]], Awaitable[None]]
BYPASS_KEEP_S = 600.0
BYPASS_SHARE = 0.02  # of the storage cap: unregistered images a worker keeps at most
_DEFAULT_CAP = 10 * 1000**3  # the cap assumed without a registry (Settings' default)


@dataclass(frozen=True, slots=True)
class Shared:
    """What the leader of identical misses answers its followers in this process with: the
    entry, and from which tier (`coalesced` for the one it made or found, or `semantic`)."""

    entry: CacheEntry
    tier: CacheStatus = "coalesced"
    similarity: float | None = None
    matched_prompt: str | None = None


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
_PrepareKey = tuple[str, str | None, Params, bool, str | None]  # ..., optimize, scope


class Pipeline:
    """Two stages, run by the worker on two streams:

    - `lookup` (fast, every request): canonicalise and ask the cache tiers; None means "generate".
    - `generate` (slow, bounded by the worker): look again (another worker may have made it
      meanwhile), then generate, store, and describe the new entry.
    """

    def __init__(self, *, generator: Generator, exact: ExactCache | None, blobs: Blobs,
                 public_url: str, thumbnail_size: int = 256, signer: UrlSigner | None = None,
                 scope_limit_bytes: int = 0,
                 registry: EntryRegistry | None = None,
                 policy: PolicySettings | None = None, flight: Flight | None = None,
                 semantic: SemanticTier | None = None,
                 similar_flights: SimilarFlights | None = None,
                 publish_changes: PublishChanges | None = None,
                 bypass: BypassImages | None = None,
                 quality: QualityGate | None = None) -> None:
        """`publish_changes`: writes change events to the change stream at once (evictions are
        published when they happen, not with the answer, which may never come). Without it they
        travel with the outcome. `bypass`: where images written without a registration are
        kept until deleted (default: BYPASS_KEEP_S, BYPASS_SHARE of the cap). `quality`: the
        gate every generated image passes before it is registered or written (the wiring
        passes None only for PROMPTCACHE_QUALITY_GATE=off)."""
        self.generator = generator
        self.quality = quality
        self.policy = policy or PolicySettings()
        self.exact = exact
        self.registry = registry
        self.room_timeout_s = 30.0
        self.blobs = blobs
        self.public_url = public_url.rstrip("/")
        self.signer = signer  # signed image URLs (PROMPTCACHE_URL_SIGNING_KEY), or plain ones
        self.scope_limit_bytes = scope_limit_bytes  # PROMPTCACHE_SCOPE_STORAGE_LIMIT, 0: none
        self.thumbnail_size = thumbnail_size
        # In-process single flight: identical misses in this worker wait for one generation;
        # its leader takes the cross-worker lock (`flight`) so other workers wait for it too.
        self._in_flight: dict[str, asyncio.Future[Shared]] = {}
        self.flight = flight
        self.semantic = semantic
        self.similar_flights = similar_flights  # rewrites of a prompt in flight wait for it
        self.publish_changes = publish_changes
        cap = registry.limit_bytes if registry is not None else _DEFAULT_CAP
        self.bypass = bypass if bypass is not None else BypassImages(
            blobs, registry, keep_s=BYPASS_KEEP_S, budget_bytes=int(cap * BYPASS_SHARE))
        # prepare() memoised: the same prompt, negative, params and optimize flag always give
        # the same keys, so a repeat costs a dict lookup instead of the optimizer and hashing
        self._prepared: OrderedDict[_PrepareKey, Prepared] = OrderedDict()

    def _urls(self, blob_sha256: str, content_type: str) -> tuple[str, str]:
        """Straight at the store when it has public URLs (S3 with PROMPTCACHE_BLOBS_PUBLIC_URL,
        never signed: the wiring refuses it with signing), else via the web process."""
        if (direct := self.blobs.public_urls(blob_sha256, content_type)) is not None:
            return direct
        ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[content_type]
        image, thumbnail = f"/images/{blob_sha256}.{ext}", f"/thumbnails/{blob_sha256}.webp"
        if self.signer is None:
            return f"{self.public_url}{image}", f"{self.public_url}{thumbnail}"
        return (self.signer.sign(f"{self.public_url}{image}", image),
                self.signer.sign(f"{self.public_url}{thumbnail}", thumbnail))

    def prepare(self, request: Request) -> Prepared:
        """Optimise (raises Refused: a `rejected` answer that never reaches the cache or the
        generator) and form the key from the user's canonical prompt, before enhancers.
        Memoised on everything that affects the outcome (the policy and generator are fixed
        for the pipeline's life); refusals are not memoised."""
        memo: _PrepareKey = (request.prompt, request.negative_prompt, request.params,
                             request.options.optimize, request.scope)
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
        # the scope is part of both keys: the exact key, the single-flight locks (named after it)
        # and the semantic partition (the params key) never meet another scope's
        key = cache_key(optimized.key_prompt, optimized.key_negative, params,
                        optimizer_version=optimized.key_version, scope=request.scope)
        params_key = cache_key("", optimized.key_negative, params,
                               optimizer_version=optimized.key_version, scope=request.scope)
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

    async def similar_many(self, prepared: list[Prepared]) -> list[Outcome | None] | None:
        """`similar` for a batch of exact misses: one embedding call, one exact-tier round trip
        for the accepted neighbours. None when the cache store is unavailable."""
        if self.semantic is None or self.exact is None:
            return [None] * len(prepared)
        searches = await self.semantic.find_many([(p.canonical, p.params_key) for p in prepared])
        wanted = [n.meta.cache_key for search in searches for n in search.accepted]
        try:
            entries = await self.exact.get_many(wanted) if wanted else {}
        except CacheUnavailable as exc:
            log.warning("cache_unavailable", error=str(exc))
            return None
        outcomes: list[Outcome | None] = []
        for one, search in zip(prepared, searches, strict=True):
            outcome: Outcome | None = None
            for neighbour in search.accepted:
                entry = entries.get(neighbour.meta.cache_key)
                if entry is None:
                    self.semantic.index.remove(neighbour.meta.entry_id)  # expired meanwhile
                    continue
                outcome = self.hit(one, entry, "semantic", similarity=neighbour.similarity,
                                   matched_prompt=neighbour.meta.prompt)
                break
            outcomes.append(outcome)
        return outcomes

    async def generate(self, request: Request) -> Outcome:
        """The slow path. Raises GenerationFailed when the generator cannot make the image, or
        ImageRejected (one of them) when the image it made fails the quality gate.

        Identical misses in this process follow one leader (`_in_flight`); the leader takes the
        cross-worker lock, so one generation serves them all. A follower whose leader stopped
        without an answer (cancelled, an infrastructure error) looks again, and one of them
        leads; a generator failure is every follower's answer too (they asked for the same
        picture)."""
        prepared = self.prepare(request)
        if request.options.cache != "use":  # refresh or bypass: generate, no single flight
            return (await self._generate_announced(prepared, self.exact is not None, None))[0]
        while True:
            entry, cache_usable = await self._cached(prepared)
            if entry is not None:  # made by another request while this one queued
                return self.hit(prepared, entry, "coalesced")
            if cache_usable and (similar := await self.similar(prepared, count=False)):
                return similar  # a near-identical prompt was stored while this one queued
            leader = self._in_flight.get(prepared.key)
            if leader is None:
                break  # no await since the look: this one leads
            try:
                shared = await asyncio.shield(leader)
            except GenerationFailed:
                raise
            except Exception:  # noqa: BLE001 - the leader stopped: look again
                continue
            return self._answer_shared(prepared, shared)
        future: asyncio.Future[Shared] = asyncio.get_running_loop().create_future()
        self._in_flight[prepared.key] = future
        try:
            outcome, shared = await self._lead(prepared, cache_usable)
        except BaseException as exc:
            self._in_flight.pop(prepared.key, None)
            future.set_exception(exc if isinstance(exc, Exception) else
                                 RuntimeError("cancelled"))
            future.exception()  # retrieved: no "never retrieved" warning
            raise
        self._in_flight.pop(prepared.key, None)
        future.set_result(shared)
        return outcome

    def _answer_shared(self, prepared: Prepared, shared: Shared) -> Outcome:
        return self.hit(prepared, shared.entry, shared.tier, similarity=shared.similarity,
                        matched_prompt=shared.matched_prompt)

    async def _lead(self, prepared: Prepared, cache_usable: bool) -> tuple[Outcome, Shared]:
        """The leader's way: the cross-worker lock, a similar generation in flight, or make it."""
        lease = None
        if cache_usable and self.flight is not None:
            async def find() -> CacheEntry | None:
                return (await self._cached(prepared))[0]

            joined = await self.flight.lead_or_follow(prepared.key, find)
            if isinstance(joined, Found):  # another worker generated it meanwhile
                return self.hit(prepared, joined.value, "coalesced"), Shared(joined.value)
            lease = joined  # None: the cache store is down, generate without a lock
        try:
            if lease is not None and self.similar_flights is not None and \
                    (served := await self._wait_for_similar(prepared, lease.name)) is not None:
                return self._answer_shared(prepared, served), served
            outcome, entry = await self._generate_announced(
                prepared, cache_usable, lease.name if lease is not None else None)
            return outcome, Shared(entry)
        finally:
            if lease is not None:
                await lease.release()

    async def _wait_for_similar(self, prepared: Prepared, lock: str) -> Shared | None:
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
        if entry is None or not await asyncio.to_thread(
                self.blobs.exists, entry.blob_sha256, entry.content_type):
            return None
        return Shared(entry, "semantic", holder.similarity, holder.prompt)

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
            prompt=prompt_used, negative_prompt=negative, params=params))
        generation_ms = (time.monotonic() - started) * 1000
        if self.quality is not None:  # raises ImageRejected: nothing registered or written
            await self.quality.check(image.data, image.content_type,
                                     expected=self._expected_size(params),
                                     reported=(image.width, image.height))
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
        size = blob.image_bytes + blob.thumbnail_bytes
        if self.registry is not None and size > self.registry.limit_bytes:
            raise ImageTooLarge(f"the image and its thumbnail ({size} bytes) are larger than "
                                f"the whole storage limit ({self.registry.limit_bytes} bytes)")
        # reserve the bytes (evicting LRU entries when the cap needs it), then write
        changes: list[ChangeEvent] = []
        registered = cache_usable and await self._register(entry, key, blob, changes,
                                                           scope=request.scope)
        await asyncio.to_thread(self.blobs.write, blob, image.data, thumbnail)
        if not registered:  # not accounted under the cap: this worker deletes it soon
            await self.bypass.add(blob)
        else:
            await self.bypass.reap()

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
            # never waits for the model: while it loads, the entry is deferred (None here) and
            # joins the index once the model is ready (SemanticTier.index_deferred)
            vector = await self.semantic.add(entry_id=entry.entry_id, cache_key=key,
                                             params_key=prepared.params_key, canonical=canonical)
            if vector is not None:  # the durable copy in PostgreSQL goes with the change event
                embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        image_url, thumbnail_url = self._urls(blob.sha256, image.content_type)
        stored = ChangeEvent(
            type="entry_stored", entry_id=entry.entry_id, at=entry.created_at, cache_key=key,
            tier=status, request_id=request.request_id, prompt=request.prompt,
            scope=request.scope,
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

    def _expected_size(self, params: NormalizedParams) -> tuple[int, int]:
        """The size the backend documents for these params: the size asked for, except on
        OpenAI, which maps every request to its supported size nearest in aspect ratio."""
        if self.generator.name == "openai":
            from promptcache.generators.openai_images import nearest_size  # the SDK: lazily

            width, _, height = nearest_size(params.width, params.height).partition("x")
            return int(width), int(height)
        return params.width, params.height

    async def _register(self, entry: CacheEntry, key: str, blob: StoredBlob,
                        changes: list[ChangeEvent], *, scope: str | None = None) -> bool:
        """Record the entry in the registry (TTL, LRU, storage cap), before its files are
        written. Evictions it forces are published at once (`publish_changes`), else added to
        `changes`. False when the cache store cannot take it: the image is still written and
        served, and `bypass` deletes it soon. Returns once the files may be written: when the
        blob's files were being deleted (its last entry just went), after that deletion."""
        if self.registry is None:
            return True
        record = Registered(entry.entry_id, key, blob.sha256, blob.content_type,
                            blob.image_bytes + blob.thumbnail_bytes, entry.created_at, scope)
        deadline = time.monotonic() + self.room_timeout_s
        try:
            while not (reservation := await self.registry.register(record)).fits:
                evicted = await self.registry.evict_lru(need=record.bytes, reason="storage_limit")
                await self._record_changes([e.change_event("storage_limit") for e in evicted],
                                           changes)
                if not evicted:  # someone else is evicting (or writing): wait for room
                    if time.monotonic() > deadline:
                        raise StorageFull(f"no room for {record.bytes} bytes under the "
                                          f"storage limit after {self.room_timeout_s:.0f}s")
                    await asyncio.sleep(0.02)
            if reservation.blob_deleting:
                await self.registry.wait_deleted(blob.sha256)
            if scope is not None and self.scope_limit_bytes:  # the tenant's quota: LRU within it
                evicted = await self.registry.evict_scope_lru(
                    scope, self.scope_limit_bytes, keep=entry.entry_id, reason="scope_limit")
                await self._record_changes([e.change_event("scope_limit") for e in evicted],
                                           changes)
            return True
        except (RedisError, OSError) as exc:
            log.warning("cache_unavailable", error=str(exc))
            return False

    async def _record_changes(self, events: list[ChangeEvent],
                              changes: list[ChangeEvent]) -> None:
        """Publish what already happened to the cache now; if that fails, it travels with the
        answer instead."""
        if not events:
            return
        if self.publish_changes is not None:
            for attempt in range(3):
                try:
                    await self.publish_changes(events)
                    return
                except (RedisError, OSError) as exc:
                    log.warning("change_publish_failed", error=str(exc), attempt=attempt + 1)
                    await asyncio.sleep(0.1 * (attempt + 1))
        changes += events

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
