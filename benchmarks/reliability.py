"""Reliability benchmarks (issue 6): a real Valkey, a real in-process Worker, procedural images.

    .venv/bin/python benchmarks/reliability.py            # about a minute
    .venv/bin/python benchmarks/reliability.py --rounds 3 # medians over more rounds

(a) cache store down: CACHE_REDIS_URL points at a port where nothing listens. K distinct
    requests at once against a generator with a fixed latency L and N backend slots
    (`generator_max_concurrency`), more generation slots than that (so the generator is the
    bound). Throughput vs the generator's own limit N / L, and vs the same run with the cache up.
(b) flaky generator: exact hits at a fixed rate while misses run against a generator that
    fails 30% of calls (behind the circuit breaker), vs a healthy generator. Exact-hit latency
    (the result's `latency_ms`) p50/p99.

Prints a table and writes benchmarks/results/reliability-latest.json. The machine is shared
(2 cores): quote medians over rounds and ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import structlog  # noqa: E402

from promptcache.config import Settings  # noqa: E402
from ops.embedded_servers import EmbeddedValkey, free_port  # noqa: E402
from promptcache.errors import GeneratorUnavailable  # noqa: E402
from promptcache.generators import guarded  # noqa: E402
from promptcache.generators.base import GeneratedImage, GenerationRequest  # noqa: E402
from promptcache.generators.procedural import ProceduralGenerator  # noqa: E402
from promptcache.keys import Keys  # noqa: E402
from consumers.wiring import build_worker, cache_client  # noqa: E402
from schemas.events import Request, Result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Flaky:
    """The procedural generator, failing a share of calls after the same latency."""

    name = "procedural"
    default_model = "procedural-v1"
    truncates_prompt = False

    def __init__(self, latency_ms: int, error_rate: float, seed: int = 6) -> None:
        self.inner = ProceduralGenerator(latency_ms=latency_ms)
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.calls = 0

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        self.calls += 1
        image = await self.inner.generate(request)
        if self.rng.random() < self.error_rate:
            raise GeneratorUnavailable("flaky backend: HTTP 500")
        return image

    async def aclose(self) -> None:
        return None


def settings_for(url: str, keys: Keys, data: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = dict(redis_url=url, prefix=keys.prefix, data_dir=data,
                                  block="100ms", claim_idle="30s", health_interval="60s",
                                  embeddings="off")
    values.update(extra)
    return Settings(_env_file=None, **values)


async def collect(redis: aioredis.Redis, keys: Keys, n: int, timeout: float) -> list[Result]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await redis.xlen(keys.results) >= n:
            break
        await asyncio.sleep(0.02)
    return [Result.model_validate_json(f[b"data"]) for _, f in await redis.xrange(keys.results)]


async def throughput(url: str, tmp: Path, *, cache_down: bool, k: int, latency_ms: int,
                     slots: int) -> dict[str, Any]:
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    settings = settings_for(url, keys, tmp / keys.prefix, generator_max_concurrency=slots,
                            generation_concurrency=slots * 3)
    redis = aioredis.Redis.from_url(url)
    cache = cache_client(f"redis://127.0.0.1:{free_port()}/0", settings) if cache_down else redis
    gen = guarded(ProceduralGenerator(latency_ms=latency_ms), settings)
    worker = build_worker(settings, redis=redis, cache_redis=cache, generator=gen)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.3)
    started = time.monotonic()
    for i in range(k):
        await redis.xadd(keys.requests, {"data": Request(
            request_id=f"t{i}", prompt=f"a distinct picture number {i}").model_dump_json()})
    got = await collect(redis, keys, k, timeout=60 + k * latency_ms / 1000)
    elapsed = time.monotonic() - started
    worker.stop()
    await task
    if cache is not redis:
        await cache.aclose()
    await redis.aclose()
    tiers = sorted({r.cache or r.status for r in got})
    return {"answered": len(got), "seconds": round(elapsed, 3), "per_s": round(len(got) / elapsed, 2),
            "limit_per_s": round(slots / (latency_ms / 1000), 2), "tiers": tiers}


async def hits_under_misses(url: str, tmp: Path, *, error_rate: float, rate: float,
                            duration: float, miss_share: float) -> dict[str, Any]:
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    settings = settings_for(url, keys, tmp / keys.prefix)
    redis = aioredis.Redis.from_url(url)
    inner = Flaky(latency_ms=300, error_rate=error_rate)
    gen = guarded(inner, settings)
    worker = build_worker(settings, redis=redis, cache_redis=redis, generator=gen)
    task = asyncio.create_task(worker.run())
    warm = [f"a warm picture number {i}" for i in range(20)]
    for i, prompt in enumerate(warm):
        await redis.xadd(keys.requests, {"data": Request(
            request_id=f"w{i}", prompt=prompt).model_dump_json()})
    await collect(redis, keys, len(warm), timeout=60)
    sent, hit_ids = 0, set()
    t0 = time.monotonic()
    n = int(rate * duration)
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        if (i * miss_share) % 1 + miss_share >= 1:  # evenly spread misses
            prompt, rid = f"a new picture {i} {uuid.uuid4().hex[:6]}", f"m{i}"
        else:
            prompt, rid = warm[i % len(warm)].upper() + ".", f"h{i}"
            hit_ids.add(rid)
        await redis.xadd(keys.requests, {"data": Request(request_id=rid, prompt=prompt)
                                         .model_dump_json()})
        sent += 1
    got = await collect(redis, keys, len(warm) + sent, timeout=60)
    worker.stop()
    await task
    await redis.aclose()
    hits = [r.latency_ms for r in got if r.request_id in hit_ids and r.cache == "exact"]
    misses = [r for r in got if r.request_id.startswith("m")]
    return {"error_rate": error_rate, "hits": len(hits),
            "hit_p50_ms": round(float(np.percentile(hits, 50)), 2),
            "hit_p99_ms": round(float(np.percentile(hits, 99)), 2),
            "misses": len(misses), "misses_failed": sum(r.status == "failed" for r in misses),
            "generator_calls": inner.calls, "breaker": gen.breaker.state}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--latency-ms", type=int, default=250)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    report: dict[str, Any] = {"params": vars(args), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmpdir:
        tmp = Path(tmpdir)
        valkey = EmbeddedValkey(tmp / "valkey").start()
        try:
            for _ in range(args.rounds):
                common = dict(k=args.requests, latency_ms=args.latency_ms, slots=args.slots)
                report["rounds"].append({
                    "cache_down": await throughput(valkey.url, tmp, cache_down=True, **common),
                    "cache_up": await throughput(valkey.url, tmp, cache_down=False, **common),
                    "healthy": await hits_under_misses(valkey.url, tmp, error_rate=0.0,
                                                       rate=args.rate, duration=args.duration,
                                                       miss_share=0.1),
                    "flaky": await hits_under_misses(valkey.url, tmp, error_rate=0.3,
                                                     rate=args.rate, duration=args.duration,
                                                     miss_share=0.1)})
        finally:
            valkey.stop()

    def med(path: tuple[str, str]) -> float:
        return float(np.median([r[path[0]][path[1]] for r in report["rounds"]]))

    summary = {
        "cache_down_per_s": med(("cache_down", "per_s")),
        "cache_up_per_s": med(("cache_up", "per_s")),
        "generator_limit_per_s": round(args.slots / (args.latency_ms / 1000), 2),
        "healthy_hit_p50_ms": med(("healthy", "hit_p50_ms")),
        "healthy_hit_p99_ms": med(("healthy", "hit_p99_ms")),
        "flaky_hit_p50_ms": med(("flaky", "hit_p50_ms")),
        "flaky_hit_p99_ms": med(("flaky", "hit_p99_ms")),
    }
    summary["cache_down_vs_limit"] = round(summary["cache_down_per_s"]
                                           / summary["generator_limit_per_s"], 3)
    summary["flaky_vs_healthy_hit_p99"] = round(summary["flaky_hit_p99_ms"]
                                                / summary["healthy_hit_p99_ms"], 3)
    report["summary"] = summary
    report["machine"] = {"nproc": subprocess.run(["nproc"], capture_output=True, text=True)
                         .stdout.strip(), "python": platform.python_version()}
    report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                      capture_output=True, text=True).stdout.strip()
    print(f"(a) cache store down: {summary['cache_down_per_s']}/s answered (bypass) vs the "
          f"generator's limit {summary['generator_limit_per_s']}/s "
          f"(ratio {summary['cache_down_vs_limit']}); cache up: {summary['cache_up_per_s']}/s")
    print(f"(b) exact hits while 10% misses hit the generator: healthy p50 "
          f"{summary['healthy_hit_p50_ms']} ms p99 {summary['healthy_hit_p99_ms']} ms; "
          f"30% errors p50 {summary['flaky_hit_p50_ms']} ms p99 {summary['flaky_hit_p99_ms']} ms "
          f"(p99 ratio {summary['flaky_vs_healthy_hit_p99']})")
    print(f"medians over {args.rounds} rounds")
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "reliability-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
