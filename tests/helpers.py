"""Test-only generators and a harness that runs a real Worker against real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis as syncredis
import redis.asyncio as aioredis

from promptcache.config import Settings
from promptcache.errors import GenerationRejected
from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.procedural import ProceduralGenerator
from promptcache.keys import Keys
from consumers.wiring import build_worker
from consumers.worker import Worker
from schemas.events import Request, Result


@dataclass
class CountingGenerator:
    """The procedural generator, counting calls; prompts that start with a key of `fail_with`
    raise instead (the optimizer appends quality enhancers to what the generator is sent)."""

    latency_ms: int = 0
    fail_with: dict[str, Exception] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    name: str = "procedural"
    default_model: str = "procedural-v1"
    truncates_prompt: bool = False

    def __post_init__(self) -> None:
        self._inner = ProceduralGenerator(latency_ms=self.latency_ms)

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        self.calls.append(request.prompt)
        for trigger, exc in self.fail_with.items():
            if request.prompt == trigger or request.prompt.startswith(f"{trigger},"):
                raise exc
        return await self._inner.generate(request)

    async def aclose(self) -> None:
        return None


REFUSED = GenerationRejected("the backend refused this prompt")


def worker_for(settings: Settings, redis: aioredis.Redis, generator: CountingGenerator,
               consumer: str = "w1", cache_redis: aioredis.Redis | None = None) -> Worker:
    return build_worker(settings, redis=redis, cache_redis=cache_redis or redis,
                        generator=generator, consumer=consumer)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def send(redis: aioredis.Redis, stream: str, **fields: object) -> str:
    data = fields.pop("raw", None)
    if data is None:
        data = Request.model_validate(fields).model_dump_json(exclude_none=True)
    mid = await redis.xadd(stream, {"data": data})
    return mid.decode()


async def results(redis: aioredis.Redis, stream: str) -> list[Result]:
    return [Result.model_validate_json(f[b"data"]) for _, f in await redis.xrange(stream)]


async def results_for(redis: aioredis.Redis, stream: str, request_id: str) -> list[Result]:
    return [r for r in await results(redis, stream) if r.request_id == request_id]


async def dead_letters(redis: aioredis.Redis, stream: str) -> list[dict[str, object]]:
    return [json.loads(f[b"data"]) for _, f in await redis.xrange(stream)]


# --- for tests that run real processes (synchronous) -----------------------------------------

def process_env(**values: str) -> dict[str, str]:
    """This environment without any promptcache setting or server URL, plus `values`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROMPTCACHE_") and k not in ("REDIS_URL", "DATABASE_URL",
                                                             "CACHE_REDIS_URL")}
    env.update(values)
    return env


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def stream_results(r: syncredis.Redis, keys: Keys) -> list[Result]:
    return [Result.model_validate_json(f[b"data"]) for _, f in r.xrange(keys.results)]
