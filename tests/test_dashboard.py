"""The dashboard's JSON API, flagging (auth, eviction, never served again), the requests an
entry was served to, the CLI's `flag` / `served`, and the Grafana dashboard's metric names.
Real Valkey and PostgreSQL; a real worker and persister."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis as syncredis
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from ops.metrics import RedisCollector
from consumers.persister import Persister
from consumers.wiring import blob_store, registry
from promptcache.storage.db import MetadataStore
from ops.web import build_app
from tests.helpers import CountingGenerator, send, worker_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-admin-token-for-tests"


async def _answer(redis, keys, settings, db, *requests: tuple[str, str]) -> None:
    """Send requests one after another (each answered before the next), then persist."""
    for request_id, prompt in requests:
        await send(redis, keys.requests, request_id=request_id, prompt=prompt)
        await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    if not requests:  # answer whatever the test put on the stream itself
        await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    store = MetadataStore(db)
    try:
        await Persister(redis=redis, keys=keys, store=store, consumer="p1",
                        block=timedelta(milliseconds=100)).run(burst=True)
    finally:
        await store.aclose()


def _app(redis, keys, settings, db, token: str | None = TOKEN) -> httpx.AsyncClient:
    """The web app on the test's event loop (the async Redis client lives there)."""
    blobs = blob_store(settings)
    app = build_app(blobs=blobs, redis=redis, keys=keys,
                    registry=registry(redis, keys, blobs, settings), database_url=db,
                    admin_token=token, storage_limit=int(settings.storage_limit),
                    generator="procedural")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://web")


