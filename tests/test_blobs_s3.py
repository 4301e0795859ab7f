"""PROMPTCACHE_BLOBS=s3://bucket/prefix against a real S3-speaking server: moto's server mode,
started here as a subprocess on a free port (nothing mocked in-process). The checks read the
bucket with boto3, a client independent of the store's obstore."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta

import boto3
import httpx
import pytest
from pydantic import ValidationError

from consumers.janitor import Janitor
from consumers.wiring import blob_store, registry
from ops import cli
from ops.embedded_servers import free_port
from ops.web import build_app
from promptcache.config import Settings
from promptcache.errors import ConfigError
from promptcache.signing import UrlSigner
from promptcache.storage.blobs import BlobStore
from promptcache.storage.s3 import S3BlobStore
from tests.conftest import make_settings
from tests.helpers import CountingGenerator, results, send, worker_for


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A fresh bucket, with the AWS_* variables the store reads pointing at the server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "promptcache-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "promptcache-test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    name = f"pc-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def s3_settings(tmp_path, redis_url, keys, bucket) -> Settings:
    return make_settings(tmp_path, redis_url, keys, blobs=f"s3://{bucket[1]}/cache/v1")


def _objects(bucket) -> dict[str, bytes]:
    client, name = bucket
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            found[item["Key"]] = client.get_object(Bucket=name, Key=item["Key"])["Body"].read()
    return found


def _sha(result) -> str:
    return result.image_url.rsplit("/", 1)[1].split(".")[0]


async def _a_miss(redis, keys, settings, generator, request_id: str, prompt: str):
    """One request through the real worker: its result (a miss), its image's sha256 and the
    store's `ab/cd` directory of it."""
    await send(redis, keys.requests, request_id=request_id, prompt=prompt)
    await worker_for(settings, redis, generator).run(burst=True)
    first = (await results(redis, keys.results))[0]
    assert (first.status, first.cache) == ("ok", "miss")
    sha = _sha(first)
    return first, sha, f"{sha[:2]}/{sha[2:4]}"


def test_the_setting_chooses_the_store(tmp_path, redis_url, keys, bucket):
    assert isinstance(blob_store(make_settings(tmp_path, redis_url, keys)), BlobStore)
    assert isinstance(blob_store(make_settings(tmp_path, redis_url, keys, blobs="file")), BlobStore)
    chosen = blob_store(make_settings(tmp_path, redis_url, keys, blobs=f"s3://{bucket[1]}/p"))
    assert isinstance(chosen, S3BlobStore) and (chosen.bucket, chosen.prefix) == (bucket[1], "p")
    for wrong in ("s3:/x", "s3://", "gs://bucket/p", "files"):
        with pytest.raises(ValidationError):
            make_settings(tmp_path, redis_url, keys, blobs=wrong)


