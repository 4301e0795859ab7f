"""Content-addressed image blobs on the local filesystem (the default store; see store.py for
the interface it shares with the S3 store).

An image is stored once under `images/ab/cd/<sha256>.<ext>` with its WebP thumbnail under
`thumbnails/ab/cd/<sha256>.webp`; writes go to a temporary file and are renamed into place, so a
reader never sees half a file and a crash leaves at most a `.tmp` behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in EXTENSIONS.items()}
_NAME = re.compile(r"^(?P<sha>[0-9a-f]{64})\.(?P<ext>png|jpg|webp)$")


class Listed(NamedTuple):
    """One stored object for the orphan sweep: its sha256 ("" for a leftover temporary file),
    the store's name for it (pass it to `delete_name`) and when it was written (epoch s)."""

    sha256: str
    name: str
    modified: float


def parse_name(name: str) -> tuple[str, str] | None:
    """(sha256, extension) of a public name such as `<sha256>.png`, None for anything else."""
    match = _NAME.match(name)
    return (match["sha"], match["ext"]) if match else None


def shard(name: str) -> str:
    """`ab/cd/<name>`: where a blob lives under its root (images or thumbnails)."""
    return f"{name[:2]}/{name[2:4]}/{name}"


def describe(data: bytes, content_type: str, thumbnail: bytes) -> StoredBlob:
    """Name and sizes of an image before it is written (to reserve its bytes first)."""
    if content_type not in EXTENSIONS:
        raise ValueError(f"unsupported content type {content_type!r}")
    return StoredBlob(hashlib.sha256(data).hexdigest(), content_type, len(data), len(thumbnail))


@dataclass(frozen=True, slots=True)
class StoredBlob:
    sha256: str
    content_type: str
    image_bytes: int
    thumbnail_bytes: int

    @property
    def image_name(self) -> str:
        return f"{self.sha256}.{EXTENSIONS[self.content_type]}"

    @property
    def thumbnail_name(self) -> str:
        return f"{self.sha256}.webp"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BlobStore:
    def __init__(self, images_dir: Path, thumbnails_dir: Path) -> None:
        self.images_dir = images_dir.resolve()
        self.thumbnails_dir = thumbnails_dir.resolve()

    @staticmethod
    def _shard(root: Path, name: str) -> Path:
        return root / name[:2] / name[2:4] / name

    def image_path(self, name: str) -> Path | None:
        """The file for a public name such as `<sha256>.png`, or None for anything else."""
        return self._resolve(self.images_dir, name)

    def thumbnail_path(self, name: str) -> Path | None:
        match = _NAME.match(name)
        if not match or match["ext"] != "webp":
            return None
        return self._resolve(self.thumbnails_dir, name)

    def _resolve(self, root: Path, name: str) -> Path | None:
        if not _NAME.match(name):
            return None
        path = self._shard(root, name).resolve()
        return path if path.is_relative_to(root) else None

    describe = staticmethod(describe)

    def image_location(self, name: str) -> Path | None:
        return self.image_path(name)

    def thumbnail_location(self, name: str) -> Path | None:
        return self.thumbnail_path(name)

    def public_urls(self, sha256: str, content_type: str) -> None:
        """Local files have no URL of their own: `promptcache web` serves them."""
        return None

    def put(self, data: bytes, content_type: str, thumbnail: bytes) -> StoredBlob:
        """Store an image and its thumbnail (sync; run in a thread). Idempotent."""
        blob = self.describe(data, content_type, thumbnail)
        self.write(blob, data, thumbnail)
        return blob

    def write(self, blob: StoredBlob, data: bytes, thumbnail: bytes) -> None:
        image = self._shard(self.images_dir, blob.image_name)
        if not image.exists():
            _write_atomic(image, data)
        thumb = self._shard(self.thumbnails_dir, blob.thumbnail_name)
        if not thumb.exists():
            _write_atomic(thumb, thumbnail)

    def exists(self, sha256: str, content_type: str) -> bool:
        name = f"{sha256}.{EXTENSIONS.get(content_type, 'png')}"
        return self._shard(self.images_dir, name).exists()

    def walk(self) -> list[tuple[str, str, Path]]:
        """Every stored file as (sha256, content type, path): images, thumbnails, leftovers."""
        found = []
        for root in (self.images_dir, self.thumbnails_dir):
            if not root.is_dir():
                continue
            for path in root.glob("*/*/*"):
                match = _NAME.match(path.name)
                if match:
                    kind = CONTENT_TYPES[match["ext"]] if root == self.images_dir else "thumbnail"
                    found.append((match["sha"], kind, path))
                elif path.name.endswith(".tmp"):
                    found.append(("", "temporary", path))
        return found

    def listing(self) -> Iterator[Listed]:
        """Every stored file (images, thumbnails, leftover `.tmp`s), named by its path."""
        for root in (self.images_dir, self.thumbnails_dir):
            if not root.is_dir():
                continue
            for path in root.glob("*/*/*"):
                match = _NAME.match(path.name)
                if not match and not path.name.endswith(".tmp"):
                    continue
                try:
                    modified = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                yield Listed(match["sha"] if match else "", str(path), modified)

    def delete_name(self, name: str) -> None:
        path = Path(name).resolve()
        if not any(path.is_relative_to(root) for root in (self.images_dir, self.thumbnails_dir)):
            raise ValueError(f"{name!r} is not inside this store")
        path.unlink(missing_ok=True)

    def delete(self, sha256: str, content_type: str) -> int:
        """Remove an image and its thumbnail; returns the bytes freed. Safe to repeat."""
        freed = 0
        for path in (self._shard(self.images_dir, f"{sha256}.{EXTENSIONS[content_type]}"),
                     self._shard(self.thumbnails_dir, f"{sha256}.webp")):
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        return freed
