"""Chaos: real worker processes on real servers, and the processes and servers really killed.

The one module for it; run just this group with `scripts/test -m chaos`. Each scenario once:
a worker SIGKILLed mid-generation (holding single-flight locks), PostgreSQL stopped and restarted,
a generator answering 429/500/too late, the streams Redis SIGKILLed and restarted from its AOF,
and the cache store stopped and started again.

A test waits until every request it sent is answered and both worker stages have nothing left
unread or pending, then stops the workers, and only then counts the results: no later duplicate
can be published after that count.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import redis as syncredis

from ops.embedded_servers import EmbeddedPostgres, EmbeddedValkey
from promptcache.keys import GENERATE_GROUP, PERSISTER_GROUP, REQUESTS_GROUP, Keys
from promptcache.prompts import canonical_prompt
from promptcache.storage.migrate import apply
from schemas.events import Request, Result
from tests.conftest import MIGRATIONS, make_settings
from tests.helpers import (
    CountingGenerator,
    group_state,
    pending,
    process_env,
    send_request,
    stream_results,
    wait_for,
    worker_for,
    workers,
    workers_idle,
)
from tests.http_fakes import FakeServer, Recorded, Reply, picture_b64

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def _env(tmp_path: Path, redis_url: str, keys: Keys, **extra: str) -> dict[str, str]:
    env = process_env(
        REDIS_URL=redis_url, PROMPTCACHE_PREFIX=keys.prefix,
        PROMPTCACHE_DATA_DIR=str(tmp_path / "data"),
        PROMPTCACHE_LOG_LEVEL=os.environ.get("CHAOS_LOG_LEVEL", "WARNING"),
        PROMPTCACHE_CLAIM_IDLE="1s", PROMPTCACHE_BLOCK="100ms",
        PROMPTCACHE_FLIGHT_LOCK_TTL="2s", PROMPTCACHE_HEALTH_INTERVAL="5s")
    # The service's default configuration, semantic tier included (it once exposed a lease
    # renewer that outlived its release and held a single-flight lock for ever).
    # `CHAOS_EMBEDDINGS=off` runs the group without it.
    env["PROMPTCACHE_EMBEDDINGS"] = os.environ.get("CHAOS_EMBEDDINGS", "local")
    env.update(extra)
    return env


def _logs(env: dict[str, str]) -> Path:
    return Path(env["PROMPTCACHE_DATA_DIR"]).parent / "logs"


def _settled(r: syncredis.Redis, keys: Keys, expected: set[str], timeout: float,
             what: str) -> None:
    """Wait until every expected id has a result and both stages have nothing unread or held
    (entries a killed worker held are claimed after `claim_idle` and settled too)."""
    wait_for(lambda: {x.request_id for x in stream_results(r, keys)} >= expected
             and workers_idle(r, keys), timeout, what)


def assert_each_answered_once(r: syncredis.Redis, keys: Keys, expected: set[str]) -> list[Result]:
    """Exactly one result per request id and no dead letters. Call it once the workers have
    stopped, after `_settled`: the results are final then."""
    got = stream_results(r, keys)
    counts = Counter(x.request_id for x in got)
    assert set(counts) == expected, set(counts) ^ expected
    assert [rid for rid, n in counts.items() if n > 1] == []
    assert r.xlen(keys.dead_letter) == 0, r.xrange(keys.dead_letter)
    return got


def _locks(r: syncredis.Redis, keys: Keys) -> int:
    return sum(1 for _ in r.scan_iter(match=f"{keys.prefix}:cache:flight:*"))


def _all_read(r: syncredis.Redis, keys: Keys) -> bool:
    return group_state(r, keys.requests, REQUESTS_GROUP)[1] == 0 == group_state(
        r, keys.generate, GENERATE_GROUP)[1]


SUBJECTS = ("a harbour at dawn", "a windmill in a tulip field", "an astronaut eating noodles")


def test_worker_sigkilled_mid_generation_loses_nothing_and_makes_each_picture_once(
        redis_url, keys, tmp_path):
    """The victim worker takes three requests and generates them (never finishing: 60 s each),
    holding their single-flight locks. A second worker takes a stream of other requests
    (repeats, resubmitted ids) and rewrites of the victim's three, which wait on its locks. The
    victim is SIGKILLed: its requests are claimed after `claim_idle`, its locks run out after
    their TTL and the survivor takes them over. Every id is answered once, and every prompt by
    one picture: nothing was generated twice."""
    env = _env(tmp_path, redis_url, keys)
    r = syncredis.Redis.from_url(redis_url)
    prompt_of: dict[str, str] = {}

    def send(request_id: str, prompt: str) -> None:
        send_request(r, keys, request_id, prompt)
        prompt_of[request_id] = prompt

    with workers({**env, "PROMPTCACHE_GENERATOR_LATENCY_MS": "60000"}, 1, _logs(env)) as [victim]:
        for i, subject in enumerate(SUBJECTS):
            send(f"held-{i}", f"an interrupted painting of {subject}")
        wait_for(lambda: _locks(r, keys) == 3 and _all_read(r, keys), 90,
                 "the victim to take all three and lock their generations")
        with workers({**env, "PROMPTCACHE_GENERATOR_LATENCY_MS": "200"}, 1, _logs(env)):
            for i, subject in enumerate(SUBJECTS):  # the victim's keys: they wait on its locks
                send(f"waiting-{i}", f"An interrupted painting of {subject}.")
            for i in range(30):
                send(f"load-{i}", f"a street scene under load, variant {i % 12}")
                if i % 8 == 0:  # a resubmitted id: answered once all the same
                    send(f"load-{i}", f"a street scene under load, variant {i % 12}")
            wait_for(lambda: len(stream_results(r, keys)) >= 5, 90, "the survivor's answers")
            assert not [x for x in stream_results(r, keys) if x.request_id.startswith("held-")]
            victim.send_signal(signal.SIGKILL)  # mid-generation, holding its locks
            victim.wait(10)
            _settled(r, keys, set(prompt_of), 120, "every request answered after the kill")
        # both workers are stopped: nothing more can be published
    got = assert_each_answered_once(r, keys, set(prompt_of))
    assert {x.status for x in got} == {"ok"}, [x for x in got if x.status != "ok"]
    pictures: dict[str, set[str]] = {}
    for x in got:
        pictures.setdefault(canonical_prompt(prompt_of[x.request_id]), set()).add(x.entry_id)
    assert {p: e for p, e in pictures.items() if len(e) != 1} == {}  # one generation each


def test_postgres_stopped_and_restarted_results_unaffected_backlog_written(
        redis_url, keys, tmp_path):
    pg = EmbeddedPostgres(tmp_path / "pg" / "data").start()
    try:
        url = pg.url
        apply(url, MIGRATIONS)
        env = _env(tmp_path, redis_url, keys, DATABASE_URL=url,
                   PROMPTCACHE_GENERATOR_LATENCY_MS="50")
        r = syncredis.Redis.from_url(redis_url)

        def entries() -> int:
            try:
                with psycopg.connect(url, connect_timeout=2) as conn:
                    return int(conn.execute("SELECT count(*) FROM cache_entries").fetchone()[0])
            except psycopg.OperationalError:
                return -1

        expected: set[str] = set()
        with workers(env, 1, _logs(env)):
            for i in range(10):
                send_request(r, keys, f"pg-up-{i}", f"a database that is up, scene {i}")
                expected.add(f"pg-up-{i}")
            wait_for(lambda: entries() == 10, 60, "the first ten persisted")
            pg.pg_ctl("stop")
            for i in range(10):
                send_request(r, keys, f"pg-down-{i}", f"a database that is down, scene {i}")
                expected.add(f"pg-down-{i}")
            wait_for(lambda: len(stream_results(r, keys)) == 20, 60,
                     "answers while PostgreSQL is down")
            down = [x for x in stream_results(r, keys) if x.request_id.startswith("pg-down")]
            assert {x.status for x in down} == {"ok"} and {x.cache for x in down} == {"miss"}
            wait_for(lambda: pending(r, keys.changes, PERSISTER_GROUP) > 0, 30,
                     "the persister to hold the events it cannot write")
            pg.pg_ctl("start")
            # all twenty rows: the events read while PostgreSQL was down were kept, not dropped
            wait_for(lambda: entries() == 20, 90, "the backlog written after the restart")
            wait_for(lambda: pending(r, keys.changes, PERSISTER_GROUP) == 0, 30,
                     "the persister to catch up")
            _settled(r, keys, expected, 30, "both stages idle")
        assert_each_answered_once(r, keys, expected)
    finally:
        pg.stop()


def _flaky_a1111(seed: int) -> Callable[[Recorded], Reply]:
    """An AUTOMATIC1111 API that answers 429 (Retry-After), 500 or too late a third of the
    time each for the first calls, then mostly recovers."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def respond(request: Recorded) -> Reply:
        with lock:
            roll = rng.random()
        if roll < 0.2:
            return Reply(429, headers={"Retry-After": "0"}, json={"error": "rate limited"})
        if roll < 0.4:
            return Reply(500, json={"error": "CUDA out of memory"})
        if roll < 0.5:
            return Reply(delay=3.0, json={})  # past the generator timeout
        body = request.json()  # the size asked for: the quality gate checks it
        return Reply(json={"images": [picture_b64(body["width"], body["height"])],
                           "parameters": {}, "info": '{"seed": 1}'})

    return respond


