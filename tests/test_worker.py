"""The worker against real Redis: tiers, idempotency, claiming, leases, errors, shutdown."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.procedural import ProceduralGenerator
from promptcache.keys import GENERATE_GROUP, REQUESTS_GROUP, Keys
from promptcache.streams import ensure_group
from tests.conftest import make_settings, wait_until
from tests.helpers import (
    REFUSED,
    CountingGenerator,
    dead_letters,
    results,
    results_for,
    running,
    send,
    worker_for,
)


async def test_miss_then_exact_hit_for_the_same_prompt_retyped(redis, keys, settings):
    gen = CountingGenerator()
    await send(redis, keys.requests, request_id="r1", prompt="A red fox in the snow, golden hour")
    await worker_for(settings, redis, gen).run(burst=True)
    await send(redis, keys.requests, request_id="r2", prompt="  a RED fox in the  snow , golden hour.")
    await worker_for(settings, redis, gen).run(burst=True)

    first, second = await results_for(redis, keys.results, "r1"), await results_for(
        redis, keys.results, "r2")
    assert [r.cache for r in first] == ["miss"] and [r.cache for r in second] == ["exact"]
    assert len(gen.calls) == 1
    assert first[0].entry_id == second[0].entry_id and first[0].image_url == second[0].image_url
    assert first[0].optimizer_version == "2"
    assert first[0].prompt_used.startswith("A red fox in the snow, golden hour, ")  # + enhancers
    assert gen.calls == [first[0].prompt_used]
    # the URL names a real file and thumbnail in the store
    name = first[0].image_url.rsplit("/", 1)[1]
    sha = name.split(".")[0]
    assert (settings.images_dir / sha[:2] / sha[2:4] / name).stat().st_size > 1000
    assert (settings.thumbnails_dir / sha[:2] / sha[2:4] / f"{sha}.webp").exists()
    pending = await redis.xpending(keys.requests, REQUESTS_GROUP)
    assert pending["pending"] == 0


async def test_different_params_seed_or_negative_prompt_are_different_entries(redis, keys, settings):
    gen = CountingGenerator()
    base = {"prompt": "a lighthouse at dusk"}
    await send(redis, keys.requests, request_id="a", **base)
    await send(redis, keys.requests, request_id="b", **base, params={"seed": 7})
    await send(redis, keys.requests, request_id="c", **base, params={"width": 512})
    await send(redis, keys.requests, request_id="d", **base, negative_prompt="fog")
    await worker_for(settings, redis, gen).run(burst=True)
    await send(redis, keys.requests, request_id="e", **base,
               params={"width": 1024, "height": 1024, "steps": 30, "guidance": 7,
                       "sampler": "Euler"})  # the defaults, spelt out: same entry as "a"
    await worker_for(settings, redis, gen).run(burst=True)
    by_id = {r.request_id: r for r in await results(redis, keys.results)}
    assert [by_id[i].cache for i in "abcd"] == ["miss"] * 4
    assert by_id["e"].cache == "exact" and by_id["e"].entry_id == by_id["a"].entry_id
    assert by_id["c"].width == 512
    assert len(gen.calls) == 4


async def test_identical_misses_in_one_worker_share_one_generation(redis, keys, settings):
    gen = CountingGenerator(latency_ms=300)
    for i in range(5):
        await send(redis, keys.requests, request_id=f"c{i}", prompt="a crowd asking at once")
    await worker_for(settings, redis, gen).run(burst=True)
    got = sorted(r.cache for r in await results(redis, keys.results))
    assert got == ["coalesced"] * 4 + ["miss"] and len(gen.calls) == 1
    assert len({r.entry_id for r in await results(redis, keys.results)}) == 1


async def test_resubmitted_and_redelivered_request_ids_get_exactly_one_result(redis, keys, settings):
    gen = CountingGenerator()
    for _ in range(3):
        await send(redis, keys.requests, request_id="same", prompt="a teapot")
    await worker_for(settings, redis, gen).run(burst=True)
    await send(redis, keys.requests, request_id="same", prompt="a teapot")  # much later
    await worker_for(settings, redis, gen).run(burst=True)
    assert len(await results_for(redis, keys.results, "same")) == 1
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0


async def test_concurrent_duplicates_on_two_workers_publish_one_result(redis, keys, settings):
    gen = CountingGenerator(latency_ms=200)
    for _ in range(6):
        await send(redis, keys.requests, request_id="dup", prompt="two workers, one answer")
    settings_one = settings.model_copy(update={"batch_size": 1})
    w1 = worker_for(settings_one, redis, gen, consumer="w1")
    w2 = worker_for(settings_one, redis, gen, consumer="w2")
    await asyncio.gather(w1.run(burst=True), w2.run(burst=True))
    assert len(await results_for(redis, keys.results, "dup")) == 1
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0


async def test_pending_entries_of_a_dead_consumer_are_taken_over(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, claim_idle="300ms")
    await ensure_group(redis, keys.requests, REQUESTS_GROUP)
    await send(redis, keys.requests, request_id="orphan", prompt="left behind")
    # a consumer reads it and dies without acking
    taken = await redis.xreadgroup(REQUESTS_GROUP, "dead#1", {keys.requests: ">"}, count=10)
    assert len(taken[0][1]) == 1

    async def idle_past_claim_idle() -> bool:
        [entry] = await redis.xpending_range(keys.requests, REQUESTS_GROUP, "-", "+", 1)
        return entry["time_since_delivered"] > 300

    await wait_until(idle_past_claim_idle)
    gen = CountingGenerator()
    await worker_for(settings, redis, gen, consumer="alive").run(burst=True)
    [result] = await results_for(redis, keys.results, "orphan")
    assert result.status == "ok" and result.cache == "miss"
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0


async def test_long_generation_renews_its_lease_and_is_not_stolen(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, claim_idle="300ms")
    slow = CountingGenerator(latency_ms=1500)
    thief_gen = CountingGenerator()
    await send(redis, keys.requests, request_id="long", prompt="a very slow painting")
    owner = worker_for(settings, redis, slow, consumer="owner")
    thief = worker_for(settings, redis, thief_gen, consumer="thief")
    async with running(owner):
        await wait_until(lambda: _has_pending(redis, keys, "owner"))
        async with running(thief):
            await wait_until(lambda: _result_count(redis, keys, "long"), timeout=10)
    # both stopped (each finishes what it holds first): a theft would show by now
    assert thief_gen.calls == [] and len(slow.calls) == 1
    assert (await redis.xpending(keys.generate, GENERATE_GROUP))["pending"] == 0
    assert len(await results_for(redis, keys.results, "long")) == 1


async def _has_pending(redis: aioredis.Redis, keys: Keys, consumer: str) -> bool:
    """Whether `consumer` holds a generation job."""
    try:
        rows = await redis.xpending_range(keys.generate, GENERATE_GROUP, "-", "+", 10,
                                          consumername=consumer)
    except aioredis.ResponseError:  # the group is not created yet
        return False
    return bool(rows)


async def _result_count(redis: aioredis.Redis, keys: Keys, request_id: str) -> bool:
    return bool(await results_for(redis, keys.results, request_id))


@dataclass
class HeldGenerator(CountingGenerator):
    """Generations wait until `release` is set: "slow" for as long as a test needs."""

    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        self.calls.append(request.prompt)
        await self.release.wait()
        return await ProceduralGenerator(latency_ms=0).generate(request)


async def test_slow_generations_do_not_hold_up_cache_hits(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, generation_concurrency=1)
    await send(redis, keys.requests, request_id="warm", prompt="a cached castle")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)

    gen = HeldGenerator()  # every generation waits until released, one slot at a time
    worker = worker_for(settings, redis, gen)
    async with running(worker):
        for i in range(3):
            await send(redis, keys.requests, request_id=f"slow{i}", prompt=f"uncached {i}")
        await wait_until(lambda: _true(len(gen.calls) == 1), timeout=10)  # the slot is taken
        await send(redis, keys.requests, request_id="hit", prompt="A cached castle")
        await wait_until(lambda: _result_count(redis, keys, "hit"), timeout=10)
        [hit] = await results_for(redis, keys.results, "hit")
        assert hit.cache == "exact", hit
        # answered while every generation was still held: none of them is answered yet
        assert [r.request_id for r in await results(redis, keys.results)] == ["warm", "hit"]
        assert len(gen.calls) == 1  # the other two wait for the one slot
        gen.release.set()
        for i in range(3):
            await wait_until(lambda i=i: _result_count(redis, keys, f"slow{i}"), timeout=15)
    assert len(gen.calls) == 3


async def _true(value: bool) -> bool:
    return value


async def test_blocked_content_is_rejected_before_the_cache_and_the_generator(redis, keys, settings):
    gen = CountingGenerator()
    await send(redis, keys.requests, request_id="gory", prompt="a gory battlefield, entrails")
    await worker_for(settings, redis, gen).run(burst=True)
    [result] = await results_for(redis, keys.results, "gory")
    assert result.status == "rejected" and result.error.code == "blocked_content"
    assert "gore" in result.error.message and gen.calls == []
    assert not [k async for k in redis.scan_iter(match=keys.exact("*"))]


async def test_optimize_false_sends_the_prompt_without_enhancers_under_its_own_key(
        redis, keys, settings):
    gen = CountingGenerator()
    await send(redis, keys.requests, request_id="on", prompt="a portrait photo of an old sailor")
    await worker_for(settings, redis, gen).run(burst=True)
    await send(redis, keys.requests, request_id="off", prompt="a portrait photo of an old sailor",
               options={"optimize": False})
    await worker_for(settings, redis, gen).run(burst=True)
    by_id = {r.request_id: r for r in await results(redis, keys.results)}
    assert by_id["on"].cache == by_id["off"].cache == "miss"  # a different picture: not shared
    assert by_id["off"].prompt_used == "a portrait photo of an old sailor"
    assert len(by_id["on"].prompt_used) > len(by_id["off"].prompt_used)


async def test_generator_refusal_is_a_failed_result_not_a_retry(redis, keys, settings):
    gen = CountingGenerator(fail_with={"forbidden thing": REFUSED})
    await send(redis, keys.requests, request_id="no", prompt="forbidden thing")
    await worker_for(settings, redis, gen).run(burst=True)
    [result] = await results_for(redis, keys.results, "no")
    assert result.status == "failed" and result.error.code == "generator_rejected"
    assert result.cache is None and len(gen.calls) == 1


async def test_a_recurring_failure_is_retried_then_dead_lettered_with_one_failed_result(
        redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, claim_idle="100ms", max_deliveries=3)
    gen = CountingGenerator(fail_with={"boom": RuntimeError("a bug in the pipeline")})
    await send(redis, keys.requests, request_id="boom-1", prompt="boom")
    worker = worker_for(settings, redis, gen)
    async with running(worker):
        await wait_until(lambda: _result_count(redis, keys, "boom-1"), timeout=15)
    assert len(gen.calls) == 3  # delivered 3 times, dead-lettered on the 4th delivery
    [letter] = await dead_letters(redis, keys.dead_letter)
    assert letter["request_id"] == "boom-1" and letter["delivery_count"] == 4
    assert letter["error"]["code"] == "delivery_limit_exceeded"
    assert '"prompt":"boom"' in letter["entry"]["data"]
    [result] = await results_for(redis, keys.results, "boom-1")
    assert result.status == "failed" and result.error.code == "delivery_limit_exceeded"
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0


@pytest.mark.parametrize(("raw", "code"), [
    ('{"request_id": "bad-1", "prompt": "   "}', "invalid_request"),
    ('{"request_id": "bad-1", "prompt": "x", "params": {"width": 1000000}}', "invalid_request"),
    ('{"request_id": "bad-1", "prompt": "x", "params": {"clip_skip": 2}}', "invalid_request"),
    ('{"request_id": "bad-1", "prompt": "' + "y" * 4001 + '"}', "prompt_too_long"),
    ('{"request_id": "bad-1", "prompt": 42}', "invalid_request"),
    ('{"request_id": "bad-1", "prompt": "x", "options": {"cache": "sometimes"}}',
     "invalid_request"),
])
async def test_bad_requests_with_an_id_get_a_rejected_result(redis, keys, settings, raw, code):
    gen = CountingGenerator()
    await send(redis, keys.requests, raw=raw)
    await worker_for(settings, redis, gen).run(burst=True)
    [result] = await results_for(redis, keys.results, "bad-1")
    assert result.status == "rejected" and result.error.code == code
    assert gen.calls == []


@pytest.mark.parametrize("raw", [b"not json", b'{"prompt": "no id"}', b"[1, 2]",
                                 b'{"request_id": "has spaces!", "prompt": "x"}', b"\xff\xfe\x00",
                                 b"[" * 50_000])
async def test_entries_without_a_usable_id_are_dead_lettered_and_the_worker_goes_on(
        redis, keys, settings, raw):
    gen = CountingGenerator()
    await redis.xadd(keys.requests, {"data": raw})
    await redis.xadd(keys.requests, {"other": b"field"})
    await send(redis, keys.requests, request_id="fine", prompt="after the garbage")
    await worker_for(settings, redis, gen).run(burst=True)
    letters = await dead_letters(redis, keys.dead_letter)
    assert len(letters) == 2 and all(lt["error"]["code"] for lt in letters)
    assert [r.status for r in await results_for(redis, keys.results, "fine")] == ["ok"]
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0


async def test_reply_to_stream_receives_the_result(redis, keys, settings):
    await send(redis, keys.requests, request_id="rt", prompt="a kite", reply_to=f"app-{keys.prefix}:mine")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    assert [r.request_id for r in await results(redis, f"app-{keys.prefix}:mine")] == ["rt"]
    assert await results(redis, keys.results) == []


async def test_reply_to_inside_the_service_prefix_is_rejected(redis, keys, settings):
    """A reply_to naming one of the service's own keys would let a producer write into them."""
    await send(redis, keys.requests, request_id="own", prompt="a kite", reply_to=keys.requests)
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    [result] = await results_for(redis, keys.results, "own")
    assert result.status == "rejected" and result.error.code == "invalid_request"
    assert "reply_to" in result.error.message


