"""`promptcache check`: the five promises the service was built against, measured, as a table.

1. hit rate > 70% for similar prompts: `count` generations of real prompts, 30% of them
   rewrites of earlier ones (the dev pairs of ../shared/eval/dev/positives.jsonl: real prompts
   and a rewrite a user would accept the same image for); the hit rate on those, and how many
   of the pairs plain cosine >= 0.85 (what other semantic caches do) would accept;
2. hits answered in < 500 ms against > 2 s for generation: p50 / p99 of hits and misses;
3. prompt optimisation improves quality scores by > 15%: `promptcache ab` on a small sample
   (BRISQUE); on the procedural stand-in the figure means nothing, and the promise fails;
4. storage stays under its cap, with TTL clean-up: a flood of distinct prompts under a small
   cap (bytes on disk and in the account, sampled throughout), then the janitor's TTL passes;
5. graceful degradation: with the cache store stopped, requests are still generated (`bypass`)
   and every one is answered.

Without REDIS_URL (or a running `promptcache up`) it starts its own stack under
`<data dir>/check` (two workers, the janitor, the web process, a separate cache Valkey it can
stop, a small cap and a short TTL) and runs all five. Against a running stack it runs 1-3 only:
4 and 5 would need to change its cap and stop its cache store.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import random
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
from pydantic import ByteSize

from consumers.wiring import build_semantic, streams_client
from ops.demo import load_prompts, shared_prompts_dir
from ops.embedded_servers import EmbeddedValkey, free_port
from promptcache.client import collect_many, last_ids, publish, results_streams
from promptcache.config import Settings
from promptcache.errors import ConfigError
from promptcache.keys import Keys
from schemas.events import Request, Result

CAP_BYTES = 3_000_000  # the small cap of promise 4 (the check's own stack)
TTL_S = 45  # the check's own stack: entries expire this long after their last use
FLOOD = 120  # distinct prompts of promise 4
OUTAGE = 12  # requests sent while the cache store is down (promise 5)
HIT_TIERS = ("exact", "semantic", "coalesced")
WORKERS = 2  # of the check's own stack


@dataclass
class Line:
    number: int
    promise: str
    figure: str
    ok: bool | None  # None: not run

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "not run"}[self.ok]


@dataclass
class Outcome:
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        width = max(len(line.promise) for line in self.lines)
        out = [f"{'#':<2} {'promise':<{width}}  {'verdict':<8} measured", "-" * (width + 70)]
        for line in self.lines:
            figure = line.figure.splitlines() or [""]
            out.append(f"{line.number:<2} {line.promise:<{width}}  {line.verdict:<8} {figure[0]}")
            out += [f"{'':<{width + 14}}{more}" for more in figure[1:]]
        return "\n".join(out + [f"note: {n}" for n in self.notes])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _dev_pairs(name: str) -> list[dict[str, str]]:
    path = None if (prompts := shared_prompts_dir()) is None else \
        prompts.parent.parent / "eval" / "dev" / name
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rewrite_pairs(count: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(cached prompt, rewrite, kind) from the dev positives, else the demo's rewording."""
    if pairs := _dev_pairs("positives.jsonl"):
        return [(p["a"], p["b"], p["kind"]) for p in rng.sample(pairs, count)]
    from ops.demo import reword

    return [(p, reword(p, rng), "reworded") for p in rng.sample(load_prompts(), count)]


async def _ask(redis: aioredis.Redis, keys: Keys, requests: list[Request],
               timeout: float = 600.0) -> dict[str, Result]:
    after = await last_ids(redis, results_streams(keys))
    await publish(redis, keys, requests)
    return await collect_many(redis, after, [r.request_id for r in requests], timeout)