def test_generator_returning_429_500_and_timeouts(redis_url, keys, tmp_path):
    """Every request ends as exactly one `ok` or `failed` result with a generator code; the
    breaker stops hammering the backend; nothing is dead-lettered."""
    with FakeServer() as server:
        server.on("POST", "/sdapi/v1/txt2img", _flaky_a1111(seed=6))
        env = _env(tmp_path, redis_url, keys, PROMPTCACHE_GENERATOR="automatic1111",
                   PROMPTCACHE_GENERATOR_URL=server.url, PROMPTCACHE_GENERATOR_TIMEOUT="1500ms",
                   PROMPTCACHE_GENERATOR_MAX_RETRIES="2", PROMPTCACHE_CLAIM_IDLE="5s",
                   PROMPTCACHE_GENERATOR_BREAKER_FAILURES="3",
                   PROMPTCACHE_GENERATOR_BREAKER_COOLDOWN="500ms")
        r = syncredis.Redis.from_url(redis_url)
        expected = {f"flaky-{i}" for i in range(30)}
        with workers(env, 2, _logs(env)):
            for i in range(30):
                send_request(r, keys, f"flaky-{i}", f"a flaky backend, picture {i}")
            _settled(r, keys, expected, 120, "every request answered")
        got = assert_each_answered_once(r, keys, expected)
    statuses = Counter(x.status for x in got)
    assert set(statuses) <= {"ok", "failed"} and statuses["ok"] > 0, statuses
    codes = {x.error.code for x in got if x.error}
    assert codes <= {"generator_unavailable", "generator_timeout"}, codes