async def test_unwritable_reply_to_falls_back_to_the_results_stream(redis, keys, settings):
    """A reply_to that is not a stream (WRONGTYPE) must not lose the answer nor stop the batch."""
    await redis.set(f"app-{keys.prefix}:a-string", "x")
    await send(redis, keys.requests, request_id="bad-reply", prompt="a kite",
               reply_to=f"app-{keys.prefix}:a-string")
    await send(redis, keys.requests, request_id="fine", prompt="a kite")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    [fallback] = await results_for(redis, keys.results, "bad-reply")
    assert fallback.status == "ok" and fallback.error is not None
    assert fallback.error.code == "reply_to_unwritable"
    assert [r.status for r in await results_for(redis, keys.results, "fine")] == ["ok"]
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0


async def test_a_redelivered_batch_is_answered_once(redis, keys, settings):
    """Requests answered but not acked (a crash between publish and ack) get no second result."""
    gen = CountingGenerator()
    await send(redis, keys.requests, request_id="warm", prompt="a kite")
    await worker_for(settings, redis, gen).run(burst=True)
    ids = [f"hit-{i}" for i in range(5)]
    for rid in ids:
        await send(redis, keys.requests, request_id=rid, prompt="a kite")
    await worker_for(settings, redis, gen).run(burst=True)
    # Replay the same entries as though their acks were lost: same request ids, new stream ids.
    for rid in ids:
        await send(redis, keys.requests, request_id=rid, prompt="a kite")
    await worker_for(settings, redis, gen).run(burst=True)
    for rid in ids:
        assert [r.status for r in await results_for(redis, keys.results, rid)] == ["ok"]
    assert len(gen.calls) == 1