async def hit_rate_and_latency(redis: aioredis.Redis, keys: Keys, settings: Settings,
                               count: int, rng: random.Random,
                               say: Callable[[str], None]) -> tuple[Line, Line, list[str]]:
    """Promises 1 and 2."""
    run = uuid.uuid4().hex[:6]
    repeated = round(count * 0.3)
    pairs = rewrite_pairs(repeated, rng)
    cached = {a for a, _, _ in pairs}
    others = [p for p in load_prompts() if p not in cached]
    fresh = [a for a, _, _ in pairs] + rng.sample(others, count - 2 * repeated)
    rng.shuffle(fresh)
    say(f"check 1-2: {len(fresh)} distinct real prompts, then {repeated} rewrites of earlier "
        "ones ...")
    first = [Request(request_id=f"check-{run}-a{i}", prompt=p) for i, p in enumerate(fresh)]
    results = await _ask(redis, keys, first)
    later = [Request(request_id=f"check-{run}-b{i}", prompt=b) for i, (_, b, _) in
             enumerate(pairs)]
    rewrites = await _ask(redis, keys, later)
    answered = {**results, **rewrites}
    hits = [r for r in rewrites.values() if r.cache in HIT_TIERS]
    by_tier: dict[str, int] = {}
    for r in rewrites.values():
        by_tier[r.cache or r.status] = by_tier.get(r.cache or r.status, 0) + 1
    missed_kinds = sorted({kind for (_, _, kind), req in zip(pairs, later, strict=True)
                           if (res := rewrites.get(req.request_id)) is None
                           or res.cache not in HIT_TIERS})
    rate = len(hits) / repeated if repeated else 0.0
    near = [(p["a"], p["b"]) for p in rng.sample(negs, min(repeated, len(negs)))] \
        if (negs := _dev_pairs("negatives.jsonl")) else []
    accepted = await plain_cosine([(a, b) for a, b, _ in pairs] + near, settings, redis)
    cosine = None if accepted is None else sum(accepted[:repeated])
    wrong = None if accepted is None else sum(accepted[repeated:])
    figure = (f"{rate:.0%} of {repeated} rewrites (sent at once) hit ({', '.join(f'{k} {v}' for k, v in sorted(by_tier.items()))})"
              + (f"\nmissed kinds: {', '.join(missed_kinds)}" if missed_kinds else "")
              + (f"\nplain cosine >= 0.85 would accept {cosine}/{repeated} of these pairs"
                 + (f", and {wrong}/{len(near)} near-misses that change the picture (dev "
                    "negatives: colour, count, animal, ...)" if near else "")
                 if cosine is not None else "\nplain cosine: no embedding model (EMBEDDINGS=off)"))
    one = Line(1, "hit rate > 70% for similar prompts", figure, rate > 0.70)
    hit_ms = [r.latency_ms for r in answered.values()
              if r.cache in HIT_TIERS and r.latency_ms is not None]
    miss_ms = [r.latency_ms for r in answered.values()
               if r.cache == "miss" and r.latency_ms is not None]
    two = Line(2, "hits < 500 ms, generation > 2 s",
               f"hits p50 {percentile(hit_ms, 50):.0f} ms, p99 {percentile(hit_ms, 99):.0f} ms "
               f"(n={len(hit_ms)})\nmisses p50 {percentile(miss_ms, 50):.0f} ms, p99 "
               f"{percentile(miss_ms, 99):.0f} ms (n={len(miss_ms)})",
               bool(hit_ms) and percentile(hit_ms, 99) < 500
               and (not miss_ms or percentile(miss_ms, 50) > percentile(hit_ms, 99)))
    notes = []
    if settings.generator == "procedural":
        notes.append(f"2: misses are the procedural stand-in's simulated "
                     f"{settings.generator_latency_ms} ms, not a model's")
    lost = count - len(answered)
    if lost:
        notes.append(f"1-2: {lost} of {count} requests got no result in time")
    return one, two, notes


async def plain_cosine(pairs: list[tuple[str, str]], settings: Settings,
                       redis: aioredis.Redis) -> list[bool] | None:
    """Which pairs the bare model's cosine >= 0.85 accepts (no verifier, no canonical form)."""
    tier = build_semantic(settings, redis)
    if tier is None:
        return None
    try:
        await tier.embedder.load()
        vectors = await tier.embedder.embed_many([t for pair in pairs for t in pair])
    finally:
        await tier.embedder.aclose()
    return [float(np.dot(vectors[2 * i], vectors[2 * i + 1])) >= 0.85
            for i in range(len(pairs))]


def optimizer_quality(settings: Settings, say: Callable[[str], None]) -> tuple[Line, str | None]:
    """Promise 3: `promptcache ab` on 8 prompts, BRISQUE only."""
    from ops.ab import missing_extra

    promise = "prompt optimisation > 15% better quality"
    if missing := missing_extra():
        return Line(3, promise, f"not measured: the ab extra is missing ({', '.join(missing)})",
                    False), None
    from ops.ab.command import AbOptions, ab

    say("check 3: promptcache ab on 8 prompts (BRISQUE) ...")
    report = asyncio.run(ab(settings, AbOptions(limit=8, no_clip=True, progress=False)))
    if not report.metrics:
        return Line(3, promise, "no image scored", False), None
    metric = report.metrics[0]
    sign = -1 if metric.better == "lower" else 1
    change = sign * metric.interval.mean / abs(metric.raw_mean) if metric.raw_mean else 0.0
    figure = (f"{metric.label}: {change:+.1%} (raw {metric.raw_mean:.1f}, optimised "
              f"{metric.optimised_mean:.1f}, n={metric.interval.n})")
    if settings.generator == "procedural":
        return Line(3, promise, figure + "\nmeans nothing: the procedural generator draws shapes"
                    " from a hash, not the prompt", False), (
            "3: set PROMPTCACHE_GENERATOR to a real model to measure the optimizer")
    low = metric.interval.low
    significant = low is not None and (sign * low > 0 if sign > 0 else
                                       sign * (metric.interval.high or 0) > 0)
    return Line(3, promise, figure, change > 0.15 and significant), None


