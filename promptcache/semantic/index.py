"""The in-process vector index: one partition per (embedding model, params partition).

Params are a hard partition: only entries made with the same normalised params, negative prompt
and optimizer version (and embedded by the same model) are ever compared. A partition starts as
a float32 matrix searched exactly (a thousand rows cost tens of microseconds); past
`ann_threshold` rows it moves into a usearch HNSW graph (float16 vectors, cosine), which keeps
search under a millisecond at 100,000 entries and halves the vectors' memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ANN_THRESHOLD = 1024


@dataclass(frozen=True, slots=True)
class Meta:
    entry_id: str
    partition: str
    cache_key: str
    prompt: str


@dataclass(frozen=True, slots=True)
class Neighbour:
    meta: Meta
    similarity: float


class _Flat:
    """Exact search over a growing float32 matrix; removal swaps in the last row."""

    def __init__(self, dim: int) -> None:
        self.vectors = np.zeros((1, dim), dtype=np.float32)  # doubles as it grows
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, entry_id: str, vector: np.ndarray) -> None:
        n = len(self.ids)
        if n == len(self.vectors):
            grown = np.zeros((2 * n, self.vectors.shape[1]), dtype=np.float32)
            grown[:n] = self.vectors
            self.vectors = grown
        self.vectors[n] = vector
        self.ids.append(entry_id)

    def remove(self, entry_id: str) -> None:
        i = self.ids.index(entry_id)
        last = len(self.ids) - 1
        self.vectors[i] = self.vectors[last]
        self.ids[i] = self.ids[last]
        self.ids.pop()

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        n = len(self.ids)
        if n == 0:
            return []
        scores = self.vectors[:n] @ vector
        top = np.argpartition(-scores, k - 1)[:k] if n > k else np.arange(n)
        return [(self.ids[i], float(scores[i])) for i in top]

    def nbytes(self) -> int:
        return int(self.vectors.nbytes)


class _Graph:
    """usearch HNSW (cosine, float16) with integer labels mapped to entry ids."""

    def __init__(self, dim: int) -> None:
        # onnxruntime must be loaded before usearch: the other way round, importing onnxruntime
        # segfaults (usearch 2.26 / onnxruntime 1.32, seen here); the local embedder needs it
        import onnxruntime  # noqa: F401
        from usearch.index import Index

        # connectivity 20, not usearch's 16: with many variants of one popular prompt (a real
        # vector and its perturbed copies, benchmarks/semantic_index.py), 16 left 9% of the
        # prompts unreachable (their true nearest not in the top 5); 20 found all, in the same
        # memory
        self.index = Index(ndim=dim, metric="cos", dtype="f16", connectivity=20,
                           expansion_add=128, expansion_search=128)
        self.labels: dict[int, str] = {}
        self.label_of: dict[str, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, entry_id: str, vector: np.ndarray) -> None:
        self.add_many([entry_id], vector[None, :])

    def add_many(self, ids: list[str], vectors: np.ndarray) -> None:
        labels = np.arange(self._next, self._next + len(ids), dtype=np.uint64)
        self._next += len(ids)
        self.index.add(labels, np.asarray(vectors, dtype=np.float32), threads=1)
        for label, entry_id in zip(labels.tolist(), ids, strict=True):
            self.labels[label] = entry_id
            self.label_of[entry_id] = label

    def remove(self, entry_id: str) -> None:
        label = self.label_of.pop(entry_id)
        del self.labels[label]
        self.index.remove(label)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        if not self.labels:
            return []
        matches = self.index.search(vector.astype(np.float32), k, threads=1)
        return [(self.labels[int(label)], 1.0 - float(distance))
                for label, distance in zip(matches.keys, matches.distances, strict=True)
                if int(label) in self.labels]

    def nbytes(self) -> int:
        return int(self.index.memory_usage)


class VectorIndex:
    """Entries of one embedding model, partitioned by params."""

    def __init__(self, model: str, dim: int, ann_threshold: int = ANN_THRESHOLD) -> None:
        self.model = model
        self.dim = dim
        self.ann_threshold = ann_threshold
        self._parts: dict[str, _Flat | _Graph] = {}
        self._meta: dict[str, Meta] = {}

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._meta

    def ids(self) -> list[str]:
        return list(self._meta)

    def size(self, partition: str) -> int:
        part = self._parts.get(partition)
        return len(part) if part is not None else 0

    @property
    def partitions(self) -> int:
        return len(self._parts)

    def add(self, meta: Meta, vector: np.ndarray) -> bool:
        """Add (idempotent by entry id). False when the vector does not fit this index."""
        if vector.shape != (self.dim,) or meta.entry_id in self._meta:
            return False
        part = self._parts.get(meta.partition)
        if part is None:
            part = self._parts[meta.partition] = _Flat(self.dim)
        part.add(meta.entry_id, vector)
        self._meta[meta.entry_id] = meta
        if isinstance(part, _Flat) and len(part) > self.ann_threshold:
            self._parts[meta.partition] = self._to_graph(part)
        return True

    def _to_graph(self, flat: _Flat) -> _Graph:
        graph = _Graph(self.dim)
        graph.add_many(list(flat.ids), flat.vectors[:len(flat)])
        return graph

    def remove(self, entry_id: str) -> bool:
        meta = self._meta.pop(entry_id, None)
        if meta is None:
            return False
        part = self._parts[meta.partition]
        part.remove(entry_id)
        if len(part) == 0:
            del self._parts[meta.partition]
        return True

    def search(self, partition: str, vector: np.ndarray, k: int = 5) -> list[Neighbour]:
        """The k nearest entries of the partition, most similar first."""
        part = self._parts.get(partition)
        if part is None or vector.shape != (self.dim,):
            return []
        found = part.search(vector, min(k, len(part)))
        found.sort(key=lambda pair: -pair[1])
        return [Neighbour(self._meta[entry_id], similarity) for entry_id, similarity in found
                if entry_id in self._meta]

    def memory_bytes(self) -> int:
        """Vectors and graphs, plus an estimate of the per-entry bookkeeping."""
        vectors = sum(part.nbytes() for part in self._parts.values())
        meta = sum(200 + len(m.prompt) + 64 for m in self._meta.values())
        return vectors + meta