async def test_cache_options_bypass_and_refresh(redis, keys, settings):
    gen = CountingGenerator()
    for request_id, options in (("1", {}), ("2", {"cache": "bypass"}), ("3", {"cache": "refresh"}),
                                ("4", {})):
        await send(redis, keys.requests, request_id=request_id, prompt="a bicycle", options=options)
        await worker_for(settings, redis, gen).run(burst=True)
    by_id = {r.request_id: r for r in await results(redis, keys.results)}
    assert [by_id[i].cache for i in "1234"] == ["miss", "bypass", "miss", "exact"]
    assert by_id["4"].entry_id == by_id["3"].entry_id != by_id["1"].entry_id


async def test_cache_store_down_means_bypass_not_failure(redis, keys, settings):
    from consumers.wiring import cache_client
    from tests.conftest import free_port_url

    dead_cache = cache_client(free_port_url(), settings)
    gen = CountingGenerator()
    await send(redis, keys.requests, request_id="nocache", prompt="a barn owl")
    worker = worker_for(settings, redis, gen, cache_redis=dead_cache)
    await worker.run(burst=True)
    await dead_cache.aclose()
    [result] = await results_for(redis, keys.results, "nocache")
    assert result.status == "ok" and result.cache == "bypass" and len(gen.calls) == 1


