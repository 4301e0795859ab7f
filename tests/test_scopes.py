"""Scopes (issue 16, first half): an entry made for one scope is never served to a request of
another, by any tier; purging one scope leaves the others' entries and files."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import redis.asyncio as aioredis

from consumers.wiring import blob_store, registry
from promptcache.invalidation import purge
from promptcache.keys import Keys
from tests.conftest import local_model_settings, make_settings, wait_until
from tests.helpers import CountingGenerator, results, results_for, send, worker_for
from tests.test_semantic import answers, ask, semantic_worker


async def test_nothing_is_served_across_scopes_and_repeats_hit_within_one(redis, keys, settings):
    gen = CountingGenerator()
    prompt = "a lighthouse on a cliff at dusk"
    await send(redis, keys.requests, request_id="a1", prompt=prompt, scope="tenant-a")
    await send(redis, keys.requests, request_id="b1", prompt=prompt, scope="tenant-b")
    await send(redis, keys.requests, request_id="s1", prompt=prompt)
    await worker_for(settings, redis, gen).run(burst=True)  # the three at the same moment
    first = {r.request_id: r for r in await results(redis, keys.results)}
    assert [first[r].cache for r in ("a1", "b1", "s1")] == ["miss", "miss", "miss"]
    assert len({first[r].entry_id for r in ("a1", "b1", "s1")}) == 3
    assert len(gen.calls) == 3  # no single flight across scopes either
    for rid, scope in (("a2", "tenant-a"), ("b2", "tenant-b"), ("s2", None)):
        await send(redis, keys.requests, request_id=rid, prompt=prompt.upper(), scope=scope)
    await worker_for(settings, redis, gen).run(burst=True)
    for rid, origin in (("a2", "a1"), ("b2", "b1"), ("s2", "s1")):
        [again] = await results_for(redis, keys.results, rid)
        assert again.cache == "exact" and again.entry_id == first[origin].entry_id


async def test_an_invalid_scope_is_rejected(redis, keys, settings):
    await send(redis, keys.requests, request_id="bad",
               raw='{"request_id": "bad", "prompt": "a kite", "scope": "tenant/../a"}')
    await send(redis, keys.requests, request_id="long",
               raw='{"request_id": "long", "prompt": "a kite", "scope": "' + "x" * 65 + '"}')
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    for rid in ("bad", "long"):
        [result] = await results_for(redis, keys.results, rid)
        assert result.status == "rejected" and result.error.code == "invalid_request"
        assert "scope" in result.error.message


async def test_rewrites_in_another_scope_are_never_semantic_hits(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        models_dir: Path) -> None:
    settings = local_model_settings(tmp_path, redis_url, keys, models_dir)
    gen = CountingGenerator()
    async with semantic_worker(settings, redis, gen):
        first = await ask(redis, keys, "r1", "a red sports car parked on a wet street at "
                              "night", scope="tenant-a")
        rewrite = "please draw a red sports car parked on the wet street at night"
        other = await ask(redis, keys, "r2", rewrite, scope="tenant-b")
        shared = await ask(redis, keys, "r3", rewrite)
        same = await ask(redis, keys, "r4", rewrite, scope="tenant-a")
    assert first.cache == "miss"
    assert other.cache == "miss" and other.entry_id != first.entry_id
    assert shared.cache == "miss" and shared.entry_id not in (first.entry_id, other.entry_id)
    assert same.cache == "semantic" and same.entry_id == first.entry_id  # within the scope: yes


async def test_purging_one_scope_leaves_the_others_entries_and_files(redis, keys, tmp_path,
                                                                     redis_url, db):
    settings = make_settings(tmp_path, redis_url, keys, database_url=db)
    gen = CountingGenerator()
    prompt = "a paper boat on a puddle"  # same prompt and params: the same picture, one blob
    for rid, scope in (("a1", "tenant-a"), ("b1", "tenant-b")):
        await send(redis, keys.requests, request_id=rid, prompt=prompt, scope=scope)
    await worker_for(settings, redis, gen).run(burst=True)
    a1, b1 = (await results_for(redis, keys.results, "a1"))[0], \
        (await results_for(redis, keys.results, "b1"))[0]
    assert a1.image_url == b1.image_url and a1.entry_id != b1.entry_id  # one file, two entries
    entries = registry(redis, keys, blob_store(settings), settings)
    assert await purge(redis, keys, db, entries, scope="tenant-a") == 1
    assert await entries.entries_in_scope("tenant-a") == []
    assert await entries.entries_in_scope("tenant-b") == [b1.entry_id]
    sha = b1.image_url.rsplit("/", 1)[-1].split(".")[0]
    assert blob_store(settings).image_path(f"{sha}.png").is_file()  # still used by tenant-b
    for rid, scope in (("a2", "tenant-a"), ("b2", "tenant-b")):
        await send(redis, keys.requests, request_id=rid, prompt=prompt, scope=scope)
    await worker_for(settings, redis, gen).run(burst=True)
    assert (await results_for(redis, keys.results, "a2"))[0].cache == "miss"
    assert (await results_for(redis, keys.results, "b2"))[0].cache == "exact"


async def test_a_thousand_requests_over_twenty_scopes_never_cross(redis, keys, settings):
    """1,000 requests, 20 scopes, 25 prompts shared by every scope (so each prompt is cached in
    many scopes at once): every hit's entry was made in the hit's own scope."""
    rng = random.Random(16)
    prompts = [f"a {c} {t} in a {p}" for c, t, p in itertools.product(
        ["red", "blue", "green", "gold", "white"], ["fox", "owl", "tram", "kite", "lamp"],
        ["forest", "city", "desert", "harbour", "garden"])][::5]
    assert len(set(prompts)) == 25
    scopes = [f"tenant-{i:02d}" for i in range(20)]
    sent: dict[str, str] = {}
    gen = CountingGenerator()
    for batch in range(5):
        for i in range(200):
            rid = f"q{batch}-{i}"
            scope = rng.choice(scopes)
            sent[rid] = scope
            await send(redis, keys.requests, request_id=rid, prompt=rng.choice(prompts),
                       scope=scope)
        await worker_for(settings, redis, gen).run(burst=True)
    answered = {r.request_id: r for r in await results(redis, keys.results)}
    assert set(answered) == set(sent)
    made_in: dict[str, str] = {}
    for rid, result in answered.items():
        if result.cache == "miss":
            made_in[result.entry_id] = sent[rid]
    crossed = sum(1 for rid, r in answered.items()
                  if r.cache != "miss" and made_in.get(r.entry_id) != sent[rid])
    kinds = Counter(r.cache for r in answered.values())
    print(f"1,000 requests over 20 scopes: {kinds}, cross-scope answers: {crossed}")
    assert crossed == 0
    assert kinds["exact"] + kinds["coalesced"] > 300  # the scopes do get hits of their own
    assert len(gen.calls) == len(made_in) <= 20 * 25


async def test_a_scope_at_its_quota_evicts_only_its_own_entries(redis, keys, tmp_path, redis_url):
    gen = CountingGenerator()
    probe = make_settings(tmp_path / "probe", redis_url, Keys(f"{keys.prefix}-probe"))
    await send(redis, Keys(f"{keys.prefix}-probe").requests, request_id="p", prompt="a probe")
    await worker_for(probe, redis, gen).run(burst=True)
    one = sum(p.stat().st_size for p in probe.data_dir.rglob("*") if p.is_file())  # 1 picture
    assert one > 0
    settings = make_settings(tmp_path, redis_url, keys, scope_storage_limit=int(one * 2.5))
    entries = registry(redis, keys, blob_store(settings), settings)
    for i in range(2):  # under its quota: it keeps both
        await send(redis, keys.requests, request_id=f"b{i}", prompt=f"tenant b picture {i}",
                   scope="tenant-b")
    await worker_for(settings, redis, gen).run(burst=True)
    b_entries = sorted(await entries.entries_in_scope("tenant-b"))
    assert len(b_entries) == 2
    for i in range(5):  # one at a time, so the LRU order is the order sent
        await send(redis, keys.requests, request_id=f"a{i}", prompt=f"tenant a picture {i}",
                   scope="tenant-a")
        await worker_for(settings, redis, gen).run(burst=True)
    a_ids = [(await results_for(redis, keys.results, f"a{i}"))[0].entry_id for i in range(5)]
    left = await entries.entries_in_scope("tenant-a")
    assert sorted(left) == sorted(a_ids[-2:])  # its two newest fit under 2.5 images
    assert await entries.scope_stored("tenant-a") <= one * 2.5
    assert sorted(await entries.entries_in_scope("tenant-b")) == b_entries  # untouched
    evicted = [f[b"data"] for _, f in await redis.xrange(keys.changes)
               if b'"entry_evicted"' in f[b"data"] and b'scope_limit' in f[b"data"]]
    ids = [json.loads(e)["entry_id"] for e in evicted]
    assert sorted(ids) == sorted(a_ids[:3]), ids


async def test_figures_per_scope_in_stats_metrics_and_the_dashboard(redis, keys, tmp_path,
                                                                    redis_url, db):
    import asyncio

    import httpx
    import redis as sync_redis
    from prometheus_client import CollectorRegistry, generate_latest

    from ops.metrics import RedisCollector
    from ops.status import database_stats
    from ops.web import build_app
    from tests.test_persister_bulk import _persist

    settings = make_settings(tmp_path, redis_url, keys, database_url=db)
    sent = {"tenant-a": 3, "tenant-b": 2, "tenant-c": 1, "tenant-d": 1}
    n = 0
    for scope, count in sent.items():
        for _ in range(count):
            await send(redis, keys.requests, request_id=f"r{n}", prompt=f"{scope} cat",
                       scope=scope)
            n += 1
    await send(redis, keys.requests, request_id="shared", prompt="a shared cat")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    await _persist(redis, keys, db)

    for scope, count in sent.items():  # one miss, the rest exact or coalesced
        figures = await asyncio.to_thread(database_stats, db, scope=scope)
        assert sum(t["requests"] for t in figures["by_tier"].values()) == count
        assert figures["entries"] == 1
    shared = await asyncio.to_thread(database_stats, db, scope="")
    assert sum(t["requests"] for t in shared["by_tier"].values()) == 1 and shared["entries"] == 1
    everything = await asyncio.to_thread(database_stats, db)
    assert sum(t["requests"] for t in everything["by_tier"].values()) == 8

    client = sync_redis.Redis.from_url(redis_url)
    try:
        registry_ = CollectorRegistry()
        registry_.register(RedisCollector(client, keys, storage_limit=10**9, top_scopes=2))
        text = generate_latest(registry_).decode()
    finally:
        client.close()
    lines = [ln for ln in text.splitlines() if ln.startswith("promptcache_scope_results_total{")]
    labels = {ln.split('scope="')[1].split('"')[0] for ln in lines}
    assert labels == {"tenant-a", "tenant-b", "other"}  # bounded: two by name, the rest summed
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) == 7  # the shared one is not here

    app = build_app(blobs=blob_store(settings), redis=redis, keys=keys, database_url=db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://web") as web:
        body = (await web.get("/api/summary?scope=tenant-b")).json()
        assert sum(t["requests"] for t in body["database"]["by_tier"].values()) == 2
        assert body["scopes"][0] == "tenant-a" and set(body["scopes"]) == {*sent, ""}
        body = (await web.get("/api/summary?scope=-")).json()
        assert sum(t["requests"] for t in body["database"]["by_tier"].values()) == 1


async def test_a_rewrite_never_waits_on_another_scopes_generation_in_flight(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        models_dir: Path) -> None:
    from tests.test_semantic import _true

    settings = local_model_settings(tmp_path, redis_url, keys, models_dir)
    gen = CountingGenerator(latency_ms=1500)
    params = {"width": 512, "height": 512}
    async with semantic_worker(settings, redis, gen, "w1"), \
            semantic_worker(settings, redis, gen, "w2"):
        await send(redis, keys.requests, request_id="a1", prompt="a teapot shaped like a pumpkin",
                   params=params, scope="tenant-a")
        await wait_until(lambda: _true(len(gen.calls) == 1), timeout=30)  # a1 is generating
        rewrite = "a teapot shaped like a pumpkin, please"
        await send(redis, keys.requests, request_id="b1", prompt=rewrite, params=params,
                   scope="tenant-b")
        await send(redis, keys.requests, request_id="a2", prompt=rewrite, params=params,
                   scope="tenant-a")
        got = await answers(redis, keys, "a1", "b1", "a2")
    assert got["a1"].cache == "miss"
    assert got["b1"].cache == "miss" and got["b1"].entry_id != got["a1"].entry_id
    assert got["a2"].cache == "semantic" and got["a2"].entry_id == got["a1"].entry_id
    assert len(gen.calls) == 2  # a1 and b1; a2 waited for a1 in its own scope
