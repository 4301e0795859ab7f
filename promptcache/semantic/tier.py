"""The semantic tier: nearest cached prompts in the same params partition, then the verifier.

`find` embeds the canonical user prompt (before enhancers, without request phrasing such as
"please draw"), takes the `top_k` nearest entries
of its partition at cosine >= `threshold`, and returns those the verifier accepts, most similar
first. A candidate the verifier refuses is counted by reason (`refused:<reason>`); a prompt whose
embedding means nothing (one word, another script, past the model's window) is counted as
`skipped:<reason>` and looked up exactly only. Any embedding or store failure degrades to
exact-only too: the semantic tier can cost a hit, never an answer.

Nothing waits for the model: an entry a miss stores while this process's model still loads is
kept in `{prefix}:semantic:deferred` (the cache store, bounded by DEFERRED_MAX) and its answer
goes out at once; when the model is ready, a background task of the process (`warm` starts it)
embeds and indexes the deferred entries, as any later `warm` does (a restarted worker, another
worker, `promptcache reindex`), so a worker stopped meanwhile loses none of them.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog
from redis.exceptions import RedisError

from promptcache.semantic.embeddings import CachedEmbedder, EmbeddingError, not_embeddable
from promptcache.semantic.index import Meta, Neighbour, VectorIndex
from promptcache.semantic.store import Record, SemanticStore
from promptcache.semantic.verifier import request_core, verify
from schemas.events import ChangeEvent

log = structlog.get_logger(__name__)

DEFERRED_MAX = 10_000  # entries waiting for a model, shared by the workers: past it, exact-only
_DEFERRED_BATCH = 64


@dataclass(frozen=True, slots=True)
class Search:
    accepted: list[Neighbour] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    skipped: str | None = None


class SemanticTier:
    def __init__(self, *, embedder: CachedEmbedder, index: VectorIndex, store: SemanticStore,
                 threshold: float = 0.75, top_k: int = 5, verifier: bool = True) -> None:
        self.embedder = embedder
        self.index = index
        self.store = store
        self.threshold = threshold
        self.top_k = top_k
        self.verifier = verifier
        self.ready = False
        self.deferring = 0  # defer() calls in flight (the indexing task waits for them)
        self.deferred_indexing: asyncio.Task[int] | None = None  # started by `warm`
        # told of entries indexed after they were stored (deferred while a model loaded), so
        # their durable copy can be written: the wiring publishes `entry_embedded` events
        self.on_embedded: Callable[[Sequence[ChangeEvent]], Awaitable[None]] | None = None

    async def warm(self) -> None:
        """Load the model (or learn the remote model's dimension); exact-only until done."""
        started = time.monotonic()
        await self.embedder.load()
        await self.embedder.embed_one("a warm up prompt")
        if self.index.dim != self.embedder.dim:
            if len(self.index):
                raise RuntimeError(f"embedding dimension changed from {self.index.dim} to "
                                   f"{self.embedder.dim}")
            self.index.dim = self.embedder.dim
        self.ready = True
        log.info("semantic_tier_ready", model=self.embedder.model, dim=self.embedder.dim,
                 seconds=round(time.monotonic() - started, 2))
        if self.deferred_indexing is None:
            self.deferred_indexing = asyncio.create_task(self.index_deferred(),
                                                         name="semantic-deferred")

    def partition(self, params_key: str) -> str:
        """Vectors of different models (or dimensions) never meet: they live apart."""
        return f"{self.embedder.model}:{self.embedder.dim}:{params_key}"

    async def _vector(self, canonical: str) -> np.ndarray | None:
        if not self.ready:
            return None  # the model is still loading: exact-only until it is
        try:
            return await self.embedder.embed_one(canonical)
        except EmbeddingError as exc:
            log.warning("embedding_failed", error=str(exc))
            return None

    async def vector_for(self, canonical: str) -> np.ndarray | None:
        """The embedding a lookup of `canonical` compares (cached), or None when it has none."""
        core = request_core(canonical)
        return None if not_embeddable(core) is not None else await self._vector(core)

    def refusal(self, candidate: str, canonical: str) -> str | None:
        """Why the picture cached for `candidate` must not answer `canonical`, or None when it
        may (the candidate already passed the threshold)."""
        if candidate == canonical or not self.verifier:
            return None  # the same prompt: a different optimizer key only
        verdict = verify(candidate, canonical)
        return None if verdict.ok else verdict.reason or "other"

    def _judge(self, partition: str, vector: np.ndarray, canonical: str) -> Search:
        """The nearest neighbours over the threshold that the verifier lets answer
        `canonical`, and why the others were refused."""
        accepted: list[Neighbour] = []
        refused: Counter[str] = Counter()
        for neighbour in self.index.search(partition, vector, self.top_k):
            if neighbour.similarity < self.threshold:
                break
            if (reason := self.refusal(neighbour.meta.prompt, canonical)) is not None:
                refused[reason] += 1
                continue
            accepted.append(neighbour)
        return Search(accepted, refused)

    async def find(self, canonical: str, params_key: str, *, count: bool = True) -> Search:
        """The lookup of one prompt (`find_many` of one). `count`: add refusals and skips to
        the counters (once per request, not on the generation stage's second look)."""
        return (await self.find_many([(canonical, params_key)], count=count))[0]

    async def find_many(self, lookups: Sequence[tuple[str, str]], *,
                        count: bool = True) -> list[Search]:
        """`find` for a batch of (canonical, params_key): one embedding call for all of them,
        one counters write. The result is in the order of `lookups`."""
        searches: list[Search | None] = [None] * len(lookups)
        todo: list[tuple[int, str, str]] = []  # (position, core, partition)
        skipped: Counter[str] = Counter()
        for i, (canonical, params_key) in enumerate(lookups):
            core = request_core(canonical)
            if (why := not_embeddable(core)) is not None:
                skipped[f"skipped:{why}"] += 1
                searches[i] = Search(skipped=why)
                continue
            partition = self.partition(params_key)
            if self.ready and not self.index.size(partition):
                searches[i] = Search(skipped="empty_partition")
                continue
            todo.append((i, core, partition))
        vectors: list[np.ndarray] | None = None
        if todo and self.ready:
            try:
                vectors = await self.embedder.embed_many([core for _, core, _ in todo])
            except EmbeddingError as exc:
                log.warning("embedding_failed", error=str(exc))
        refused_all: Counter[str] = Counter()
        for n, (i, _, partition) in enumerate(todo):
            if vectors is None:
                searches[i] = Search(skipped="unavailable")
                continue
            search = self._judge(partition, vectors[n], lookups[i][0])
            refused_all.update({f"refused:{r}": c for r, c in search.refused.items()})
            if search.refused:
                log.debug("semantic_candidates_refused", reasons=dict(search.refused))
            searches[i] = search
        if count:
            await self.store.count_many(skipped + refused_all)
        return [s or Search(skipped="unavailable") for s in searches]

    async def add(self, *, entry_id: str, cache_key: str, params_key: str,
                  canonical: str) -> np.ndarray | None:
        """Index a new entry for every worker. Returns its vector (for the durable copy), or
        None when the prompt is not embeddable, the store could not take it, or the model is
        still loading (the entry is deferred: indexed once a model is ready, without a copy in
        PostgreSQL)."""
        core = request_core(canonical)
        if not_embeddable(core) is not None:
            return None
        if not self.ready:
            await self._defer(entry_id, cache_key, params_key, canonical)
            return None
        try:  # the model is loaded: no wait beyond the lookups queued before it
            vector = await self.embedder.embed_one(core, urgent=False)  # lookups first
        except Exception as exc:  # noqa: BLE001 - the entry stays exact-only
            log.warning("embedding_failed", error=str(exc))
            return None
        return vector if await self._store(entry_id, cache_key, params_key, canonical,
                                           vector) else None

    async def _store(self, entry_id: str, cache_key: str, params_key: str, canonical: str,
                     vector: np.ndarray, *, swallow: bool = True) -> bool:
        """`swallow`: a store failure is logged and False (else it raises)."""
        record = Record(Meta(entry_id, self.partition(params_key), cache_key, canonical),
                        self.embedder.model, vector)
        try:
            if not await self.store.add(record):
                return False  # evicted already
        except (RedisError, OSError) as exc:
            if not swallow:
                raise
            log.warning("semantic_add_failed", error=str(exc))
            return False
        self.index.add(record.meta, vector)  # here at once; the log brings it to the others
        return True

    async def _defer(self, entry_id: str, cache_key: str, params_key: str,
                     canonical: str) -> None:
        self.deferring += 1
        try:
            kept = await self.store.defer(entry_id, cache_key=cache_key, params_key=params_key,
                                          prompt=canonical, limit=DEFERRED_MAX)
        except (RedisError, OSError) as exc:
            log.warning("semantic_add_failed", error=str(exc))
            return
        finally:
            self.deferring -= 1
        if kept < 0:
            await self.store.count("skipped:deferred_full")
            log.warning("semantic_deferred_full", limit=DEFERRED_MAX,
                        detail="entries stored while the model loads stay exact-only")
        else:
            log.debug("semantic_add_deferred", entry_id=entry_id)

    async def index_deferred(self) -> int:
        """Embed and index the entries stored while a model loaded (this worker's or any
        other's), until none is left. Returns how many joined the index. Runs once the model
        is ready; on an embedding or store failure the rest stay for the next `warm`."""
        if not self.ready:
            return 0
        added = 0
        try:
            while True:
                batch = await self.store.deferred(_DEFERRED_BATCH)
                if not batch:
                    if not self.deferring:
                        break
                    await asyncio.sleep(0.05)  # a defer() sent before `ready` is landing
                    continue
                usable = [(e, k, p, c) for e, k, p, c in batch
                          if k and not_embeddable(request_core(c)) is None]
                vectors = await self.embedder.embed_many(
                    [request_core(c) for _, _, _, c in usable], urgent=False) if usable else []
                embedded: list[ChangeEvent] = []
                for (entry_id, key, params_key, canonical), vector in zip(usable, vectors,
                                                                           strict=True):
                    if await self._store(entry_id, key, params_key, canonical, vector,
                                         swallow=False):
                        added += 1
                        embedded.append(ChangeEvent(
                            type="entry_embedded", entry_id=entry_id, at=time.time(),
                            cache_key=key, canonical_prompt=canonical, partition=params_key,
                            embedding_model=self.embedder.model,
                            embedding=base64.b64encode(
                                np.asarray(vector, dtype="<f4").tobytes()).decode()))
                if embedded and self.on_embedded is not None:
                    try:
                        await self.on_embedded(embedded)
                    except (RedisError, OSError) as exc:  # the index has them; only the copy
                        log.warning("semantic_embedded_not_published", error=str(exc),
                                    entries=len(embedded))
                await self.store.undefer([entry_id for entry_id, _, _, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the rest stay deferred for the next `warm`
            log.warning("semantic_deferred_failed", error=f"{type(exc).__name__}: {exc}"[:300],
                        indexed=added,
                        detail="the rest are indexed by the next worker to load its model")
        if added:
            log.info("semantic_deferred_indexed", entries=added)
        return added
