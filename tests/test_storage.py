"""Migrations, the persister and the blob store, on real PostgreSQL and real files."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import psycopg
import pytest

from promptcache.keys import PERSISTER_GROUP
from consumers.persister import Persister
from promptcache.storage.blobs import BlobStore
from promptcache.storage.db import MetadataStore
from promptcache.storage.migrate import MigrationError, apply, discover
from tests.conftest import MIGRATIONS
from tests.helpers import CountingGenerator, results, send, worker_for


def _fresh_database(admin_url: str) -> str:
    name = f"pc_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return psycopg.conninfo.make_conninfo(admin_url, dbname=name)


def test_migrations_apply_once_in_order_and_are_recorded(database_url, tmp_path):
    url = _fresh_database(database_url)
    everything = [m.version for m in discover(MIGRATIONS)]
    assert everything[:2] == ["0001", "0002"]
    assert apply(url, MIGRATIONS) == everything
    assert apply(url, MIGRATIONS) == []  # second run: nothing to do
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
        assert rows[:2] == [("0001", "cache_entries"), ("0002", "stats_hourly")]
        assert conn.execute("SELECT to_regclass('cache_entries')").fetchone()[0] == "cache_entries"


def test_an_applied_migration_that_changed_is_refused(database_url, tmp_path):
    url = _fresh_database(database_url)
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, copy)
    apply(url, copy)
    first = sorted(copy.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="forward-only"):
        apply(url, copy)


def test_concurrent_migrators_apply_each_file_once(database_url, tmp_path):
    url = _fresh_database(database_url)
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, copy)
    (copy / "0999_slow.sql").write_text("SELECT pg_sleep(0.5); CREATE TABLE only_once (x int);")

    async def both() -> list[list[str]]:
        return await asyncio.gather(asyncio.to_thread(apply, url, copy),
                                    asyncio.to_thread(apply, url, copy))

    outcomes = asyncio.run(both())
    assert sorted(map(tuple, outcomes)) == [(), (*[m.version for m in discover(MIGRATIONS)],
                                                 "0999")]


def test_badly_named_migration_is_an_error(tmp_path):
    (tmp_path / "1_bad.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="NNNN_name.sql"):
        apply("postgresql://unused", tmp_path)


async def test_persister_writes_entries_and_hits_idempotently(redis, keys, settings, db):
    gen = CountingGenerator()
    await send(redis, keys.requests, request_id="p1", prompt="an orchard in spring")
    await worker_for(settings, redis, gen).run(burst=True)
    await send(redis, keys.requests, request_id="p2", prompt="An orchard in spring.")
    await worker_for(settings, redis, gen).run(burst=True)

    store = MetadataStore(db)
    persister = Persister(redis=redis, keys=keys, store=store, consumer="p", block=_ms(100))
    await persister.run(burst=True)
    # the same events once more (a redelivery): nothing doubles
    events = [e for _, e in await redis.xrange(keys.changes)]
    await redis.xgroup_setid(keys.changes, PERSISTER_GROUP, "0")
    await persister.run(burst=True)
    await store.aclose()
    assert len(events) == 3  # the miss's answer + entry_stored, the hit's answer
    with psycopg.connect(db) as conn:
        stats = conn.execute("SELECT tier, status, requests, generator_calls,"
                             " generator_seconds_avoided > 0, bytes_stored > 0"
                             " FROM stats_hourly ORDER BY tier").fetchall()
        assert stats == [("exact", "ok", 1, 0, True, False), ("miss", "ok", 1, 1, False, True)]
        entries = conn.execute("SELECT entry_id, prompt, hit_count, image_bytes, params->>'model'"
                               " FROM cache_entries").fetchall()
        hits = conn.execute("SELECT request_id, tier FROM cache_hits").fetchall()
    [result1] = [r for r in await results(redis, keys.results) if r.request_id == "p1"]
    assert entries == [(result1.entry_id, "an orchard in spring", 1, entries[0][3], "procedural-v1")]
    assert entries[0][3] > 0 and hits == [("p2", "exact")]


def test_blob_store_is_content_addressed_and_refuses_paths_outside(tmp_path: Path):
    store = BlobStore(tmp_path / "images", tmp_path / "thumbs")
    blob = store.put(b"\x89PNG fake", "image/png", b"thumb")
    again = store.put(b"\x89PNG fake", "image/png", b"thumb")
    assert blob == again and store.exists(blob.sha256, "image/png")
    assert store.image_path(blob.image_name).read_bytes() == b"\x89PNG fake"
    for name in ("../../etc/passwd", f"../{blob.image_name}", f"{blob.sha256}.exe",
                 f"{blob.sha256[:-1]}.png", "", "/etc/passwd", f"{blob.sha256}.png/../x"):
        assert store.image_path(name) is None
    assert store.thumbnail_path(blob.image_name) is None  # only .webp names are thumbnails
    assert store.delete(blob.sha256, "image/png") == len(b"\x89PNG fake") + len(b"thumb")
    assert store.delete(blob.sha256, "image/png") == 0 and not store.exists(blob.sha256, "image/png")


def _ms(value: int):
    from datetime import timedelta

    return timedelta(milliseconds=value)
