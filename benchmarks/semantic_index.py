"""Semantic index: search latency and memory at 100,000 entries, and storing new entries.

    .venv/bin/python benchmarks/semantic_index.py            # 100,000 entries (about 2 minutes)
    .venv/bin/python benchmarks/semantic_index.py --quick    # 20,000 entries
    .venv/bin/python benchmarks/semantic_index.py --skip-search --short-prompts --runtime onnx

What it measures (writes benchmarks/results/semantic-index-latest.json):
  store     3,000 real prompts (every prompt set in ../shared/data/prompts, DiffusionDB's long
            ones included; --short-prompts: only the 3-40-word sample) stored through
            SemanticTier.add on a real Valkey: embedding with the local model on one thread
            (--runtime, --threads), the shared vectors hash + log, this process's index; 64 at
            a time. Entries per second per worker. Every text is new to the embedder: the cold
            case (in the service, the entry a miss generated reuses its lookup's embedding).
  search    VectorIndex.search (top 5) in ONE params partition of N entries (the worst case:
            every entry made with the same params), queries = stored vectors plus noise:
            p50/p99 in ms. N is reached from the embedded real prompts plus perturbed copies
            (each a real prompt's vector plus Gaussian noise, renormalised), so the data has the
            clustered shape of real prompt embeddings.
  memory    VectorIndex.memory_bytes() and the process's RSS growth while the index was built.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.optimizer import load_all_prompts  # noqa: E402
from ops.demo import load_prompts, shared_prompts_dir  # noqa: E402
from ops.embedded_servers import EmbeddedValkey  # noqa: E402
from promptcache.keys import Keys  # noqa: E402
from promptcache.prompts import canonical_prompt  # noqa: E402
from consumers.wiring import streams_client  # noqa: E402
from promptcache.semantic.embeddings import (LOCAL_RUNTIMES, CachedEmbedder,  # noqa: E402
                                           LocalEmbedder)
from promptcache.semantic.index import Meta, VectorIndex  # noqa: E402
from promptcache.semantic.store import SemanticStore  # noqa: E402
from promptcache.semantic.tier import SemanticTier  # noqa: E402
from promptcache.semantic.verifier import request_core  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def store_phase(prompts: list[str], concurrency: int, threads: int = 1,
                      runtime: str = "onnx-int8", after_lookup: bool = False
                      ) -> tuple[dict[str, float], np.ndarray]:
    """Real prompts through SemanticTier.add on a real Valkey. `after_lookup`: each prompt was
    embedded first (untimed), as a miss's lookup does before its entry is stored."""
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedValkey(Path(tmp)).start()
        redis = streams_client(server.url)
        keys = Keys("bench")
        embedder = LocalEmbedder(threads=threads, runtime=runtime)
        try:
            store = SemanticStore(redis, keys)
            tier = SemanticTier(embedder=CachedEmbedder(embedder, shared=store),
                                index=VectorIndex(embedder.model, embedder.dim), store=store)
            await tier.warm()
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(len(prompts)):
                    pipe.hset(keys.entries, f"e{i}", "{}")  # registered entries
                await pipe.execute()
            semaphore = asyncio.Semaphore(concurrency)
            vectors: list[np.ndarray | None] = [None] * len(prompts)
            done = 0

            async def one(i: int, prompt: str) -> None:
                nonlocal done
                async with semaphore:
                    vectors[i] = await tier.add(entry_id=f"e{i}", cache_key=f"k{i}",
                                                params_key="p", canonical=prompt)
                done += 1
                if done % 500 == 0:
                    say(f"  store: {done}/{len(prompts)}")

            if after_lookup:
                say("  embedding every prompt first (the lookups), untimed ...")
                for prompt in prompts:
                    await tier.embedder.embed_one(request_core(prompt))
            started = time.perf_counter()
            await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            seconds = time.perf_counter() - started
            stored = [v for v in vectors if v is not None]
            shared = await redis.hlen(keys.semantic_vectors)
            return ({"entries": len(stored), "seconds": round(seconds, 2),
                     "entries_per_s": round(len(stored) / seconds, 1),
                     "shared_hash_entries": shared, "concurrency": concurrency,
                     "threads": threads, "runtime": runtime, "model": embedder.model,
                     "after_lookup": after_lookup,
                     "mean_chars": round(sum(map(len, prompts)) / len(prompts), 1)},
                    np.stack(stored))
        finally:
            await embedder.aclose()
            await redis.aclose()
            server.stop()


def _vectors(real: np.ndarray, size: int, seed: int) -> Iterator[np.ndarray]:
    """The index's contents in batches: the real vectors, then perturbed copies of them.
    Deterministic in `seed`, so the exact answer can be recomputed after memory is measured."""
    rng = np.random.default_rng(seed)
    added = 0
    while added < size:
        n = min(5000, size - added)
        base = real[rng.integers(0, len(real), n)]
        noisy = base + rng.normal(0, 0.04, base.shape).astype(np.float32)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        if added < len(real):  # the real vectors themselves first
            take = min(n, len(real) - added)
            noisy[:take] = real[added:added + take]
        yield noisy
        added += n