async def test_group_deleted_under_a_running_worker_is_recreated(redis, keys, settings):
    worker = worker_for(settings, redis, CountingGenerator())
    async with running(worker):
        await wait_until(lambda: _group_exists(redis, keys))
        await redis.xgroup_destroy(keys.requests, REQUESTS_GROUP)
        await send(redis, keys.requests, request_id="after", prompt="a new group")
        await wait_until(lambda: _result_count(redis, keys, "after"), timeout=10)
        # answered by the recreated group, and acknowledged there
        assert await _group_exists(redis, keys)
        assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0
    [result] = await results_for(redis, keys.results, "after")
    assert result.status == "ok" and result.cache == "miss"
    assert worker.counters["miss"] == 1


async def _group_exists(redis: aioredis.Redis, keys: Keys) -> bool:
    try:
        return any(g["name"] == REQUESTS_GROUP.encode() for g in await redis.xinfo_groups(keys.requests))
    except aioredis.ResponseError:
        return False


def test_data_dir_layout_is_under_settings(settings):
    assert Path(settings.images_dir).is_relative_to(settings.data_dir)


async def test_a_burst_of_misses_spreads_over_every_worker(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, generation_concurrency=2)
    for i in range(8):
        await send(redis, keys.requests, request_id=f"m{i}", prompt=f"distinct picture {i}")
    first, second = CountingGenerator(latency_ms=400), CountingGenerator(latency_ms=400)
    # the first worker reads all eight requests before the second starts
    w1 = worker_for(settings, redis, first, consumer="w1")
    async with running(w1):
        await wait_until(lambda: _all_handed_off(redis, keys, 8))
        await worker_for(settings, redis, second, consumer="w2").run(burst=True)
        await wait_until(lambda: _count_results(redis, keys, 8), timeout=10)
    assert len(first.calls) + len(second.calls) == 8
    assert len(second.calls) >= 2, (first.calls, second.calls)


