"""Images written without a registration (the cache store down or slow, no cache store at all):
served once, then deleted by the worker that wrote them, so they cannot grow the disk past the
storage cap.

Each is kept for `keep_s` (long enough for the client to fetch it), and at most `budget_bytes`
of them at a time per worker: past that the oldest go early (the newest image is always kept, so
one image larger than the budget still reaches its client). Deleting one goes through the
registry's deletion mark when the store answers (`claim_unused`), so an entry that registered
the same blob meanwhile keeps its files; when the store does not answer, the file is deleted
anyway (an entry of the same blob registered by another worker in that moment loses its file,
and the janitor's reconciliation drops it). A worker that dies forgets its list: the janitor's
orphan sweep removes those files after its grace.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict

import structlog
from redis.exceptions import RedisError

from promptcache.cache.registry import EntryRegistry
from promptcache.storage.blobs import StoredBlob
from promptcache.storage.store import Blobs

log = structlog.get_logger(__name__)


class BypassImages:
    def __init__(self, blobs: Blobs, registry: EntryRegistry | None, *, keep_s: float,
                 budget_bytes: int) -> None:
        self.blobs = blobs
        self.registry = registry
        self.keep_s = keep_s
        self.budget_bytes = budget_bytes
        self._held: OrderedDict[str, tuple[float, StoredBlob]] = OrderedDict()
        self.bytes = 0  # what this worker holds on disk unregistered

    def __len__(self) -> int:
        return len(self._held)

    async def add(self, blob: StoredBlob) -> None:
        """An image was written without a registration: delete it after `keep_s`."""
        previous = self._held.pop(blob.sha256, None)
        if previous is None:
            self.bytes += blob.image_bytes + blob.thumbnail_bytes
        self._held[blob.sha256] = (time.monotonic() + self.keep_s, blob)
        await self.reap(spare=blob.sha256)  # not before its client has had its answer

    async def reap(self, spare: str | None = None) -> None:
        """Delete what has been kept long enough, and the oldest while over the budget."""
        now = time.monotonic()
        while self._held:
            sha, (until, blob) = next(iter(self._held.items()))
            if sha == spare or (until > now and self.bytes <= self.budget_bytes):
                return
            del self._held[sha]
            self.bytes -= blob.image_bytes + blob.thumbnail_bytes
            await self._delete(blob)

    async def _delete(self, blob: StoredBlob) -> None:
        token = ""
        if self.registry is not None:
            token = f"bypass-{secrets.token_hex(8)}"
            try:
                if not await self.registry.claim_unused(blob.sha256, token):
                    return  # an entry uses it now (its bytes are accounted): it stays
            except (RedisError, OSError) as exc:
                log.warning("cache_unavailable", error=str(exc))
                token = ""
        await asyncio.to_thread(self.blobs.delete, blob.sha256, blob.content_type)
        log.debug("bypass_image_deleted", blob_sha256=blob.sha256)
        if token and self.registry is not None:
            try:
                await self.registry.deleted(blob.sha256, token)
            except (RedisError, OSError) as exc:  # the mark runs out on its own
                log.warning("cache_unavailable", error=str(exc))
