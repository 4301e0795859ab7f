"""Signed image URLs (issue 16, second half): results carry expiring signed URLs, the web process
serves only those, a rotated key is accepted during its grace period, and the key never shows."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from PIL import Image
from starlette.testclient import TestClient

from consumers.wiring import blob_store
from ops.web import build_app
from promptcache.signing import UrlSigner, Verdict
from tests.conftest import make_settings
from tests.helpers import CountingGenerator, results_for, send, worker_for

KEY = "k3y-that-must-never-show-up-anywhere"


def _path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def test_results_carry_signed_urls_the_web_process_serves(redis, keys, tmp_path,
                                                                redis_url, capsys):
    settings = make_settings(tmp_path, redis_url, keys, url_signing_key=KEY, url_ttl="1h")
    sent_at = int(time.time())
    await send(redis, keys.requests, request_id="s1", prompt="a lighthouse in a storm")
    await send(redis, keys.requests, request_id="s2", prompt="a lighthouse in a storm")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    [miss] = await results_for(redis, keys.results, "s1")
    [hit] = await results_for(redis, keys.results, "s2")
    for result in (miss, hit):
        assert result.image_url and "exp=" in result.image_url and "sig=" in result.image_url
        assert result.thumbnail_url and "sig=" in result.thumbnail_url
    expires = int(urlsplit(hit.image_url).query.split("exp=")[1].split("&")[0])
    # valid for the TTL from when it was published: after we sent, not after now
    assert sent_at + 3600 <= expires <= int(time.time()) + 3600

    app = build_app(blobs=blob_store(settings), redis=None, keys=keys,
                    signer=settings.url_signer())
    with TestClient(app) as client:
        image = client.get(_path_and_query(hit.image_url))
        assert image.status_code == 200
        assert Image.open(io.BytesIO(image.content)).format == "PNG"
        assert client.get(_path_and_query(hit.thumbnail_url)).status_code == 200

        path = urlsplit(hit.image_url).path
        unsigned = client.get(path)
        assert unsigned.status_code == 403
        assert unsigned.json()["error"] == "signature_missing"
        tampered = _path_and_query(hit.image_url).replace("sig=", "sig=A")
        assert client.get(tampered).json()["error"] == "signature_invalid"
        later = _path_and_query(hit.image_url).replace(f"exp={expires}", f"exp={expires + 60}")
        assert client.get(later).status_code == 403  # the expiry is signed too
        # a valid signature for the thumbnail does not open the image
        thumb_query = urlsplit(hit.thumbnail_url).query
        assert client.get(f"{path}?{thumb_query}").status_code == 403

    assert KEY not in capsys.readouterr().out
    assert KEY not in repr(settings) and KEY not in repr(settings.url_signer())
    assert KEY not in miss.model_dump_json() + hit.model_dump_json()


def test_expired_urls_are_refused():
    signer = UrlSigner(KEY, ttl_s=60)
    query = signer.query("/images/x.png", now=time.time() - 120)  # valid until a minute ago
    exp, sig = (part.split("=", 1)[1] for part in query.split("&"))
    assert signer.verify("/images/x.png", exp, sig) is Verdict.EXPIRED
    fresh = signer.query("/images/x.png")
    exp, sig = (part.split("=", 1)[1] for part in fresh.split("&"))
    assert signer.verify("/images/x.png", exp, sig) is Verdict.OK
    assert signer.verify("/images/y.png", exp, sig) is Verdict.INVALID
    assert signer.verify("/images/x.png", "soon", sig) is Verdict.INVALID


def test_a_rotated_key_is_accepted_during_its_grace_period_only():
    old = UrlSigner("the-old-key", ttl_s=3600)
    exp, sig = (p.split("=", 1)[1] for p in old.query("/images/x.png").split("&"))
    now = time.time()
    rotated = UrlSigner("the-new-key", ttl_s=3600, previous="the-old-key",
                        previous_until=now + 600)
    assert rotated.verify("/images/x.png", exp, sig, now=now) is Verdict.OK
    assert rotated.verify("/images/x.png", exp, sig, now=now + 601) is Verdict.INVALID
    assert UrlSigner("the-new-key", ttl_s=3600).verify("/images/x.png", exp, sig) \
        is Verdict.INVALID
    # new URLs are signed with the new key
    exp2, sig2 = (p.split("=", 1)[1] for p in rotated.query("/images/x.png").split("&"))
    assert UrlSigner("the-new-key", ttl_s=3600).verify("/images/x.png", exp2, sig2) is Verdict.OK


def test_settings_build_the_signer_with_its_rotation(tmp_path, keys):
    until = datetime.now(UTC) + timedelta(minutes=5)
    settings = make_settings(tmp_path, "redis://127.0.0.1:1", keys, url_signing_key="new",
                             url_signing_key_previous="old",
                             url_signing_previous_until=until.isoformat())
    signer = settings.url_signer()
    assert signer is not None and signer.ttl_s == 86400  # PROMPTCACHE_URL_TTL default: 1 day
    exp, sig = (p.split("=", 1)[1]
                for p in UrlSigner("old", ttl_s=60).query("/thumbnails/a.webp").split("&"))
    assert signer.verify("/thumbnails/a.webp", exp, sig) is Verdict.OK
    assert make_settings(tmp_path, "redis://127.0.0.1:1", keys).url_signer() is None


async def test_the_dashboard_signs_its_own_image_links(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, url_signing_key=KEY)
    await send(redis, keys.requests, request_id="d1", prompt="a tram at night")
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    app = build_app(blobs=blob_store(settings), redis=redis, keys=keys,
                    signer=settings.url_signer(), admin_token="operator-token")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://web") as client:
        # fresh signed links to the latest images are for the operator only
        assert (await client.get("/api/recent")).status_code == 401
        [row] = (await client.get("/api/recent", headers={
            "Authorization": "Bearer operator-token"})).json()["results"]
        assert "sig=" in row["thumbnail"] and "sig=" in row["image"]
        assert (await client.get(row["thumbnail"])).status_code == 200
        assert (await client.get(row["image"])).status_code == 200
        assert (await client.get(row["thumbnail"].split("?")[0])).status_code == 403


def test_a_signature_with_any_characters_is_refused_not_an_error():
    signer = UrlSigner(KEY, ttl_s=60)
    exp = str(int(time.time()) + 60)
    for sig in ("é", "\udcff", "", "A" * 1000):
        assert signer.verify("/images/x.png", exp, sig) in (Verdict.INVALID, Verdict.MISSING)