def search_phase(real: np.ndarray, size: int, queries: int, seed: int = 7
                 ) -> dict[str, float]:
    before = rss_mb()
    index = VectorIndex("bench-model", real.shape[1])
    started = time.perf_counter()
    added = 0
    for batch in _vectors(real, size, seed):
        for j in range(len(batch)):
            index.add(Meta(f"e{added + j}", "p", "k", "x" * 60), batch[j])
        added += len(batch)
        say(f"  index: {added}/{size} ({time.perf_counter() - started:.0f}s)")
    build_s = time.perf_counter() - started
    memory_mb = index.memory_bytes() / 1e6
    rss_growth = rss_mb() - before
    rng = np.random.default_rng(seed + 1)
    probes = [real[q % len(real)] + rng.normal(0, 0.02, real.shape[1]).astype(np.float32)
              for q in range(queries)]
    probes = [v / np.linalg.norm(v) for v in probes]
    timings = []
    found: list[list[int]] = []
    for vector in probes:
        t0 = time.perf_counter()
        top = index.search("p", vector, 5)
        timings.append((time.perf_counter() - t0) * 1000)
        found.append([int(n.meta.entry_id[1:]) for n in top])
    # recall against brute force (float32) over the same vectors. at 1: the search's first
    # answer is the true nearest, or exactly as similar (near-identical prompts tie);
    # 1@5: the true nearest is among the 5 candidates the verifier is shown
    # both rounded to float16 as the index stores them: the question is whether the graph
    # finds the nearest, not how float16 rounds
    everything = np.concatenate(list(_vectors(real, size, seed))).astype(np.float16)
    checked = np.stack(probes[:500]).astype(np.float16).astype(np.float32)
    everything = everything.astype(np.float32)
    exact = everything @ checked.T  # (entries, probes)
    best = exact.argmax(axis=0)
    at1 = [bool(f) and exact[f[0], q] >= exact[best[q], q] - 1e-5 for q, f in
           enumerate(found[:500])]
    at5 = [int(best[q]) in f or any(exact[i, q] >= exact[best[q], q] - 1e-5 for i in f)
           for q, f in enumerate(found[:500])]
    recall, recall5 = float(np.mean(at1)), float(np.mean(at5))
    return {"entries": len(index), "build_s": round(build_s, 1),
            "search_p50_ms": round(statistics.median(timings), 3),
            "search_p99_ms": round(pct(timings, 0.99), 3),
            "search_max_ms": round(max(timings), 3), "queries": queries,
            "recall_at_1": recall, "recall_1_at_5": recall5, "recall_queries": len(checked),
            "index_memory_mb": round(memory_mb, 1), "rss_growth_mb": round(rss_growth, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--store", type=int, default=None, help="real prompts to store")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="model threads (PROMPTCACHE_EMBEDDING_THREADS)")
    parser.add_argument("--runtime", choices=LOCAL_RUNTIMES, default="onnx-int8",
                        help="PROMPTCACHE_EMBEDDING_RUNTIME (default onnx-int8)")
    parser.add_argument("--skip-search", action="store_true", help="the store phase only")
    parser.add_argument("--after-lookup", action="store_true",
                        help="embed every prompt before the timed store, as a miss's lookup "
                             "does: the store path without the model")
    parser.add_argument("--short-prompts", action="store_true",
                        help="store only PartiPrompts and the ImageReward benchmark prompts of "
                             "3-40 words (the demo's sample), not every shared prompt set")
    args = parser.parse_args()
    size = args.size or (20_000 if args.quick else 100_000)
    n_store = args.store or (1000 if args.quick else 3000)
    shared = shared_prompts_dir()
    everything = [p for _, p in load_all_prompts(shared)] \
        if shared and not args.short_prompts else load_prompts()
    # every real prompt set (DiffusionDB's long prompts included), each prompt once
    prompts = list(dict.fromkeys(canonical_prompt(p) for p in everything if p.strip()))
    random.Random(7).shuffle(prompts)
    prompts = prompts[:n_store]
    load_start = os.getloadavg()[0]
    say(f"store: {len(prompts)} real prompts through SemanticTier.add ...")
    store, real = asyncio.run(store_phase(prompts, args.concurrency, args.threads,
                                          args.runtime, args.after_lookup))
    print(f"store   {store['entries']} entries in {store['seconds']} s = "
          f"{store['entries_per_s']} entries/s per worker with {args.threads} model thread(s), "
          f"runtime {args.runtime}, {'short' if args.short_prompts else 'all'} prompts"
          f"{', embeddings computed by the lookups' if args.after_lookup else ''} "
          f"(target >= 200)", flush=True)
    if args.skip_search:
        return 0
    say(f"search: building one partition of {size:,} entries ...")
    search = search_phase(real, size, 5000)
    report = {"at": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg_start": round(load_start, 2),
                          "loadavg_end": round(os.getloadavg()[0], 2)},
              "store": store, "search": search,
              "targets": {"search_p99_ms": 2.0, "store_entries_per_s": 200,
                          "index_memory_mb_at_100k": 200}}
    print(f"search  {search['entries']:,} entries in one partition: p50 "
          f"{search['search_p50_ms']} ms, p99 {search['search_p99_ms']} ms (target <= 2), "
          f"recall@1 {search['recall_at_1']:.1%}, true nearest in the top 5 "
          f"{search['recall_1_at_5']:.1%} (against brute force)")
    print(f"memory  index {search['index_memory_mb']} MB, RSS growth "
          f"{search['rss_growth_mb']} MB (target <= 200 MB at 100k)")
    print(f"load average {load_start:.2f} -> {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "semantic-index-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