def _tree_bytes(*dirs: Path) -> int:
    total = 0
    for directory in dirs:
        for root, _, files in os.walk(directory):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
    return total


async def storage_cap(redis: aioredis.Redis, cache: aioredis.Redis, keys: Keys,
                      settings: Settings, say: Callable[[str], None]) -> Line:
    """Promise 4 on the check's own stack (cap CAP_BYTES, TTL TTL_S)."""
    run = uuid.uuid4().hex[:6]
    prompts = random.Random(4).sample(load_prompts(), FLOOD)
    say(f"check 4: a flood of {FLOOD} distinct prompts under a {CAP_BYTES / 1e6:.1f} MB cap ...")
    peak_account = peak_disk = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak_account, peak_disk
        while not done.is_set():
            peak_account = max(peak_account, int(await cache.get(keys.stored_bytes) or 0))
            peak_disk = max(peak_disk, await asyncio.to_thread(
                _tree_bytes, settings.images_dir, settings.thumbnails_dir))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    results = await _ask(redis, keys, [Request(request_id=f"flood-{run}-{i}", prompt=p)
                                       for i, p in enumerate(prompts)])
    done.set()
    await sampler
    entries = await cache.hlen(keys.entries)
    say(f"check 4: waiting for the janitor's TTL pass ({TTL_S} s after the last use) ...")
    started = time.monotonic()
    while time.monotonic() - started < TTL_S + 60 and await cache.hlen(keys.entries):
        await asyncio.sleep(1)
    left = await cache.hlen(keys.entries)
    disk_after = _tree_bytes(settings.images_dir, settings.thumbnails_dir)
    # plus what each worker may keep of images written during a cache-store outage
    allowance = CAP_BYTES * (1 + settings.bypass_share * WORKERS)
    ok = peak_account <= CAP_BYTES and peak_disk <= allowance and left == 0 and \
        len(results) == FLOOD
    return Line(4, "storage under its cap, TTL clean-up",
                f"peak account {peak_account / 1e6:.2f} MB, peak on disk {peak_disk / 1e6:.2f} "
                f"MB, cap {CAP_BYTES / 1e6:.2f} MB (on disk {allowance / 1e6:.2f} MB with "
                f"{WORKERS} workers' outage images)\n{len(results)}/{FLOOD} answered, "
                f"{entries} entries kept; TTL pass: {left} entries left "
                f"{time.monotonic() - started:.0f} s later, {disk_after / 1e6:.2f} MB on disk",
                ok)


async def degradation(redis: aioredis.Redis, keys: Keys, cache_server: EmbeddedValkey,
                      say: Callable[[str], None]) -> Line:
    """Promise 5: the cache store stopped, requests still generated and all answered."""
    run = uuid.uuid4().hex[:6]
    prompts = random.Random(5).sample(load_prompts(), OUTAGE)
    say(f"check 5: cache store stopped, {OUTAGE} requests ...")
    dead_before = await _dead_letters(redis, keys)
    cache_server.stop()
    try:
        results = await _ask(redis, keys, [Request(request_id=f"outage-{run}-{i}", prompt=p)
                                           for i, p in enumerate(prompts)], timeout=300)
    finally:
        cache_server.start()
    tiers: dict[str, int] = {}
    for r in results.values():
        tiers[f"{r.status}/{r.cache}"] = tiers.get(f"{r.status}/{r.cache}", 0) + 1
    dead = await _dead_letters(redis, keys) - dead_before
    ok = len(results) == OUTAGE and all(r.status == "ok" and r.cache == "bypass"
                                        for r in results.values()) and dead == 0
    return Line(5, "cache store down -> bypass, nothing lost",
                f"{len(results)}/{OUTAGE} answered ({', '.join(f'{k} {v}' for k, v in sorted(tiers.items()))}), "
                f"{dead} dead letters", ok)


async def _dead_letters(redis: aioredis.Redis, keys: Keys) -> int:
    return sum([await redis.xlen(shard.dead_letter) for shard in keys.all_shards()])


async def models_ready(redis: aioredis.Redis, cache: aioredis.Redis, keys: Keys,
                       timeout: float = 180.0) -> bool:
    """True once every worker process with a health report has reported its semantic index
    (its model is loaded): a worker still loading answers lookups exact-only. (A process
    reports its health once per shard, `consumer/shard`, and its index once.)"""
    deadline = time.monotonic() + timeout
    prefix = keys.health("")
    while time.monotonic() < deadline:
        workers = {k.decode()[len(prefix):].split("/")[0]
                   async for k in redis.scan_iter(match=keys.health("*"), count=100)}
        indexes = [k async for k in cache.scan_iter(match=keys.semantic_index_stats("*"),
                                                    count=100)]
        if workers and len(indexes) >= len(workers):
            return True
        await asyncio.sleep(0.5)
    return False