async def _all_handed_off(redis: aioredis.Redis, keys: Keys, n: int) -> bool:
    return (await redis.xlen(keys.generate)) == n


async def _count_results(redis: aioredis.Redis, keys: Keys, n: int) -> bool:
    return len(await results(redis, keys.results)) == n


async def test_a_prompt_past_the_77_token_window_reports_what_was_dropped(redis, keys, settings):
    tags = ", ".join(f"detail number {i}" for i in range(40))
    await send(redis, keys.requests, request_id="long", prompt=f"a lighthouse, {tags}")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    [result] = await results_for(redis, keys.results, "long")
    assert result.status == "ok" and result.dropped
    assert "detail number 39" in " ".join(result.dropped)
    assert "detail number 39" not in result.prompt_used


async def test_a_regenerated_flagged_image_is_not_served(redis, keys, settings):
    """The procedural generator is deterministic, like a real backend asked with the same seed:
    after an operator flagged an image, asking again must not serve those bytes."""
    gen = CountingGenerator()
    await send(redis, keys.requests, request_id="f1", prompt="a lighthouse in a storm",
               params={"seed": 7})
    await worker_for(settings, redis, gen).run(burst=True)
    [first] = await results_for(redis, keys.results, "f1")
    sha = first.image_url.rsplit("/", 1)[1].split(".")[0]
    await redis.sadd(keys.flagged_blobs, sha)
    await send(redis, keys.requests, request_id="f2", prompt="a lighthouse in a storm",
               params={"seed": 7}, options={"cache": "refresh"})
    await worker_for(settings, redis, gen).run(burst=True)
    [second] = await results_for(redis, keys.results, "f2")
    assert second.status == "failed" and second.error is not None
    assert second.error.code == "image_flagged" and second.image_url is None
    assert len(gen.calls) == 2


