"""Misses never wait for the embedding model: an entry stored while the model loads is answered
at once and joins the semantic index when a model is ready (this worker's, or any other's).

Real Valkey, the worker's real pipeline; the embeddings come from the OpenAI-compatible fake
server of tests/test_semantic.py, whose warm-up call is held until the test lets it go (the
model "loading")."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from consumers.wiring import SemanticLoop, build_semantic, build_worker
from promptcache.keys import Keys
from schemas.events import ChangeEvent
from tests.conftest import wait_until
from tests.helpers import CountingGenerator, running
from tests.http_fakes import FakeServer, Recorded, Reply
from tests.test_semantic import ask, embeddings_reply, openai_settings

pytestmark = pytest.mark.slow


async def test_a_miss_is_answered_while_the_model_loads_and_indexed_once_it_is_ready(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys) -> None:
    loaded = threading.Event()

    def slow_warm_up(request: Recorded) -> Reply:
        if "a warm up prompt" in request.json()["input"]:
            loaded.wait(120)  # the model is loading until the test says otherwise
        return embeddings_reply(request)

    with FakeServer() as server:
        server.on("POST", "/v1/embeddings", slow_warm_up)
        settings = openai_settings(tmp_path, redis_url, keys, server)
        tier = build_semantic(settings, redis)
        assert tier is not None
        worker = build_worker(settings, redis=redis, cache_redis=redis,
                              generator=CountingGenerator(), consumer="w1", semantic=tier)
        loop = SemanticLoop(tier, redis, settings, "w1")
        task = asyncio.create_task(loop.run())
        try:
            async with running(worker):
                first = await ask(redis, keys, "d1", "a lighthouse on a cliff at dawn")
                assert first.status == "ok" and first.cache == "miss"
                assert not tier.ready  # answered while the model was still loading
                assert await redis.hexists(keys.semantic_deferred, first.entry_id)
                assert not await redis.hexists(keys.semantic_vectors, first.entry_id)

                loaded.set()  # the model is ready: the deferred entry joins the index

                async def indexed() -> bool:
                    return first.entry_id in tier.index and not await redis.hexists(
                        keys.semantic_deferred, first.entry_id)

                await wait_until(indexed, timeout=30)
                assert await redis.hexists(keys.semantic_vectors, first.entry_id)
                rewrite = await ask(redis, keys, "d2",
                                    "please draw a lighthouse on the cliff at dawn")
                assert rewrite.cache == "semantic" and rewrite.entry_id == first.entry_id
                # its durable copy follows: an `entry_embedded` change event for PostgreSQL
                events = [ChangeEvent.model_validate_json(f[b"data"])
                          for _, f in await redis.xrange(keys.changes)]
                [late] = [e for e in events if e.type == "entry_embedded"]
                assert late.entry_id == first.entry_id and late.embedding
                assert not [e for e in events if e.type == "entry_stored" and e.embedding]
        finally:
            loaded.set()
            loop.stop()
            await asyncio.wait_for(task, 30)


async def test_entries_deferred_by_a_worker_that_stopped_are_indexed_by_the_next_model(
        tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys) -> None:
    with FakeServer() as server:
        server.on("POST", "/v1/embeddings", embeddings_reply)
        settings = openai_settings(tmp_path, redis_url, keys, server)
        stopped = build_semantic(settings, redis)  # a process whose model never loaded
        assert stopped is not None
        await redis.hset(keys.entries, "e_kept", "{}")  # registered entries
        await redis.hset(keys.entries, "e_evicted", "{}")
        for entry_id in ("e_kept", "e_evicted"):
            assert await stopped.add(entry_id=entry_id, cache_key=f"k-{entry_id}",
                                     params_key="p",
                                     canonical="a red bicycle leaning on a brick wall") is None
        assert not await stopped.add(entry_id="e_never_registered", cache_key="k", params_key="p",
                                     canonical="a red bicycle leaning on a brick wall")
        assert sorted(k.decode() for k in await redis.hkeys(keys.semantic_deferred)) == [
            "e_evicted", "e_kept"]
        assert server.calls("POST", "/v1/embeddings") == []  # nothing waited for a model
        await stopped.embedder.aclose()
        await redis.hdel(keys.entries, "e_evicted")

        restarted = build_semantic(settings, redis)
        assert restarted is not None
        try:
            await restarted.warm()
            assert restarted.deferred_indexing is not None
            assert await restarted.deferred_indexing == 1
        finally:
            await restarted.embedder.aclose()
        assert "e_kept" in restarted.index and "e_evicted" not in restarted.index
        assert await redis.hexists(keys.semantic_vectors, "e_kept")
        assert await redis.hlen(keys.semantic_deferred) == 0