async def test_a_miss_writes_both_objects_and_a_repeat_is_an_exact_hit(redis, keys, s3_settings,
                                                                     bucket):
    generator = CountingGenerator()
    first, sha, shard = await _a_miss(redis, keys, s3_settings, generator, "s1",
                                      "a lighthouse in fog")
    objects = _objects(bucket)
    assert set(objects) == {f"cache/v1/images/{shard}/{sha}.png",
                            f"cache/v1/thumbnails/{shard}/{sha}.webp"}
    assert objects[f"cache/v1/images/{shard}/{sha}.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert objects[f"cache/v1/thumbnails/{shard}/{sha}.webp"][8:12] == b"WEBP"
    entries = registry(redis, keys, blob_store(s3_settings), s3_settings)
    assert await entries.stored() == sum(len(data) for data in objects.values())
    assert not (s3_settings.data_dir / "images").exists()  # nothing written locally

    await send(redis, keys.requests, request_id="s2", prompt="a lighthouse in fog")
    await worker_for(s3_settings, redis, generator).run(burst=True)
    second = [r for r in await results(redis, keys.results) if r.request_id == "s2"][0]
    assert (second.status, second.cache, second.entry_id) == ("ok", "exact", first.entry_id)
    assert len(generator.calls) == 1
    assert _objects(bucket) == objects


async def test_eviction_deletes_the_objects(redis, keys, s3_settings, bucket):
    await send(redis, keys.requests, request_id="e1", prompt="a red kite over hills")
    await worker_for(s3_settings, redis, CountingGenerator()).run(burst=True)
    result = (await results(redis, keys.results))[0]
    assert len(_objects(bucket)) == 2
    entries = registry(redis, keys, blob_store(s3_settings), s3_settings)
    stored = await entries.stored()
    eviction = await entries.evict(result.entry_id, reason="test")
    assert eviction is not None and eviction.freed == stored > 0
    assert _objects(bucket) == {}
    assert await entries.stored() == 0 and await entries.count() == 0


async def test_the_orphan_sweep_deletes_unreferenced_objects_and_keeps_used_ones(
        redis, keys, s3_settings, bucket):
    await send(redis, keys.requests, request_id="o1", prompt="an orchard at dusk")
    await worker_for(s3_settings, redis, CountingGenerator()).run(burst=True)
    used = _objects(bucket)
    blobs = blob_store(s3_settings)
    stray = blobs.describe(b"written, never registered", "image/png", b"stray thumb")
    blobs.write(stray, b"written, never registered", b"stray thumb")
    assert len(_objects(bucket)) == 4
    time.sleep(2.1)  # S3 times are whole seconds: every object is now older than the grace
    entries = registry(redis, keys, blobs, s3_settings)
    janitor = Janitor(redis=redis, keys=keys, consumer="j1", blobs=blobs, registry=entries,
                      orphan_grace=timedelta(seconds=1))
    assert await janitor.sweep_orphans() == (2, 0)
    assert _objects(bucket) == used  # the stray's image and thumbnail went, the entry's stay
    assert await entries.stored() == sum(len(data) for data in used.values())
    assert await entries.count() == 1


def test_a_write_of_an_existing_blob_is_not_an_error_and_keeps_the_object(s3_settings, bucket):
    blobs = blob_store(s3_settings)
    blob = blobs.describe(b"image bytes", "image/png", b"thumb bytes")
    blobs.write(blob, b"image bytes", b"thumb bytes")
    before = _objects(bucket)
    blobs.write(blob, b"image bytes", b"thumb bytes")  # a repeat
    # a racing writer's create is refused by the server (If-None-Match): the first one stays
    blobs.write(blob, b"other bytes", b"other thumb")
    assert _objects(bucket) == before
    assert blobs.exists(blob.sha256, "image/png")
    assert blobs.delete(blob.sha256, "image/png") == len(b"image bytes") + len(b"thumb bytes")
    assert not blobs.exists(blob.sha256, "image/png")
    assert blobs.delete(blob.sha256, "image/png") == 0  # safe to repeat


async def test_the_web_redirects_to_a_presigned_url_that_serves_the_bytes(
        redis, keys, s3_settings, bucket, s3_endpoint):
    blobs = blob_store(s3_settings)
    image, thumb = b"\x89PNG\r\n\x1a\n fake png", b"RIFF\x00\x00\x00\x00WEBP fake"
    blob = blobs.describe(image, "image/png", thumb)
    blobs.write(blob, image, thumb)
    other = blobs.describe(b"\x89PNG flagged", "image/png", b"t")
    blobs.write(other, b"\x89PNG flagged", b"t")
    await redis.sadd(keys.flagged_blobs, other.sha256)
    signer = UrlSigner("k" * 32, ttl_s=60)
    app = build_app(blobs=blobs, redis=None, cache=redis, keys=keys)
    signed_app = build_app(blobs=blobs, redis=None, cache=redis, keys=keys, signer=signer)
    web = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=web, base_url="http://web") as client, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=signed_app),
                              base_url="http://web") as signed:
        for path, body, ctype in ((f"/images/{blob.image_name}", image, "image/png"),
                                  (f"/thumbnails/{blob.thumbnail_name}", thumb, "image/webp")):
            response = await client.get(path)
            assert response.status_code == 302
            location = response.headers["location"]
            assert location.startswith(f"{s3_endpoint}/{bucket[1]}/cache/v1/")
            async with httpx.AsyncClient() as outside:  # the browser follows it to the bucket
                fetched = await outside.get(location)
            assert (fetched.status_code, fetched.content) == (200, body)
            assert fetched.headers["content-type"] == ctype
            # the signed-URL check comes first, as for local files
            assert (await signed.get(path)).status_code == 403
            assert (await signed.get(signer.sign(path, path))).status_code == 302
        assert (await client.get(f"/images/{other.image_name}")).status_code == 410
        assert (await client.get("/images/" + "0" * 64 + ".png")).status_code == 404
        assert (await client.get(f"/thumbnails/{blob.image_name}")).status_code == 404
        assert (await client.get("/images/..%2Fsecret.png")).status_code == 404


def test_keys_of_other_stores_in_the_bucket_are_left_alone(s3_settings, bucket):
    client, name = bucket
    client.put_object(Bucket=name, Key="cache/v1/images/notes.txt", Body=b"not ours")
    client.put_object(Bucket=name, Key="elsewhere/images/aa/bb/" + "a" * 64 + ".png", Body=b"x")
    assert list(blob_store(s3_settings).listing()) == []


def _public_read(bucket) -> None:
    """Anonymous GETs of the bucket's objects allowed (moto enforces the policy: 403 without)."""
    client, name = bucket
    client.put_bucket_policy(Bucket=name, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                       "Resource": f"arn:aws:s3:::{name}/*"}]}))