async def test_durable_results_are_published_once_and_leave_nothing_staged(redis, keys, settings):
    """PROMPTCACHE_DURABLE_RESULTS: the same answers, through the outbox and WAITAOF."""
    durable = settings.model_copy(update={"durable_results": True})
    gen = CountingGenerator()
    for i in range(3):
        await send(redis, keys.requests, request_id=f"d{i}", prompt="a lighthouse at dusk")
    await worker_for(durable, redis, gen).run(burst=True)
    got = await results(redis, keys.results)
    assert sorted(r.request_id for r in got) == ["d0", "d1", "d2"]
    assert sorted(r.cache or "" for r in got) == ["coalesced", "coalesced", "miss"]
    await send(redis, keys.requests, request_id="d3", prompt="a lighthouse at dusk")
    await worker_for(durable, redis, gen).run(burst=True)
    assert [r.cache for r in await results_for(redis, keys.results, "d3")] == ["exact"]
    assert await redis.hlen(keys.outbox) == 0
    assert len(gen.calls) == 1


async def test_durable_results_stay_unseen_until_on_disk_and_survive_a_crash_between_steps(
        redis, keys):
    """A worker that dies after staging (requests done and acked, file synced) but before
    publishing: no reader saw the results; a recovery pass publishes each exactly once."""
    from datetime import timedelta

    from promptcache.streams import Outgoing, Publisher, Source, flush_outbox

    await ensure_group(redis, keys.requests, REQUESTS_GROUP)
    for i in range(2):
        await send(redis, keys.requests, request_id=f"s{i}", prompt="x")
    read = await redis.xreadgroup(REQUESTS_GROUP, "w", {keys.requests: ">"}, count=10)
    mids = [m.decode() for m, _ in read[0][1]]
    publisher = Publisher(redis, dead_letter_stream=keys.dead_letter, changes_stream=keys.changes,
                          results_stream=keys.results, metrics_results=keys.metrics_results,
                          done_ttl=timedelta(hours=1), outbox=keys.outbox,
                          metrics_scopes=keys.metrics_scopes, durable=True)

    async def crash(**_: object) -> list[int]:
        raise ConnectionError("worker killed between staging and publishing")

    publisher._flush = crash  # type: ignore[assignment]
    rows = [Outgoing(mid, keys.done(f"s{i}"), keys.results, f'{{"request_id":"s{i}"}}')
            for i, mid in enumerate(mids)]
    with pytest.raises(ConnectionError):
        await publisher.publish(Source(keys.requests, REQUESTS_GROUP), rows)
    assert await redis.xlen(keys.results) == 0  # nothing visible before the second step
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0
    assert await redis.exists(keys.done("s0"), keys.done("s1")) == 2
    assert await flush_outbox(redis, keys.outbox, keys.results, timedelta(hours=1)) == 0  # young
    assert await flush_outbox(redis, keys.outbox, keys.results, timedelta(0)) == 2
    assert await flush_outbox(redis, keys.outbox, keys.results, timedelta(0)) == 0
    data = sorted(f[b"data"].decode() for _, f in await redis.xrange(keys.results))
    assert data == ['{"request_id":"s0"}', '{"request_id":"s1"}']


