"""Cross-worker single flight: identical misses on several workers make one image."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from promptcache.flight.identical import Flight, Found, Lease
from promptcache.keys import Keys
from consumers.wiring import cache_client
from tests.conftest import free_port_url, make_settings, wait_until
from tests.helpers import CountingGenerator, results, results_for, running, send, worker_for


async def _answered(redis: aioredis.Redis, keys: Keys, n: int) -> bool:
    return len(await results(redis, keys.results)) >= n


async def test_identical_misses_on_two_workers_make_one_generation(redis, keys, tmp_path,
                                                                    redis_url):
    settings = make_settings(tmp_path, redis_url, keys, batch_size=1, generation_concurrency=2)
    first, second = CountingGenerator(latency_ms=600), CountingGenerator(latency_ms=600)
    w1 = worker_for(settings, redis, first, consumer="w1")
    w2 = worker_for(settings, redis, second, consumer="w2")
    async with running(w1), running(w2):
        for i in range(8):
            await send(redis, keys.requests, request_id=f"same-{i}",
                       prompt="a crowd of workers asking at once")
        await wait_until(lambda: _answered(redis, keys, 8), timeout=20)
    got = await results(redis, keys.results)
    assert sorted(r.cache for r in got) == ["coalesced"] * 7 + ["miss"]
    assert len(first.calls) + len(second.calls) == 1
    assert len({r.entry_id for r in got}) == 1
    # both workers answered some of them: the coalescing crossed processes' boundaries
    assert w1.counters["coalesced"] + w1.counters["miss"] > 0
    assert w2.counters["coalesced"] + w2.counters["miss"] > 0
    assert not [k async for k in redis.scan_iter(match=f"{keys.prefix}:cache:flight:*")]


async def test_a_dead_holders_lock_is_taken_over_within_its_ttl(redis, keys, tmp_path, redis_url):
    """A lock left by a holder that died (never renewed, never released) expires, and the
    waiting worker generates the image itself."""
    settings = make_settings(tmp_path, redis_url, keys, flight_lock_ttl="1500ms")
    gen = CountingGenerator()
    worker = worker_for(settings, redis, gen)
    key = worker.pipeline.prepare(_request("orphaned lock")).key
    flight = Flight(redis, keys)
    await redis.set(flight.lock_name(key), "dead-holder-token", px=1500)
    started = time.monotonic()
    await send(redis, keys.requests, request_id="after-death", prompt="orphaned lock")
    async with running(worker):
        await wait_until(lambda: _answered(redis, keys, 1), timeout=10)
    waited = time.monotonic() - started
    [result] = await results_for(redis, keys.results, "after-death")
    assert result.status == "ok" and result.cache == "miss" and len(gen.calls) == 1
    assert waited > 1.0, waited  # it waited for the dead holder's lock to run out
    assert not await redis.exists(flight.lock_name(key))  # and released its own


async def test_a_cancelled_holder_releases_and_a_waiter_takes_over(redis, keys):
    flight = Flight(redis, keys, ttl=__import__("datetime").timedelta(seconds=30))

    async def nothing() -> None:
        return None

    lease = await flight.lead_or_follow("k1", nothing)
    assert isinstance(lease, Lease)
    waiter = asyncio.create_task(flight.lead_or_follow("k1", nothing))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await lease.release()  # the holder failed (or was cancelled): released, not left to expire
    taken = await asyncio.wait_for(waiter, 5)
    assert isinstance(taken, Lease) and taken.token != lease.token
    await taken.release()
    assert not await redis.exists(flight.lock_name("k1"))


async def test_waiters_get_the_entry_the_holder_stored(redis, keys):
    flight = Flight(redis, keys)
    store: dict[str, str] = {}

    async def find() -> str | None:
        return store.get("k")

    lease = await flight.lead_or_follow("k", find)
    assert isinstance(lease, Lease)
    waiters = [asyncio.create_task(flight.lead_or_follow("k", find)) for _ in range(5)]
    await asyncio.sleep(0.1)
    store["k"] = "the image"
    await lease.release()
    got = await asyncio.gather(*waiters)
    assert got == [Found("the image")] * 5


async def test_the_lock_is_renewed_while_generating(redis, keys):
    from datetime import timedelta

    flight = Flight(redis, keys, ttl=timedelta(milliseconds=300))

    async def nothing() -> None:
        return None

    lease = await flight.lead_or_follow("slow", nothing)
    assert isinstance(lease, Lease)
    await asyncio.sleep(1.0)  # three TTLs: still ours
    assert await redis.get(flight.lock_name("slow")) == lease.token.encode()
    assert lease._renewer is not None and not lease._renewer.done()  # still renewing
    await lease.release()


async def test_cache_store_down_means_no_lock_and_bypass(redis, keys, settings):
    dead = cache_client(free_port_url(), settings)
    flight = Flight(dead, keys)

    async def nothing() -> None:
        return None

    assert await flight.lead_or_follow("k", nothing) is None
    gen = CountingGenerator()
    for i in range(2):
        await send(redis, keys.requests, request_id=f"nocache-{i}", prompt=f"an owl {i}")
    await worker_for(settings, redis, gen, cache_redis=dead).run(burst=True)
    await dead.aclose()
    assert sorted(r.cache for r in await results(redis, keys.results)) == ["bypass", "bypass"]


def _request(prompt: str):  # noqa: ANN202 - a Request
    from schemas.events import Request

    return Request(request_id="probe", prompt=prompt)


async def test_release_ends_a_renewer_whose_cancellation_was_swallowed(redis, keys):
    """A cancel that lands inside a Redis call can surface as a caught timeout error instead of
    CancelledError (seen with the semantic tier on: the lock was renewed for ever and every
    other worker waited on it). release() must still return, stop renewing and free the lock."""
    from datetime import timedelta

    from redis.exceptions import TimeoutError as RedisTimeout

    flight = Flight(redis, keys, ttl=timedelta(milliseconds=300))  # renewed every 100 ms
    renew = flight.renew_script
    inside = asyncio.Event()

    async def swallowing_renew(*args: object, **kwargs: object) -> object:
        inside.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise RedisTimeout("Timeout reading from socket") from None
        return await renew(*args, **kwargs)

    flight.renew_script = swallowing_renew  # type: ignore[method-assign]
    lease = await flight.lead_or_follow("k-swallow", lambda: asyncio.sleep(0, None))
    assert isinstance(lease, Lease)
    await asyncio.wait_for(inside.wait(), 2)
    await asyncio.wait_for(lease.release(), 30)  # returns (a renewer it waited on never ends)
    await wait_until(lambda: asyncio.sleep(0, lease._renewer is not None and lease._renewer.done()),
                     timeout=2)
    assert await redis.exists(flight.lock_name("k-swallow")) == 0
