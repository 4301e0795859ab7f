"""Content-addressed image blobs in an S3-compatible bucket (`PROMPTCACHE_BLOBS=s3://bucket/prefix`).

The layout is the local store's under the prefix: `<prefix>/images/ab/cd/<sha256>.<ext>` and
`<prefix>/thumbnails/ab/cd/<sha256>.webp`. Credentials, region and endpoint come from the
standard `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
`AWS_ENDPOINT_URL`, ...), read by obstore (the Rust `object_store` crate).

- writes are create-if-absent (`PutMode` "create": `If-None-Match: *`): the object of a
  sha256 is written once, a repeat or a race finds it there and is not an error;
- `exists` is a HEAD, `delete` a HEAD (for the bytes freed) then a DELETE;
- the orphan sweep lists the bucket page by page (LIST with continuation);
- images are served by redirecting to a presigned GET (`image_location`);
- with a public base (`PROMPTCACHE_BLOBS_PUBLIC_URL`: a CDN in front of the bucket, or the
  public-read bucket itself), results carry `<base>/<key>` instead (`public_urls`), read straight
  from the bucket without the web process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import quote, urlsplit

import obstore
import structlog
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.store import S3Store

from promptcache.storage.blobs import EXTENSIONS, Listed, StoredBlob, describe, parse_name, shard

log = structlog.get_logger(__name__)

PRESIGN_TTL = timedelta(minutes=15)  # a redirect is followed at once; the URL need not last
_IMMUTABLE = "public, max-age=31536000, immutable"


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    return parts.netloc, parts.path.strip("/")


class S3BlobStore:
    def __init__(self, url: str, *, presign_ttl: timedelta = PRESIGN_TTL,
                 public_base: str | None = None) -> None:
        """`public_base`: where the bucket's objects are publicly readable, e.g.
        `https://cdn.example.com` (a CDN whose origin is the bucket) or
        `https://bucket.s3.eu-west-1.amazonaws.com`; an object's URL is the base + its key."""
        self.bucket, self.prefix = parse_url(url)
        self.public_base = public_base.rstrip("/") if public_base else None
        endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or os.environ.get("AWS_ENDPOINT") or "")
        # the rest (keys, region, endpoint) from the AWS_* variables; plain http only when the
        # endpoint says so (a local MinIO, moto, ...)
        self.store = S3Store(self.bucket,
                             client_options={"allow_http": endpoint.startswith("http://")})
        self.presign_ttl = presign_ttl

    def _key(self, kind: str, name: str) -> str:
        return "/".join(filter(None, (self.prefix, kind, shard(name))))

    describe = staticmethod(describe)

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            obstore.put(self.store, key, data, mode="create",
                        attributes={"Content-Type": content_type, "Cache-Control": _IMMUTABLE})
        except (AlreadyExistsError, PreconditionError):
            pass  # content-addressed: the same bytes are there already

    def write(self, blob: StoredBlob, data: bytes, thumbnail: bytes) -> None:
        self._put(self._key("images", blob.image_name), data, blob.content_type)
        self._put(self._key("thumbnails", blob.thumbnail_name), thumbnail, "image/webp")

    def _size(self, key: str) -> int | None:
        try:
            return int(obstore.head(self.store, key)["size"])
        except (NotFoundError, FileNotFoundError):
            return None

    def exists(self, sha256: str, content_type: str) -> bool:
        name = f"{sha256}.{EXTENSIONS.get(content_type, 'png')}"
        return self._size(self._key("images", name)) is not None

    def delete(self, sha256: str, content_type: str) -> int:
        freed = 0
        for key in (self._key("images", f"{sha256}.{EXTENSIONS[content_type]}"),
                    self._key("thumbnails", f"{sha256}.webp")):
            size = self._size(key)
            if size is not None:
                self.delete_name(key)
                freed += size
        return freed

    def listing(self) -> Iterator[Listed]:
        for kind in ("images", "thumbnails"):
            root = "/".join(filter(None, (self.prefix, kind))) + "/"
            for page in obstore.list(self.store, root, chunk_size=1000):
                for meta in page:
                    key = meta["path"]
                    parsed = parse_name(key.rsplit("/", 1)[-1])
                    if parsed is None:
                        continue  # not ours: left alone
                    yield Listed(parsed[0], key, meta["last_modified"].timestamp())

    def delete_name(self, name: str) -> None:
        try:
            obstore.delete(self.store, name)
        except (NotFoundError, FileNotFoundError):
            pass

    def _location(self, kind: str, name: str) -> str | None:
        parsed = parse_name(name)
        if parsed is None or (kind == "thumbnails" and parsed[1] != "webp"):
            return None
        key = self._key(kind, name)
        if self._size(key) is None:
            return None
        return obstore.sign(self.store, "GET", key, self.presign_ttl)

    def image_location(self, name: str) -> str | None:
        """A presigned GET for a stored image (a HEAD first: None when it is not there)."""
        return self._location("images", name)

    def thumbnail_location(self, name: str) -> str | None:
        return self._location("thumbnails", name)

    def public_urls(self, sha256: str, content_type: str) -> tuple[str, str] | None:
        """`<public_base>/<prefix>/images/ab/cd/<sha256>.<ext>` and the thumbnail's, or None
        without a public base (then `promptcache web` redirects to a presigned GET)."""
        if self.public_base is None:
            return None
        image = self._key("images", f"{sha256}.{EXTENSIONS[content_type]}")
        thumbnail = self._key("thumbnails", f"{sha256}.webp")
        return (f"{self.public_base}/{quote(image, safe='/')}",
                f"{self.public_base}/{quote(thumbnail, safe='/')}")