async def test_durable_mode_without_an_append_only_file_is_a_clear_config_error(
        redis, keys, settings):
    from promptcache.errors import ConfigError

    durable = settings.model_copy(update={"durable_results": True})
    await redis.config_set("appendonly", "no")
    try:
        with pytest.raises(ConfigError, match="appendonly yes"):
            await worker_for(durable, redis, CountingGenerator()).run(burst=True)
    finally:
        await redis.config_set("appendonly", "yes")


async def test_a_repeated_publish_hands_off_once_and_writes_its_change_events_once(redis, keys):
    """A publish retried after a timeout (the script had run): no second hand-off, no second
    copy of the rows' change events, no second result."""
    from datetime import timedelta

    from promptcache.streams import Outgoing, Publisher, Source

    await ensure_group(redis, keys.requests, REQUESTS_GROUP)
    for i in range(2):
        await send(redis, keys.requests, request_id=f"h{i}", prompt="x")
    read = await redis.xreadgroup(REQUESTS_GROUP, "w", {keys.requests: ">"}, count=10)
    first, second = [m.decode() for m, _ in read[0][1]]
    publisher = Publisher(redis, dead_letter_stream=keys.dead_letter, changes_stream=keys.changes,
                          results_stream=keys.results, metrics_results=keys.metrics_results,
                          done_ttl=timedelta(hours=1), outbox=keys.outbox,
                          metrics_scopes=keys.metrics_scopes)
    rows = [Outgoing(first, keys.done("h0"), keys.generate, '{"job": 0}', kind="h"),
            Outgoing(second, keys.done("h1"), keys.results, '{"request_id": "h1"}')]
    source = Source(keys.requests, REQUESTS_GROUP)
    assert await publisher.publish(source, rows, changes=['{"type": "x"}']) == [1, 1]
    assert await publisher.publish(source, rows, changes=['{"type": "x"}']) == [0, 0]
    assert await redis.xlen(keys.generate) == 1
    assert await redis.xlen(keys.results) == 1
    assert await redis.xlen(keys.changes) == 1
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0


async def test_one_entry_failing_unexpectedly_does_not_fail_its_batch(redis, keys, settings):
    gen = CountingGenerator()
    worker = worker_for(settings, redis, gen)
    prepare = worker.pipeline.prepare

    def exploding(request):  # a bug in one request's preparation, nothing to do with Redis
        if request.prompt == "boom":
            raise KeyError("unexpected")
        return prepare(request)

    worker.pipeline.prepare = exploding  # type: ignore[method-assign]
    for rid, prompt in (("ok1", "a kite"), ("bad", "boom"), ("ok2", "a kite")):
        await send(redis, keys.requests, request_id=rid, prompt=prompt)
    await worker.run(burst=True)
    assert [r.status for r in await results_for(redis, keys.results, "ok1")] == ["ok"]
    assert [r.status for r in await results_for(redis, keys.results, "ok2")] == ["ok"]
    assert await results_for(redis, keys.results, "bad") == []
    pending = await redis.xpending_range(keys.requests, REQUESTS_GROUP, "-", "+", 10)
    assert len(pending) == 1  # left for a redelivery (and, past max_deliveries, a dead letter)
    assert worker.counters["retry_later"] == 1


async def test_an_entry_that_keeps_failing_unexpectedly_is_dead_lettered(redis, keys, settings,
                                                                         monkeypatch):
    """A failure before the delivery limit is even checked (decoding raised): past the limit
    the entry is dead-lettered, not redelivered for ever."""
    from consumers import worker as worker_module

    worker = worker_for(settings, redis, CountingGenerator())
    worker.max_deliveries = 0  # its first delivery is already past the limit

    def exploding(fields, own_prefix=None):
        raise KeyError("unexpected")

    monkeypatch.setattr(worker_module.intake, "decode", exploding)
    await send(redis, keys.requests, request_id="bad", prompt="boom")
    await worker.run(burst=True)
    letters = await dead_letters(redis, keys.dead_letter)
    assert len(letters) == 1 and letters[0]["error"]["code"] == "delivery_limit_exceeded"
    assert "KeyError" in letters[0]["error"]["message"]
    assert (await redis.xpending(keys.requests, REQUESTS_GROUP))["pending"] == 0
