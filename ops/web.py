"""`promptcache web`: the dashboard and its JSON API, stored images and thumbnails, Prometheus
metrics and health endpoints.

Only names of the form `<sha256>.<ext>` that resolve inside the store are served; anything else
is a 404, so no path can escape the image store. An image flagged as bad is 410 Gone.

State-changing endpoints (flagging) need `Authorization: Bearer <PROMPTCACHE_ADMIN_TOKEN>`;
without a configured token they answer 403. The token is never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis.asyncio as aioredis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (FileResponse, JSONResponse, PlainTextResponse, RedirectResponse,
                                 Response)
from starlette.routing import Route

from ops import status as overview

from promptcache import invalidation as review
from promptcache.cache.registry import EntryRegistry
from promptcache.keys import REQUESTS_GROUP, Keys
from promptcache.signing import UrlSigner, Verdict
from promptcache.storage.blobs import CONTENT_TYPES, BlobStore
from promptcache.storage.store import Blobs

log = structlog.get_logger(__name__)

_IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}
_NO_STORE = {"Cache-Control": "no-store"}
DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
_DASHBOARD_FILES = {"dashboard.js": "text/javascript; charset=utf-8",
                    "dashboard.css": "text/css; charset=utf-8"}
_ENTRY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status,
                        headers=headers or None)


def build_app(*, blobs: Blobs, redis: aioredis.Redis | None, keys: Keys,
              metrics: CollectorRegistry | None = None, cache: aioredis.Redis | None = None,
              registry: EntryRegistry | None = None, database_url: str | None = None,
              admin_token: str | None = None, storage_limit: int = 0, generator: str = "",
              since: timedelta = timedelta(hours=24),
              signer: UrlSigner | None = None) -> Starlette:
    """`cache` is the cache store (default: the registry's server, else `redis`). With `signer`
    (PROMPTCACHE_URL_SIGNING_KEY), images and thumbnails need a valid, unexpired signature, and
    the dashboard's own image links are signed here."""
    cache = cache or (registry.redis if registry is not None else redis)
    meter = overview.RateMeter()

    async def _flagged(name: str) -> bool:
        if cache is None:
            return False
        try:
            return await review.is_flagged(cache, keys, name.split(".", 1)[0])
        except (RedisError, OSError) as exc:  # serve rather than fail every image
            log.warning("flag_check_unavailable", error=str(exc))
            return False

    async def _file(locate: Callable[[str], Path | str | None], name: str) -> Response:
        """A local file is sent; an object store's image is a redirect to its presigned URL
        (looked up in a thread: a HEAD and a signature), after the same flag check."""
        # a local lookup is a stat, kept on the loop as before; S3 is a network round trip
        where = locate(name) if isinstance(blobs, BlobStore) else \
            await asyncio.to_thread(locate, name)
        if where is None or (isinstance(where, Path) and not where.is_file()):
            return PlainTextResponse("not found\n", status_code=404)
        if await _flagged(name):
            return PlainTextResponse("gone: this image was flagged as bad\n", status_code=410)
        if isinstance(where, str):
            return RedirectResponse(where, status_code=302, headers=_NO_STORE)
        ctype = CONTENT_TYPES[name.rsplit(".", 1)[1]]
        return FileResponse(where, media_type=ctype, headers=_IMMUTABLE)

    def _unsigned(request: Request, path: str) -> Response | None:
        """None when the URL's signature is valid (or signing is off); else the 403."""
        if signer is None:
            return None
        verdict = signer.verify(path, request.query_params.get("exp"),
                                request.query_params.get("sig"))
        if verdict is Verdict.OK:
            return None
        return _error(403, verdict.value, {
            Verdict.MISSING: "this image URL needs its signature (exp and sig)",
            Verdict.EXPIRED: "this image URL has expired: ask for the image again",
            Verdict.INVALID: "this image URL's signature does not match",
        }[verdict])

    async def image(request: Request) -> Response:
        name = request.path_params["name"]
        if (refused := _unsigned(request, f"/images/{name}")) is not None:
            return refused
        return await _file(blobs.image_location, name)

    async def thumbnail(request: Request) -> Response:
        name = request.path_params["name"]
        if (refused := _unsigned(request, f"/thumbnails/{name}")) is not None:
            return refused
        return await _file(blobs.thumbnail_location, name)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(_: Request) -> Response:
        checks: dict[str, str] = {}
        ok = True
        if redis is None:
            checks["redis"], ok = "not configured", False
        else:
            try:
                await redis.ping()
                checks["redis"] = "ok"
                present = True
                for shard in keys.all_shards():  # every shard's requests stream has its group
                    groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                              for g in await redis.xinfo_groups(shard.requests)}
                    present = present and REQUESTS_GROUP in groups
                checks["group"] = "ok" if present else "missing"
                ok = ok and present
            except RedisError as exc:
                checks["redis"], ok = f"error: {exc}", False
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def prometheus(_: Request) -> Response:
        if metrics is None:
            return PlainTextResponse("metrics need REDIS_URL\n", status_code=503)
        try:
            body = await asyncio.to_thread(generate_latest, metrics)
        except RedisError as exc:
            return PlainTextResponse(f"redis unavailable: {exc}\n", status_code=503)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # the dashboard: one static page reading the JSON endpoints below

    async def dashboard(_: Request) -> Response:
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers=_NO_STORE)

    async def dashboard_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _DASHBOARD_FILES:
            return PlainTextResponse("not found\n", status_code=404)
        return FileResponse(DASHBOARD_DIR / name, media_type=_DASHBOARD_FILES[name],
                            headers=_NO_STORE)

    async def summary(request: Request) -> Response:
        # the dashboard's filter: absent or empty, every scope; "-", the shared scope
        scope = request.query_params.get("scope") or None
        scope = "" if scope == "-" else scope
        out: dict[str, Any] = {"at": time.time(), "storage_limit": storage_limit,
                               "streams": None, "rates": None, "database": None}
        health: dict[str, Any] = {"redis": await overview.ping(redis)}
        health["cache_store"] = (health["redis"] if cache is redis
                                 else await overview.ping(cache))
        workers: list[dict[str, Any]] = []
        recent: list[dict[str, Any]] = []
        if redis is not None and health["redis"]["status"] == "ok":
            try:
                usable_cache = cache if health["cache_store"]["status"] == "ok" else None
                streams = await overview.stream_stats(redis, keys, usable_cache or redis)
                if usable_cache is None:
                    streams["stored_bytes"] = streams["entries"] = None
                out["streams"] = streams
                workers = streams["workers"]
                out["rates"] = meter.sample(await overview.result_totals(redis, keys))
                recent = await overview.recent_results(redis, keys, usable_cache, count=200)
            except (RedisError, OSError) as exc:
                health["redis"] = {"status": "down", "detail": str(exc)}
        if database_url:
            started = time.perf_counter()
            try:
                out["database"] = await asyncio.to_thread(overview.database_stats,
                                                          database_url, since, scope)
                out["scopes"] = await asyncio.to_thread(overview.scopes, database_url, since)
                health["postgresql"] = {"status": "ok", "ms": round(
                    (time.perf_counter() - started) * 1000, 1)}
            except (psycopg.Error, OSError) as exc:
                health["postgresql"] = {"status": "down", "detail": str(exc).strip()}
        else:
            health["postgresql"] = {"status": "not configured"}
        health["generator"] = {"name": generator, **overview.generator_health(recent, workers)}
        out["health"] = health
        return JSONResponse(json.loads(json.dumps(out, default=str)), headers=_NO_STORE)

    async def recent_api(request: Request) -> Response:
        # with signed image URLs, the latest results (and fresh links to their images) are for
        # the operator only: the admin token
        if signer is not None and (refused := _refused(request)) is not None:
            return refused
        if redis is None:
            return _error(503, "unavailable", "REDIS_URL is not configured")
        try:
            count = min(max(int(request.query_params.get("count", "48")), 1), 500)
        except ValueError:
            return _error(400, "invalid_request", "count must be a number")
        try:
            rows = await overview.recent_results(redis, keys, cache, count=count)
        except (RedisError, OSError) as exc:
            return _error(503, "unavailable", f"redis unavailable: {exc}")
        if signer is not None:  # the dashboard's links, signed server-side
            for row in rows:
                for field in ("thumbnail", "image"):
                    if row.get(field):
                        row[field] = f"{row[field]}?{signer.query(row[field])}"
        return JSONResponse({"results": rows}, headers=_NO_STORE)

    def _entry_id(request: Request) -> str | None:
        entry_id = request.path_params["entry_id"]
        return entry_id if _ENTRY_ID.match(entry_id) else None

    async def served_api(request: Request) -> Response:
        entry_id = _entry_id(request)
        if entry_id is None:
            return _error(404, "unknown_entry", "not an entry id")
        if not database_url:
            return _error(503, "unavailable", "looking up requests needs DATABASE_URL")
        try:
            rows = await review.served(database_url, entry_id)
        except (psycopg.Error, OSError) as exc:
            return _error(503, "unavailable", f"database unavailable: {exc}")
        return JSONResponse({"entry_id": entry_id, "requests": rows}, headers=_NO_STORE)

    def _refused(request: Request) -> Response | None:
        """None when the request carries the admin token; otherwise the answer to give."""
        if not admin_token:
            return _error(403, "forbidden", "state-changing endpoints are disabled: set "
                          "PROMPTCACHE_ADMIN_TOKEN for the web process to enable them")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), admin_token.encode()):
            return _error(401, "unauthorized", "send Authorization: Bearer <admin token>",
                          **{"WWW-Authenticate": 'Bearer realm="promptcache"'})
        return None

    async def flag_api(request: Request) -> Response:
        if (refused := _refused(request)) is not None:
            return refused
        entry_id = _entry_id(request)
        if entry_id is None:
            return _error(404, "unknown_entry", "not an entry id")
        if redis is None or registry is None or not database_url:
            return _error(503, "unavailable", "flagging needs REDIS_URL and DATABASE_URL")
        reason = None
        body = await request.body()
        if body:
            try:
                reason = str(json.loads(body).get("reason") or "")[:500] or None
            except (ValueError, AttributeError):
                return _error(400, "invalid_request", 'body: {"reason": "..."} or nothing')
        try:
            flagged = await review.flag(redis, keys, registry, database_url, entry_id,
                                        reason=reason)
        except review.UnknownEntry as exc:
            return _error(404, "unknown_entry", str(exc))
        except (RedisError, psycopg.Error, OSError) as exc:
            return _error(503, "unavailable", f"could not flag: {exc}")
        return JSONResponse(flagged.as_dict())

    return Starlette(routes=[
        Route("/", dashboard),
        Route("/dashboard/{name}", dashboard_file),
        Route("/api/summary", summary),
        Route("/api/recent", recent_api),
        Route("/api/entries/{entry_id}/served", served_api),
        Route("/api/entries/{entry_id}/flag", flag_api, methods=["POST"]),
        Route("/metrics", prometheus),
        Route("/images/{name:path}", image),
        Route("/thumbnails/{name:path}", thumbnail),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ])
