"""The circuit breaker and the concurrency cap, alone and against a local HTTP backend."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from promptcache.config import Settings
from promptcache.errors import GenerationRejected, GeneratorTimeout, GeneratorUnavailable
from promptcache.generators import build_generator, guarded
from promptcache.generators.automatic1111 import Automatic1111Generator
from promptcache.generators.base import GenerationRequest
from promptcache.generators.breaker import CircuitBreaker, CircuitOpen, GuardedGenerator
from promptcache.prompts import NormalizedParams
from tests.conftest import make_settings
from tests.helpers import CountingGenerator, results, send, worker_for
from tests.http_fakes import FakeServer, Recorded, Reply, png_b64

TXT2IMG = "/sdapi/v1/txt2img"
OK = Reply(json={"images": [png_b64()], "parameters": {}, "info": '{"seed": 1}'})
BROKEN = Reply(500, json={"error": "CUDA out of memory"})
REQUEST = GenerationRequest(prompt="a red fox", negative_prompt=None,
                            params=NormalizedParams(model="", width=64, height=48, steps=20,
                                                    guidance=7.0, sampler="Euler a", seed=1))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


def a1111(url: str, **overrides: Any) -> GuardedGenerator:
    values: dict[str, Any] = dict(generator="automatic1111", generator_url=url,
                                  generator_timeout=timedelta(seconds=5), generator_max_retries=0,
                                  generator_breaker_failures=3,
                                  generator_breaker_cooldown=timedelta(milliseconds=300))
    values.update(overrides)
    settings = Settings(_env_file=None, **values)
    inner = Automatic1111Generator.from_settings(settings, backoff_base=0.01, backoff_cap=0.02)
    return guarded(inner, settings)


# --- the state machine ---------------------------------------------------------------------------

def test_consecutive_failures_open_then_one_probe_closes_it():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown=10, clock=clock)
    for _ in range(3):
        breaker.admit()
        breaker.failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as refused:
        breaker.admit()
    assert refused.value.code == "generator_unavailable" and "circuit breaker open" in str(
        refused.value)
    clock.now += 10
    breaker.admit()  # the probe
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpen):
        breaker.admit()  # only one probe at a time
    breaker.success()
    assert breaker.state == "closed"
    breaker.admit()


def test_a_failed_probe_opens_it_for_another_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=5, clock=clock)
    breaker.admit()
    breaker.failure()
    clock.now += 5
    breaker.admit()
    breaker.failure()
    assert breaker.state == "open"
    clock.now += 4.9
    with pytest.raises(CircuitOpen):
        breaker.check()
    clock.now += 0.2
    breaker.check()


def test_a_failure_rate_opens_it_without_consecutive_failures():
    breaker = CircuitBreaker(failures=100, failure_rate=0.5, window=10, clock=Clock())
    for i in range(4):
        breaker.admit()
        breaker.failure() if i % 2 == 0 else breaker.success()
    assert breaker.state == "closed"  # 4 calls: under half the window, not judged yet
    breaker.admit()
    breaker.failure()  # 3 of 5
    assert breaker.state == "open"


def test_thirty_percent_errors_do_not_open_it_with_the_defaults():
    breaker = CircuitBreaker(clock=Clock())
    for i in range(200):
        breaker.admit()
        breaker.failure() if i % 10 in (0, 4, 7) else breaker.success()
    assert breaker.state == "closed"


def test_a_cancelled_probe_lets_the_next_one_go():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=1, clock=clock)
    breaker.admit()
    breaker.failure()
    clock.now += 1
    breaker.admit()  # the probe
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpen):
        breaker.admit()  # one probe at a time
    breaker.abandon()  # the probe was cancelled: no outcome
    breaker.admit()  # so the next call is the probe
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpen):
        breaker.admit()
    breaker.success()
    assert breaker.state == "closed"


# --- against a real HTTP backend -------------------------------------------------------------------

async def test_an_open_breaker_fails_fast_without_calling_the_backend(server):
    server.on("POST", TXT2IMG, BROKEN)
    generator = a1111(server.url)
    try:
        for _ in range(3):
            with pytest.raises(GeneratorUnavailable) as failed:
                await generator.generate(REQUEST)
            assert not isinstance(failed.value, CircuitOpen)
        assert len(server.calls("POST", TXT2IMG)) == 3
        for _ in range(20):  # refused here, before any connection: no call reaches the backend
            with pytest.raises(CircuitOpen) as refused:
                await generator.generate(REQUEST)
        assert refused.value.code == "generator_unavailable"
        assert len(server.calls("POST", TXT2IMG)) == 3  # not one more backend call
        # the backend recovers; after the cooldown one probe closes the circuit
        server.on("POST", TXT2IMG, OK)
        await asyncio.sleep(0.35)
        probes = await asyncio.gather(*(generator.generate(REQUEST) for _ in range(3)),
                                      return_exceptions=True)
        assert sum(not isinstance(p, BaseException) for p in probes) == 1
        assert sum(isinstance(p, CircuitOpen) for p in probes) == 2
        assert generator.breaker.state == "closed"
        assert (await generator.generate(REQUEST)).width == 64
    finally:
        await generator.aclose()


async def test_timeouts_count_as_failures(server):
    server.on("POST", TXT2IMG, Reply(delay=2.0, json={}))
    generator = a1111(server.url, generator_timeout=timedelta(milliseconds=200))
    try:
        for _ in range(3):
            with pytest.raises(GeneratorTimeout):
                await generator.generate(REQUEST)
        with pytest.raises(CircuitOpen):
            await generator.generate(REQUEST)
        assert len(server.calls("POST", TXT2IMG)) == 3
    finally:
        await generator.aclose()


async def test_429_with_retry_after_then_success_leaves_it_closed(server):
    server.on("POST", TXT2IMG, Reply(429, headers={"Retry-After": "0"}, json={"error": "slow"}),
              OK)
    generator = a1111(server.url, generator_max_retries=2, generator_breaker_failures=1)
    try:
        assert (await generator.generate(REQUEST)).width == 64
        assert generator.breaker.state == "closed" and len(server.calls("POST", TXT2IMG)) == 2
    finally:
        await generator.aclose()


async def test_refusals_are_not_failures(server):
    server.on("POST", TXT2IMG, Reply(400, json={"error": "bad sampler"}))
    generator = a1111(server.url, generator_breaker_failures=1)
    try:
        for _ in range(5):
            with pytest.raises(GenerationRejected):
                await generator.generate(REQUEST)
        assert generator.breaker.state == "closed" and len(server.calls("POST", TXT2IMG)) == 5
    finally:
        await generator.aclose()


async def test_backend_concurrency_is_bounded(server):
    lock = threading.Lock()
    now = {"active": 0, "peak": 0}

    def slow_ok(_: Recorded) -> Reply:
        with lock:
            now["active"] += 1
            now["peak"] = max(now["peak"], now["active"])
        time.sleep(0.15)
        with lock:
            now["active"] -= 1
        return OK

    server.on("POST", TXT2IMG, slow_ok)
    generator = a1111(server.url, generator_max_concurrency=3)
    try:
        images = await asyncio.gather(*(generator.generate(REQUEST) for _ in range(12)))
        assert len(images) == 12
        assert now["peak"] == 3, now
    finally:
        await generator.aclose()


def test_build_generator_puts_every_backend_behind_the_guard():
    settings = Settings(_env_file=None, generator_max_concurrency=7)
    generator = build_generator(settings)
    assert isinstance(generator, GuardedGenerator) and generator.max_concurrency == 7
    assert generator.name == "procedural" and generator.default_model == "procedural-v1"


async def test_worker_answers_failed_fast_while_the_breaker_is_open(redis, keys, tmp_path,
                                                                     redis_url):
    settings = make_settings(tmp_path, redis_url, keys, generator_breaker_failures=2,
                             generator_breaker_cooldown="1h", generation_concurrency=1)
    inner = CountingGenerator(fail_with={"broken": GeneratorUnavailable("backend down")})
    gen = guarded(inner, settings)
    for i in range(6):
        await send(redis, keys.requests, request_id=f"b{i}", prompt=f"broken, picture {i}")
    await worker_for(settings, redis, gen).run(burst=True)  # type: ignore[arg-type]
    got = await results(redis, keys.results)
    assert len(got) == 6 and {r.status for r in got} == {"failed"}
    assert {r.error.code for r in got} == {"generator_unavailable"}
    assert len(inner.calls) == 2  # the other four never reached the backend
    assert sum("circuit breaker open" in r.error.message for r in got) == 4