async def _against(settings: Settings, redis_url: str, count: int, seed: int,
                   say: Callable[[str], None], *, cache_server: EmbeddedValkey | None,
                   outcome: Outcome) -> None:
    keys = settings.keys()
    redis = streams_client(redis_url, cluster=keys.cluster)
    cache = streams_client(settings.effective_cache_redis_url or redis_url,
                           cluster=keys.cache_is_cluster)
    try:
        if settings.embeddings != "off":
            say("waiting for every worker's embedding model ...")
            if not await models_ready(redis, cache, keys):
                outcome.notes.append("not every worker reported its semantic index within "
                                     "180 s: some lookups were exact-only")
        one, two, notes = await hit_rate_and_latency(redis, keys, settings, count,
                                                     random.Random(seed), say)
        outcome.lines += [one, two]
        outcome.notes += notes
        if cache_server is not None:
            outcome.lines.append(await degradation(redis, keys, cache_server, say))
            outcome.lines.append(await storage_cap(redis, cache, keys, settings, say))
    finally:
        await redis.aclose()
        await cache.aclose()


def check(settings: Settings, *, count: int = 100, seed: int = 17,
          say: Callable[[str], None] = print) -> Outcome:
    outcome = Outcome()
    if settings.redis_url:
        say(f"check: against the running stack at {settings.redis_url}")
        asyncio.run(_against(settings, settings.redis_url, count, seed, say, cache_server=None,
                             outcome=outcome))
        outcome.lines += [
            Line(4, "storage under its cap, TTL clean-up", "needs a small cap: run `promptcache "
                 "check` with no stack running (it starts its own)", None),
            Line(5, "cache store down -> bypass, nothing lost", "would stop the running cache "
                 "store: run `promptcache check` with no stack running", None)]
    else:
        _own_stack(settings, count, seed, say, outcome)
    line, note = optimizer_quality(settings, say)
    outcome.lines.append(line)
    if note:
        outcome.notes.append(note)
    outcome.lines.sort(key=lambda x: x.number)
    return outcome


def _own_stack(settings: Settings, count: int, seed: int, say: Callable[[str], None],
               outcome: Outcome) -> None:
    base = settings.data_dir / "check"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(settings.data_dir / "check.lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"another `promptcache check` is running on "
                          f"{settings.data_dir}") from None

    def interrupted(signum: int, _frame: object) -> None:  # SIGTERM/SIGHUP: clean up too
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _run_own_stack(settings, base, count, seed, say, outcome)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.close()


def _run_own_stack(settings: Settings, base: Path, count: int, seed: int,
                   say: Callable[[str], None], outcome: Outcome) -> None:
    from ops.up import Stack

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    if (settings.data_dir / "models").is_dir():  # the exported embedding model: not again
        (base / "models").symlink_to((settings.data_dir / "models").resolve())
    web_port = free_port()
    cache_server = EmbeddedValkey(base / "cache-valkey").start()
    env = {"CACHE_REDIS_URL": cache_server.url, "PROMPTCACHE_STORAGE_LIMIT": str(CAP_BYTES),
           "PROMPTCACHE_TTL": f"{TTL_S}s", "PROMPTCACHE_JANITOR_INTERVAL": "2s",
           "PROMPTCACHE_WEB_PORT": str(web_port), "PROMPTCACHE_HEALTH_INTERVAL": "2s",
           "PROMPTCACHE_LOG_LEVEL": "ERROR"}
    own = settings.model_copy(update={
        "data_dir": base, "cache_redis_url": cache_server.url, "web_port": web_port,
        "storage_limit": ByteSize(CAP_BYTES), "ttl": timedelta(seconds=TTL_S),
        "embedded_redis_port": 0, "public_url": None, "redis_url": None, "database_url": None})
    stack = Stack(own, workers=WORKERS, say=lambda _: None, extra_env=env)
    say(f"check: starting a stack of its own under {base} (two workers, cap "
        f"{CAP_BYTES / 1e6:.1f} MB, TTL {TTL_S} s) ...")
    try:
        started = stack.start()
        own = own.model_copy(update={"redis_url": started["REDIS_URL"],
                                     "database_url": started["DATABASE_URL"]})
        asyncio.run(_against(own, started["REDIS_URL"], count, seed, say,
                             cache_server=cache_server, outcome=outcome))
    finally:
        stack.shutdown()
        cache_server.stop()