def test_streams_redis_killed_and_restarted_with_aof_loses_nothing(tmp_path, keys):
    """The streams Redis is SIGKILLed (no shutdown, no final fsync) while a worker answers:
    every result read before the kill is still there after the restart, unchanged, and every
    request (before and after) is answered once."""
    server = EmbeddedValkey(tmp_path / "valkey").start()
    env = _env(tmp_path, server.url, keys, PROMPTCACHE_GENERATOR_LATENCY_MS="300",
               PROMPTCACHE_CLAIM_IDLE="2s", PROMPTCACHE_EMBEDDINGS="off")
    expected = {f"before-{i}" for i in range(20)} | {f"after-{i}" for i in range(10)}
    try:
        with workers(env, 1, _logs(env)):
            r = syncredis.Redis.from_url(server.url)
            for i in range(20):
                send_request(r, keys, f"before-{i}", f"prompt {i % 7}")
            wait_for(lambda: r.xlen(keys.results) >= 3, 60, "some answers before the kill")
            delivered = r.xrange(keys.results)  # what a client may already have acted on
            server.kill()
            r.close()
            server = EmbeddedValkey(server.data_dir, port=server.port).start()
            r = syncredis.Redis.from_url(server.url)
            for i in range(10):
                send_request(r, keys, f"after-{i}", f"prompt {i % 7}")
            _settled(r, keys, expected, 90, "every request answered after the restart")
        kept = dict(r.xrange(keys.results))
        assert [(mid, kept.get(mid)) for mid, _ in delivered] == delivered  # none lost
        assert_each_answered_once(r, keys, expected)
        r.close()
    finally:
        server.stop()


async def test_cache_store_down_then_back_bypasses_then_caches_again(redis_url, keys, tmp_path):
    """CACHE_REDIS_URL on its own server: while it is down every request is still answered
    (`bypass`); once it is back the cache is used again without a restart."""
    from consumers.wiring import cache_client, streams_client

    cache_server = EmbeddedValkey(tmp_path / "cache").start()
    settings = make_settings(tmp_path, redis_url, keys, cache_redis_url=cache_server.url)
    streams = streams_client(redis_url)
    cache = cache_client(cache_server.url, settings)
    sync = syncredis.Redis.from_url(redis_url)
    try:
        async def ask(request_id: str) -> str:
            await streams.xadd(keys.requests, {"data": Request(
                request_id=request_id, prompt="a lighthouse in fog").model_dump_json()})
            await worker_for(settings, streams, CountingGenerator(), cache_redis=cache).run(
                burst=True)
            return next(x.cache for x in stream_results(sync, keys)
                        if x.request_id == request_id)

        assert await ask("c1") == "miss"
        assert await ask("c2") == "exact"
        cache_server.stop()
        assert await ask("c3") == "bypass"
        cache_server = EmbeddedValkey(cache_server.data_dir, port=cache_server.port).start()
        assert await ask("c4") == "exact"  # the AOF kept the entry; the client reconnected
    finally:
        await streams.aclose()
        await cache.aclose()
        sync.close()
        cache_server.stop()
