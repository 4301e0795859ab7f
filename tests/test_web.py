"""`promptcache web`: images and thumbnails from the store only, health endpoints."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from starlette.testclient import TestClient

from promptcache.keys import Keys
from promptcache.storage.blobs import BlobStore
from promptcache.thumbnails import make_thumbnail
from ops.web import build_app


@pytest.fixture
def store_and_client(tmp_path):
    store = BlobStore(tmp_path / "images", tmp_path / "thumbnails")
    (tmp_path / "secret.txt").write_text("do not serve me")
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 200, 30)).save(out, format="PNG")
    blob = store.put(out.getvalue(), "image/png", make_thumbnail(out.getvalue(), 128))
    with TestClient(build_app(blobs=store, redis=None, keys=Keys("t"))) as client:
        yield blob, client


def test_serves_the_image_and_its_webp_thumbnail(store_and_client):
    blob, client = store_and_client
    image = client.get(f"/images/{blob.image_name}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (640, 480)
    thumb = client.get(f"/thumbnails/{blob.thumbnail_name}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 128
    assert "immutable" in image.headers["cache-control"]


@pytest.mark.parametrize("path", [
    "/images/../secret.txt", "/images/..%2Fsecret.txt", "/images/%2e%2e/%2e%2e/secret.txt",
    "/images/secret.txt", "/thumbnails/../../secret.txt", "/images/" + "0" * 64 + ".png",
    "/images//etc/passwd", "/images/" + "a" * 64 + ".png%00.txt",
])
def test_refuses_anything_outside_the_store(store_and_client, path):
    _, client = store_and_client
    response = client.get(path)
    assert response.status_code == 404
    assert b"do not serve me" not in response.content


def test_health_endpoints(store_and_client):
    _, client = store_and_client
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False


async def test_metrics_report_results_latency_storage_and_streams(redis, redis_url, keys, settings):
    import redis as syncredis
    from prometheus_client import CollectorRegistry

    from ops.metrics import RedisCollector
    from consumers.wiring import blob_store
    from tests.helpers import CountingGenerator, send, worker_for

    await send(redis, keys.requests, request_id="m1", prompt="a metric of foxes")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    await send(redis, keys.requests, request_id="m2", prompt="A metric of foxes.")
    await send(redis, keys.requests, raw='{"request_id": "m3", "prompt": ""}')
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)

    registry = CollectorRegistry()
    sync = syncredis.Redis.from_url(redis_url)
    registry.register(RedisCollector(sync, keys, 10_000_000))
    app = build_app(blobs=blob_store(settings), redis=None, keys=keys, metrics=registry)
    with TestClient(app) as client:
        text = client.get("/metrics").text
    sync.close()
    assert 'promptcache_results_total{cache="miss",status="ok"} 1.0' in text
    assert 'promptcache_results_total{cache="exact",status="ok"} 1.0' in text
    assert 'promptcache_results_total{cache="",status="rejected"} 1.0' in text
    assert 'promptcache_request_latency_seconds_bucket{cache="exact",le="+Inf"} 1.0' in text
    assert 'promptcache_request_latency_seconds_bucket{cache="miss",le="300.0"} 1.0' in text
    assert "promptcache_stored_bytes " in text and "promptcache_entries 1.0" in text
    assert f'promptcache_stream_pending{{group="workers",stream="{keys.requests}"}} 0.0' in text
    stored = [ln for ln in text.splitlines() if ln.startswith("promptcache_stored_bytes ")]
    assert float(stored[0].split()[1]) > 0