async def test_summary_and_recent_show_the_requests_that_were_sent(redis, keys, settings, db):
    await _answer(redis, keys, settings, db, ("d1", "a fox in a paper boat"),
                  ("d2", "A fox in a paper boat."), ("d3", "a heron at dawn"))
    await send(redis, keys.requests, raw='{"request_id": "d4", "prompt": ""}')
    await _answer(redis, keys, settings, db)
    async with _app(redis, keys, settings, db) as client:
        page = await client.get("/")
        assert page.status_code == 200 and "/dashboard/dashboard.js" in page.text
        assert (await client.get("/dashboard/dashboard.js")).status_code == 200
        assert (await client.get("/dashboard/../web.py")).status_code == 404
        summary = (await client.get("/api/summary")).json()
        recent = (await client.get("/api/recent")).json()["results"]
        thumbnail = await client.get(recent[1]["thumbnail"])

    figures = summary["database"]
    assert figures["requests"] == 4 and figures["hit_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert figures["generator_calls"] == 2 and figures["generator_calls_avoided"] == 1
    assert set(figures["by_tier"]) == {"exact", "miss", "rejected"}
    assert figures["by_tier"]["exact"]["p50_ms"] is not None
    assert summary["streams"]["entries"] == 2 and summary["streams"]["stored_bytes"] > 0
    assert summary["storage_limit"] == int(settings.storage_limit)
    groups = summary["streams"]["streams"][keys.requests]["groups"]
    assert groups["workers"]["pending"] == 0 and groups["workers"]["lag"] == 0
    health = summary["health"]
    assert [health[p]["status"] for p in ("redis", "cache_store", "postgresql", "generator")] == [
        "ok", "ok", "ok", "ok"]
    assert health["generator"]["name"] == "procedural"

    assert [r["request_id"] for r in recent] == ["d4", "d3", "d2", "d1"]
    assert [r["cache"] for r in recent] == [None, "miss", "exact", "miss"]
    assert recent[0]["status"] == "rejected" and recent[0]["error"] == "invalid_request"
    assert recent[1]["prompt"].startswith("a heron at dawn") and recent[1]["latency_ms"] > 0
    assert recent[2]["entry_id"] == recent[3]["entry_id"]
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/webp"


async def test_flag_needs_a_configured_token_and_the_right_bearer(redis, keys, settings, db):
    await _answer(redis, keys, settings, db, ("a1", "a lamp in the fog"))
    entry_id = (await _recent_entry(redis, keys))
    path = f"/api/entries/{entry_id}/flag"
    async with _app(redis, keys, settings, db, token=None) as client:
        off = await client.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert off.status_code == 403 and "PROMPTCACHE_ADMIN_TOKEN" in off.json()["message"]
    async with _app(redis, keys, settings, db) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            refused = await client.post(path, headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"].startswith("Bearer")
        assert await redis.hget(keys.entries, entry_id) is not None  # nothing changed
        with capture_logs() as logs:
            done = await client.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
        unknown = await client.post("/api/entries/e_nope/flag",
                              headers={"Authorization": f"Bearer {TOKEN}"})
    assert done.status_code == 200 and done.json()["evicted"] == [entry_id]
    assert TOKEN not in json.dumps(logs, default=str)
    assert unknown.status_code == 404


async def _recent_entry(redis, keys) -> str:
    from tests.helpers import results

    return next(r.entry_id for r in reversed(await results(redis, keys.results)) if r.entry_id)


async def test_flagged_image_is_evicted_never_served_and_its_requests_are_listed(
        redis, keys, settings, db):
    await _answer(redis, keys, settings, db, ("f1", "a broken clock tower"),
                  ("f2", "A broken clock tower!"), ("f3", "a quiet harbour"))
    recent_before = None
    async with _app(redis, keys, settings, db) as client:
        recent_before = (await client.get("/api/recent")).json()["results"]
        bad = next(r for r in recent_before if r["request_id"] == "f1")
        record = json.loads(await redis.hget(keys.entries, bad["entry_id"]))
        image_path = blob_store(settings).image_path(bad["image"].rsplit("/", 1)[1])
        assert image_path is not None and image_path.exists()
        assert await redis.exists(keys.exact(record["cache_key"]))

        flagged = await client.post(f"/api/entries/{bad['entry_id']}/flag",
                              json={"reason": "six fingers"},
                              headers={"Authorization": f"Bearer {TOKEN}"})
        assert flagged.status_code == 200, flagged.text
        assert (await client.get(bad["image"])).status_code in (404, 410)
        assert (await client.get(bad["thumbnail"])).status_code in (404, 410)
        after = (await client.get("/api/recent")).json()["results"]
        served = (await client.get(f"/api/entries/{bad['entry_id']}/served")).json()["requests"]

    assert {r["request_id"] for r in after} == {"f3"}  # f1 and f2 showed the bad image
    assert not await redis.exists(keys.exact(record["cache_key"]))
    assert await redis.hget(keys.entries, bad["entry_id"]) is None
    assert not image_path.exists()
    assert await redis.sismember(keys.flagged_blobs, record["blob"])
    assert [(r["request_id"], r["tier"], r["generated"]) for r in served] == [
        ("f1", "miss", True), ("f2", "exact", False)]

    # the eviction reaches PostgreSQL through the change stream; the flag is already there
    await _answer(redis, keys, settings, db)
    import psycopg

    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM cache_entries WHERE entry_id = %s",
                            (bad["entry_id"],)).fetchone() == (0,)
        assert conn.execute("SELECT reason FROM flagged_entries").fetchall() == [("six fingers",)]
        assert conn.execute("SELECT evictions FROM evictions_hourly WHERE reason = 'flagged'"
                            ).fetchone() == (1,)
    # the same prompt again: generated anew (the bad entry is gone for good). The procedural
    # generator is deterministic, like a real backend asked with the same seed, so it makes the
    # flagged bytes again: answered failed/image_flagged, never served; another seed is served
    await _answer(redis, keys, settings, db, ("f4", "a broken clock tower"))
    from tests.helpers import results_for

    [again] = await results_for(redis, keys.results, "f4")
    assert again.status == "failed" and again.error is not None
    assert again.error.code == "image_flagged" and again.image_url is None
    await send(redis, keys.requests, request_id="f5", prompt="a broken clock tower",
               params={"seed": 99})
    await _answer(redis, keys, settings, db)
    [other] = await results_for(redis, keys.results, "f5")
    assert other.cache == "miss" and other.entry_id != bad["entry_id"]


async def test_flag_and_served_from_the_cli(redis, redis_url, keys, settings, db, tmp_path):
    await _answer(redis, keys, settings, db, ("c1", "a kite over dunes"),
                  ("c2", "a kite over dunes."))
    entry_id = await _recent_entry(redis, keys)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
    env.update(REDIS_URL=redis_url, DATABASE_URL=db, PROMPTCACHE_PREFIX=keys.prefix,
               PROMPTCACHE_DATA_DIR=str(settings.data_dir), PROMPTCACHE_LOG_FORMAT="json")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops", *args], env=env, text=True,
                              capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

    served = cli("served", entry_id)
    assert served.returncode == 0, served.stderr
    lines = served.stdout.strip().splitlines()
    assert len(lines) == 2 and "c1" in lines[0] and "(generated it)" in lines[0]
    assert "c2" in lines[1] and "exact" in lines[1]
    flagged = cli("flag", entry_id, "--reason", "wrong colours")
    assert flagged.returncode == 0, flagged.stderr
    assert f"flagged {entry_id}" in flagged.stdout and "not be served again" in flagged.stdout
    assert await redis.hget(keys.entries, entry_id) is None
    missing = cli("flag", "e_0000nothing")
    assert missing.returncode == 1 and "no entry" in missing.stderr
    as_json = json.loads(cli("served", entry_id, "--json").stdout)
    assert [r["request_id"] for r in as_json] == ["c1", "c2"]


async def test_grafana_dashboard_uses_only_metrics_the_web_process_exports(
        redis, redis_url, keys, settings):
    await send(redis, keys.requests, request_id="g1", prompt="a grafana panel of owls")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    metrics = CollectorRegistry()
    sync = syncredis.Redis.from_url(redis_url)
    metrics.register(RedisCollector(sync, keys, 10_000_000))
    try:
        app = build_app(blobs=blob_store(settings), redis=None, keys=keys, metrics=metrics)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://web") as client:
            exported = (await client.get("/metrics")).text
    finally:
        sync.close()
    names = set(re.findall(r"^(promptcache_[a-z_]+)", exported, re.MULTILINE))

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/promptcache.json").read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    used = set(re.findall(r"promptcache_[a-z_]+", " ".join(exprs)))
    assert len(panels) >= 8 and used
    assert used <= names, f"not exported: {sorted(used - names)}"
    datasource = (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    uid = re.search(r"uid:\s*(\S+)", datasource).group(1)
    assert {p["datasource"]["uid"] for p in panels} == {uid}
    scrape = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    assert "/metrics" in scrape or "metrics_path" not in scrape
