"""Chaos: real worker processes on real servers, and the servers really killed.

Run just this group (with the chaos tests in tests/test_processes.py, tests/test_flight.py and
tests/test_storage.py) with `scripts/test -m chaos`. Each test asserts that every request was
answered exactly once, nothing is left pending and nothing is in the dead letters that should not
be there.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis as syncredis

from ops.embedded_servers import EmbeddedPostgres
from promptcache.keys import GENERATE_GROUP, PERSISTER_GROUP, REQUESTS_GROUP, Keys
from promptcache.storage.migrate import apply
from schemas.events import Request, Result
from tests.conftest import MIGRATIONS
from tests.helpers import process_env
from tests.helpers import stream_results as _results
from tests.helpers import wait_for as _wait
from tests.http_fakes import FakeServer, Recorded, Reply, png_b64

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def _env(tmp_path: Path, redis_url: str, keys: Keys, **extra: str) -> dict[str, str]:
    env = process_env()
    env.update(REDIS_URL=redis_url, PROMPTCACHE_PREFIX=keys.prefix,
               PROMPTCACHE_DATA_DIR=str(tmp_path / "data"), PROMPTCACHE_LOG_LEVEL=os.environ.get("CHAOS_LOG_LEVEL", "WARNING"),
               PROMPTCACHE_CLAIM_IDLE="1s", PROMPTCACHE_BLOCK="100ms",
               PROMPTCACHE_FLIGHT_LOCK_TTL="2s", PROMPTCACHE_HEALTH_INTERVAL="5s")
    # The service's default configuration, semantic tier included (it once exposed a lease
    # renewer that outlived its release and held a single-flight lock for ever; see
    # test_flight.py). `CHAOS_EMBEDDINGS=off` runs the group without it.
    env["PROMPTCACHE_EMBEDDINGS"] = os.environ.get("CHAOS_EMBEDDINGS", "local")
    env.update(extra)
    return env


@contextmanager
def workers(env: dict[str, str], n: int = 1) -> Iterator[list[subprocess.Popen[bytes]]]:
    """n `promptcache worker` processes; SIGTERM (then SIGKILL) on the way out."""
    procs = [_start(env) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    logs = Path(env["PROMPTCACHE_DATA_DIR"]).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"worker-{time.monotonic_ns()}.log", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "ops", "worker"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def _send(r: syncredis.Redis, keys: Keys, request_id: str, prompt: str) -> None:
    r.xadd(keys.requests, {"data": Request(request_id=request_id, prompt=prompt)
                           .model_dump_json(exclude_none=True)})


def _pending(r: syncredis.Redis, stream: str, group: str) -> int:
    try:
        return int(r.xpending(stream, group)["pending"])
    except syncredis.ResponseError:
        return 0


def assert_each_answered_once(r: syncredis.Redis, keys: Keys, expected: set[str]) -> list[Result]:
    """Exactly one result per request id, nothing held by any worker, no dead letters.

    Entries a killed worker held whose request was answered meanwhile (a resubmitted id) are
    taken over after `claim_idle` and acknowledged as duplicates: waited for, within a bound."""
    _wait(lambda: _pending(r, keys.requests, REQUESTS_GROUP) == 0
          and _pending(r, keys.generate, GENERATE_GROUP) == 0, 30, "nothing left pending")
    time.sleep(0.5)  # a duplicate would be published by now
    got = _results(r, keys)
    counts = Counter(x.request_id for x in got)
    assert set(counts) == expected, set(counts) ^ expected
    assert [rid for rid, n in counts.items() if n > 1] == []
    assert r.xlen(keys.dead_letter) == 0, r.xrange(keys.dead_letter)
    return got


def test_worker_sigkill_under_load(redis_url, keys, tmp_path):
    """Two workers share a stream of requests (repeats, resubmitted ids); one is SIGKILLed in
    the middle and a replacement starts; every id gets one result."""
    env = _env(tmp_path, redis_url, keys, PROMPTCACHE_GENERATOR_LATENCY_MS="400")
    r = syncredis.Redis.from_url(redis_url)
    expected: set[str] = set()
    with workers(env, 2) as procs:
        for i in range(60):
            _send(r, keys, f"load-{i}", f"a street scene under load, variant {i % 25}")
            expected.add(f"load-{i}")
            if i % 12 == 0:
                _send(r, keys, f"load-{i}", f"a street scene under load, variant {i % 25}")
            time.sleep(0.02)
        _wait(lambda: len(_results(r, keys)) >= 10, 60, "the first answers")
        procs[0].send_signal(signal.SIGKILL)  # mid-generation, mid-publish: wherever it is
        procs[0].wait(10)
        procs.append(_start(env))
        _wait(lambda: {x.request_id for x in _results(r, keys)} == expected, 90,
              "every request answered after the kill")
        got = assert_each_answered_once(r, keys, expected)
    assert {x.status for x in got} == {"ok"}
    # 25 distinct pictures: repeats were answered from the cache or coalesced
    assert len({x.entry_id for x in got}) <= 25 + 5


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
        with workers(env, 1):
            for i in range(10):
                _send(r, keys, f"pg-up-{i}", f"a database that is up, scene {i}")
                expected.add(f"pg-up-{i}")
            _wait(lambda: entries() == 10, 60, "the first ten persisted")
            pg.pg_ctl("stop")
            for i in range(10):
                _send(r, keys, f"pg-down-{i}", f"a database that is down, scene {i}")
                expected.add(f"pg-down-{i}")
            _wait(lambda: len(_results(r, keys)) == 20, 60, "answers while PostgreSQL is down")
            down = [x for x in _results(r, keys) if x.request_id.startswith("pg-down")]
            assert {x.status for x in down} == {"ok"} and {x.cache for x in down} == {"miss"}
            time.sleep(1.0)
            backlog = r.xinfo_groups(keys.changes)
            persister = next(g for g in backlog if g["name"] == PERSISTER_GROUP.encode())
            assert (persister["lag"] or 0) + persister["pending"] > 0  # kept, not dropped
            pg.pg_ctl("start")
            _wait(lambda: entries() == 20, 90, "the backlog written after the restart")
            _wait(lambda: _pending(r, keys.changes, PERSISTER_GROUP) == 0, 30,
                  "the persister to catch up")
            assert_each_answered_once(r, keys, expected)
    finally:
        pg.stop()


def _flaky_a1111(seed: int) -> Callable[[Recorded], Reply]:
    """An AUTOMATIC1111 API that answers 429 (Retry-After), 500 or too late a third of the
    time each for the first calls, then mostly recovers."""
    rng = random.Random(seed)
    lock = threading.Lock()
    ok = Reply(json={"images": [png_b64()], "parameters": {}, "info": '{"seed": 1}'})

    def respond(_: Recorded) -> Reply:
        with lock:
            roll = rng.random()
        if roll < 0.2:
            return Reply(429, headers={"Retry-After": "0"}, json={"error": "rate limited"})
        if roll < 0.4:
            return Reply(500, json={"error": "CUDA out of memory"})
        if roll < 0.5:
            return Reply(delay=3.0, json={})  # past the generator timeout
        return ok

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
        with workers(env, 2):
            for i in range(30):
                _send(r, keys, f"flaky-{i}", f"a flaky backend, picture {i}")
            _wait(lambda: {x.request_id for x in _results(r, keys)} == expected, 120,
                  "every request answered")
            got = assert_each_answered_once(r, keys, expected)
    statuses = Counter(x.status for x in got)
    assert set(statuses) <= {"ok", "failed"} and statuses["ok"] > 0, statuses
    codes = {x.error.code for x in got if x.error}
    assert codes <= {"generator_unavailable", "generator_timeout"}, codes
