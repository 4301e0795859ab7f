"""What the cache needs of a blob store, whichever holds the bytes.

Two stores implement it: `blobs.BlobStore` (the local filesystem, the default) and
`s3.S3BlobStore` (`PROMPTCACHE_BLOBS=s3://bucket/prefix`). Each alone knows where its objects
live: the web process asks it for a name's location, the pipeline for direct URLs
(`public_urls`; only the S3 store with `PROMPTCACHE_BLOBS_PUBLIC_URL` has them). Writes are
content-addressed and create-if-absent, so repeating one is harmless; the registry keeps the
byte account, the cap, the TTL and the flags above either store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from promptcache.storage.blobs import Listed, StoredBlob

__all__ = ["Blobs", "Listed"]


class Blobs(Protocol):
    def describe(self, data: bytes, content_type: str, thumbnail: bytes) -> StoredBlob:
        """Name and sizes of an image before it is written (pure)."""
        ...

    def write(self, blob: StoredBlob, data: bytes, thumbnail: bytes) -> None:
        """Store an image and its thumbnail unless present (sync; run in a thread)."""
        ...

    def exists(self, sha256: str, content_type: str) -> bool: ...

    def delete(self, sha256: str, content_type: str) -> int:
        """Remove an image and its thumbnail; returns the bytes freed. Safe to repeat."""
        ...

    def listing(self) -> Iterator[Listed]:
        """Every stored object: images, thumbnails, leftovers."""
        ...

    def delete_name(self, name: str) -> None:
        """Remove one object named by `listing`; a missing one is not an error."""
        ...

    def image_location(self, name: str) -> Path | str | None:
        """Where `/images/<name>` is served from: a local file, a URL to redirect to, or None
        when the name is not a stored image's (or not a valid name)."""
        ...

    def thumbnail_location(self, name: str) -> Path | str | None: ...

    def public_urls(self, sha256: str, content_type: str) -> tuple[str, str] | None:
        """The image's and its thumbnail's URLs straight at the store (a public-read bucket or
        a CDN in front of it), for results to hand out; None when images are served by
        `promptcache web` (`/images/<name>`, `/thumbnails/<name>`) instead. Pure, no I/O."""
        ...