async def test_a_public_base_hands_out_urls_straight_at_the_bucket(
        tmp_path, redis_url, redis, keys, bucket, s3_endpoint):
    base = f"{s3_endpoint}/{bucket[1]}/"  # moto's path-style URL: the public-read bucket itself
    settings = make_settings(tmp_path, redis_url, keys, blobs=f"s3://{bucket[1]}/cache/v1",
                             blobs_public_url=base)
    generator = CountingGenerator()
    first, sha, shard = await _a_miss(redis, keys, settings, generator, "p1",
                                      "a tram in the snow")
    image_key = f"cache/v1/images/{shard}/{sha}.png"
    thumb_key = f"cache/v1/thumbnails/{shard}/{sha}.webp"
    assert first.image_url == f"{s3_endpoint}/{bucket[1]}/{image_key}"  # no web, no signature
    assert first.thumbnail_url == f"{s3_endpoint}/{bucket[1]}/{thumb_key}"
    objects = _objects(bucket)
    async with httpx.AsyncClient() as anonymous:  # no credentials, as a browser
        assert (await anonymous.get(first.image_url)).status_code == 403  # not public yet
        _public_read(bucket)
        for url, key, ctype in ((first.image_url, image_key, "image/png"),
                                (first.thumbnail_url, thumb_key, "image/webp")):
            fetched = await anonymous.get(url)
            assert (fetched.status_code, fetched.content) == (200, objects[key])
            assert fetched.headers["content-type"] == ctype
        assert objects[image_key][:8] == b"\x89PNG\r\n\x1a\n"

    await send(redis, keys.requests, request_id="p2", prompt="a tram in the snow")
    await worker_for(settings, redis, generator).run(burst=True)
    hit = [r for r in await results(redis, keys.results) if r.request_id == "p2"][0]
    assert (hit.cache, hit.image_url, hit.thumbnail_url) == ("exact", first.image_url,
                                                             first.thumbnail_url)
    assert len(generator.calls) == 1


async def test_without_a_public_base_urls_go_through_the_web_which_redirects(
        redis, keys, s3_settings, bucket, s3_endpoint):
    await send(redis, keys.requests, request_id="d1", prompt="a kettle on a stove")
    await worker_for(s3_settings, redis, CountingGenerator()).run(burst=True)
    result = (await results(redis, keys.results))[0]
    web = s3_settings.effective_public_url
    assert result.image_url.startswith(f"{web}/images/")
    assert result.thumbnail_url.startswith(f"{web}/thumbnails/")
    objects = _objects(bucket)
    app = build_app(blobs=blob_store(s3_settings), redis=None, cache=redis, keys=keys)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=web) as client, \
            httpx.AsyncClient() as outside:
        for url, kind in ((result.image_url, "images"), (result.thumbnail_url, "thumbnails")):
            response = await client.get(url)
            assert response.status_code == 302
            fetched = await outside.get(response.headers["location"])  # the presigned GET
            name = url.rsplit("/", 1)[1]
            assert (fetched.status_code, fetched.content) == (
                200, objects[f"cache/v1/{kind}/{name[:2]}/{name[2:4]}/{name}"])


def test_a_public_base_is_refused_without_s3_or_with_signing(tmp_path, redis_url, keys, bucket):
    s3 = f"s3://{bucket[1]}/p"
    with pytest.raises(ConfigError, match="needs PROMPTCACHE_BLOBS=s3"):
        blob_store(make_settings(tmp_path, redis_url, keys,
                                 blobs_public_url="https://cdn.example.com"))
    with pytest.raises(ConfigError, match="PROMPTCACHE_URL_SIGNING_KEY"):
        blob_store(make_settings(tmp_path, redis_url, keys, blobs=s3, url_signing_key="k" * 32,
                                 blobs_public_url="https://cdn.example.com"))
    for wrong in ("cdn.example.com", "ftp://cdn.example.com", "https://cdn.example.com/?a=b"):
        with pytest.raises(ValidationError):
            make_settings(tmp_path, redis_url, keys, blobs=s3, blobs_public_url=wrong)
    store = blob_store(make_settings(tmp_path, redis_url, keys, blobs=s3,
                                     blobs_public_url="https://cdn.example.com/img/"))
    assert store.public_urls("ab" * 32, "image/jpeg") == (
        f"https://cdn.example.com/img/p/images/ab/ab/{'ab' * 32}.jpg",
        f"https://cdn.example.com/img/p/thumbnails/ab/ab/{'ab' * 32}.webp")
    assert blob_store(make_settings(tmp_path, redis_url, keys, blobs=s3)).public_urls(
        "ab" * 32, "image/png") is None
    assert blob_store(make_settings(tmp_path, redis_url, keys)).public_urls(
        "ab" * 32, "image/png") is None
    for unset in ({"blobs": s3}, {}):  # empty (compose's `${VAR:-}`) is unset, never refused
        assert blob_store(make_settings(tmp_path, redis_url, keys, blobs_public_url="",
                                        url_signing_key="k" * 32, **unset)).public_urls(
            "ab" * 32, "image/png") is None


@pytest.mark.parametrize("command", ["web", "up"])
def test_the_commands_refuse_a_public_base_with_signing_at_start(
        command, tmp_path, redis_url, bucket, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("PROMPTCACHE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PROMPTCACHE_BLOBS", f"s3://{bucket[1]}/p")
    monkeypatch.setenv("PROMPTCACHE_BLOBS_PUBLIC_URL", "https://cdn.example.com")
    monkeypatch.setenv("PROMPTCACHE_URL_SIGNING_KEY", "k" * 32)
    assert cli.main([command]) == cli.RET_USAGE
    assert "PROMPTCACHE_BLOBS_PUBLIC_URL and PROMPTCACHE_URL_SIGNING_KEY" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # `up`: refused before it started anything
