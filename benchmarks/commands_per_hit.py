"""Redis commands per exact hit on the request stage (issue 13's profile counted 14 commands in 5
round trips per hit): `INFO commandstats` around a flood of exact hits answered by one worker.

    .venv/bin/python benchmarks/commands_per_hit.py [--hits 2000] [--batch-size 100]

Starts its own Valkey (embedded), runs one worker in this process (no persister, no semantic
tier: the hit path only), prints commands per hit and writes
benchmarks/results/commands-per-hit-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consumers.wiring import build_worker  # noqa: E402
from ops.embedded_servers import EmbeddedValkey  # noqa: E402
from promptcache import logs  # noqa: E402
from promptcache.config import Settings  # noqa: E402
from promptcache.generators import build_generator  # noqa: E402
from promptcache.keys import Keys  # noqa: E402
from schemas.events import Request  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


async def _commandstats(redis: aioredis.Redis) -> dict[str, int]:
    info = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


async def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="promptcache-cmds-") as tmp:
        valkey = EmbeddedValkey(Path(tmp) / "valkey").start()
        redis = aioredis.Redis.from_url(valkey.url)
        try:
            settings = Settings(_env_file=None, redis_url=valkey.url, prefix="bench",  # type: ignore[call-arg]
                                data_dir=Path(tmp) / "data", generator_latency_ms=0,
                                embeddings="off", batch_size=args.batch_size)
            keys = Keys(settings.prefix)
            prompts = [f"a lighthouse number {i} at dusk" for i in range(args.warm)]

            async def send(prefix: str, count: int) -> None:
                async with redis.pipeline(transaction=False) as pipe:
                    for i in range(count):
                        request = Request(request_id=f"{prefix}-{i}",
                                          prompt=prompts[i % len(prompts)])
                        pipe.xadd(keys.requests, {"data": request.model_dump_json()})
                    await pipe.execute()

            async def answer() -> None:
                generator = build_generator(settings)
                worker = build_worker(settings, redis=redis, cache_redis=redis,
                                      generator=generator)
                await worker.run(burst=True)
                await generator.aclose()

            await send("warm", args.warm)
            await answer()
            await send("prime", args.warm)  # memoise `prepare`, load the scripts
            await answer()
            await send("hit", args.hits)
            before = await _commandstats(redis)
            started = time.perf_counter()
            await answer()
            seconds = time.perf_counter() - started
            after = await _commandstats(redis)
            calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            calls = {k: v for k, v in sorted(calls.items()) if v > 0 and k != "info"}
            results = await redis.xlen(keys.results)
        finally:
            await redis.aclose()
            valkey.stop()
    total = sum(calls.values())
    return {
        "at": datetime.now(UTC).isoformat(), "hits": args.hits, "batch_size": args.batch_size,
        "results_on_stream": results, "seconds": round(seconds, 3),
        "commands": calls, "commands_total": total,
        "commands_per_hit": round(total / args.hits, 3),
        "note": "top-level commands as the server counts them: one EVALSHA counts once (the "
                "commands inside a script are counted under their own names too, in Valkey's "
                "commandstats), so commands_per_hit overstates the round trips",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hits", type=int, default=2000)
    p.add_argument("--warm", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    args = p.parse_args()
    logs.configure("WARNING", "console")
    out = asyncio.run(run(args))
    print(f"{out['hits']} exact hits, batch size {out['batch_size']}: "
          f"{out['commands_total']} commands, {out['commands_per_hit']} per hit, "
          f"{out['seconds']} s")
    for name, count in out["commands"].items():  # type: ignore[union-attr]
        print(f"  {name:<28} {count:>8}  {count / out['hits']:.3f}/hit")  # type: ignore[operator]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "commands-per-hit-latest.json").write_text(json.dumps(out, indent=2))
    print("wrote benchmarks/results/commands-per-hit-latest.json")


if __name__ == "__main__":
    main()
