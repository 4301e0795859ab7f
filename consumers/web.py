"""`promptcache web`: serves stored images and thumbnails, and health endpoints.

Only names of the form `<sha256>.<ext>` that resolve inside the store are served; anything else
is a 404, so no path can escape the image store.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from consumers.keys import REQUESTS_GROUP, Keys
from consumers.storage.blobs import CONTENT_TYPES, BlobStore

_IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}


def build_app(*, blobs: BlobStore, redis: aioredis.Redis | None, keys: Keys,
              metrics: CollectorRegistry | None = None) -> Starlette:
    def _file(path: object, name: str) -> Response:
        if path is None or not getattr(path, "is_file", lambda: False)():
            return PlainTextResponse("not found\n", status_code=404)
        ctype = CONTENT_TYPES[name.rsplit(".", 1)[1]]
        return FileResponse(path, media_type=ctype, headers=_IMMUTABLE)  # type: ignore[arg-type]

    async def image(request: Request) -> Response:
        name = request.path_params["name"]
        return _file(blobs.image_path(name), name)

    async def thumbnail(request: Request) -> Response:
        name = request.path_params["name"]
        return _file(blobs.thumbnail_path(name), name)

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
                groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                          for g in await redis.xinfo_groups(keys.requests)}
                checks["group"] = "ok" if REQUESTS_GROUP in groups else "missing"
                ok = ok and REQUESTS_GROUP in groups
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

    return Starlette(routes=[
        Route("/metrics", prometheus),
        Route("/images/{name:path}", image),
        Route("/thumbnails/{name:path}", thumbnail),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ])
