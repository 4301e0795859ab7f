"""Test-only generators and a harness that runs a real Worker against real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis as syncredis
import redis.asyncio as aioredis

from promptcache.config import Settings
from promptcache.errors import GenerationRejected
from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.procedural import ProceduralGenerator
from promptcache.keys import GENERATE_GROUP, REQUESTS_GROUP, Keys
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


def send_request(r: syncredis.Redis, keys: Keys, request_id: str, prompt: str) -> None:
    r.xadd(keys.requests, {"data": Request(request_id=request_id, prompt=prompt)
                           .model_dump_json(exclude_none=True)})


def group_state(r: syncredis.Redis, stream: str, group: str) -> tuple[int, int]:
    """(pending, lag) of a consumer group; (0, 0) while the stream or group does not exist."""
    try:
        info = next((g for g in r.xinfo_groups(stream) if g["name"] == group.encode()), None)
    except syncredis.ResponseError:
        return 0, 0
    if info is None:
        return 0, 0
    return int(info["pending"]), int(info["lag"] or 0)


def pending(r: syncredis.Redis, stream: str, group: str) -> int:
    return group_state(r, stream, group)[0]


def held(r: syncredis.Redis, keys: Keys) -> int:
    """Entries held by some worker, on either stage (requests, generation jobs)."""
    return pending(r, keys.requests, REQUESTS_GROUP) + pending(r, keys.generate, GENERATE_GROUP)


def workers_idle(r: syncredis.Redis, keys: Keys) -> bool:
    """Every request and generation job read and acknowledged, on both stages."""
    return all(group_state(r, stream, group) == (0, 0) for stream, group in (
        (keys.requests, REQUESTS_GROUP), (keys.generate, GENERATE_GROUP)))


def start_worker(env: dict[str, str], log_dir: Path | None = None) -> subprocess.Popen[bytes]:
    """A `promptcache worker` process; its stderr goes to a file in `log_dir` (or nowhere)."""
    if log_dir is None:
        return subprocess.Popen([sys.executable, "-m", "ops", "worker"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"worker-{time.monotonic_ns()}.log", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "ops", "worker"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running, wait for each (SIGKILL one that hangs)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def workers(env: dict[str, str], n: int = 1,
            log_dir: Path | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """n `promptcache worker` processes, stopped (and waited for) on the way out."""
    procs = [start_worker(env, log_dir) for _ in range(n)]
    try:
        yield procs
    finally:
        stop_processes(procs)
