"""The README's guarantees under the interleavings that used to break them (issue 14, parts 2-5):
a blob's deletion against a new reference, the storage cap against bypass images and
reconciliation, single flight against failing leaders and late lookers, and evictions against
requests that never get an answer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import redis as syncredis
import redis.asyncio as aioredis

from consumers.wiring import pipeline_guards
from promptcache.cache import registry as registry_module
from promptcache.cache.bypass import BypassImages
from promptcache.cache.exact import CacheEntry, ExactCache
from promptcache.cache.registry import EntryRegistry, Registered
from promptcache.config import Settings
from promptcache.errors import GenerationFailed, ImageTooLarge
from promptcache.flight.identical import Flight, Found
from promptcache.keys import Keys
from promptcache.pipeline import Outcome, Pipeline
from promptcache.storage.blobs import BlobStore
from schemas.events import ChangeEvent, Request
from tests.conftest import free_port_url, make_settings, wait_until
from tests.helpers import CountingGenerator


async def _true(value: bool) -> bool:
    return value


def request(request_id: str, prompt: str, *, cache: str = "use", seed: int = 7) -> Request:
    return Request.model_validate({"request_id": request_id, "prompt": prompt,
                                   "params": {"width": 64, "height": 64, "seed": seed},
                                   "options": {"cache": cache}})


def blob_store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "images", tmp_path / "thumbnails")


def pipeline(redis: aioredis.Redis, keys: Keys, tmp_path: Path, generator: CountingGenerator,
             *, exact: ExactCache | None = None, registry: EntryRegistry | None = None,
             blobs: BlobStore | None = None, **extra: object) -> Pipeline:
    blobs = blobs or blob_store(tmp_path)
    return Pipeline(generator=generator, exact=exact or ExactCache(redis, keys, ttl=_DAY),
                    blobs=blobs, public_url="http://x",
                    registry=registry or EntryRegistry(redis, keys, blobs, limit_bytes=10**9),
                    flight=Flight(redis, keys), **extra)  # type: ignore[arg-type]


_DAY = __import__("datetime").timedelta(days=1)


def images_on_disk(blobs: BlobStore) -> set[str]:
    return {sha for sha, kind, _ in blobs.walk() if kind not in ("thumbnail", "temporary")}


# --- part 2: deleting a blob's files and a new reference to it are exclusive -----------------

class PausedDeletes(BlobStore):
    """Deletes wait for `go` (the evictor is paused between its unregister and the unlink)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "images", root / "thumbnails")
        self.entered, self.go = threading.Event(), threading.Event()

    def delete(self, sha256: str, content_type: str) -> int:
        self.entered.set()
        self.go.wait(30)
        return super().delete(sha256, content_type)


async def test_a_blob_registered_while_its_files_are_deleted_keeps_its_files(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    deleting = PausedDeletes(tmp_path)
    entries = EntryRegistry(redis, keys, deleting, limit_bytes=10**9)
    pipe = pipeline(redis, keys, tmp_path, CountingGenerator(), registry=entries)
    first = await pipe.generate(request("r1", "a lighthouse in a storm"))
    blob = (await pipe.exact.get(pipe.prepare(request("r1", "a lighthouse in a storm")).key)
            ).blob_sha256  # type: ignore[union-attr]
    # entry A is evicted: its last reference goes, and the evictor is about to unlink
    evicting = asyncio.create_task(entries.evict(first.result.entry_id or "", reason="purge"))
    await wait_until(lambda: _true(deleting.entered.is_set()))
    # meanwhile entry B registers the same bytes (a deterministic backend, same seed, refresh)
    again = asyncio.create_task(pipe.generate(request("r2", "a lighthouse in a storm",
                                                      cache="refresh")))
    await wait_until(lambda: _blob_refs(redis, keys, blob, 1))
    deleting.go.set()
    await evicting
    second = await again
    assert second.result.status == "ok" and second.result.cache == "miss"
    assert second.result.image_url == first.result.image_url  # the same blob
    assert blob in images_on_disk(pipe.blobs)  # B's "ok" names an image that exists
    assert await entries.stored() > 0 and not await redis.hlen(entries.deleting_key)


async def _blob_refs(redis: aioredis.Redis, keys: Keys, blob: str, n: int) -> bool:
    return int(await redis.hget(keys.blob_refs, blob) or 0) == n


# --- part 3: the storage cap ------------------------------------------------------------------

async def test_an_image_larger_than_the_whole_cap_fails_and_is_not_written(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    blobs = blob_store(tmp_path)
    tiny = EntryRegistry(redis, keys, blobs, limit_bytes=100)
    pipe = pipeline(redis, keys, tmp_path, CountingGenerator(), registry=tiny, blobs=blobs)
    with pytest.raises(ImageTooLarge) as failed:
        await pipe.generate(request("big", "a mountain range at dawn"))
    assert failed.value.code == "image_larger_than_storage_limit"
    assert images_on_disk(blobs) == set() and await tiny.stored() == 0


def dead_store_pipeline(keys: Keys, tmp_path: Path, *, keep_s: float,
                        budget_bytes: int) -> tuple[Pipeline, aioredis.Redis]:
    dead = aioredis.Redis.from_url(free_port_url(), socket_connect_timeout=0.5,
                                   socket_timeout=0.5)
    blobs = blob_store(tmp_path)
    entries = EntryRegistry(dead, keys, blobs, limit_bytes=10**9)
    bypass = BypassImages(blobs, entries, keep_s=keep_s, budget_bytes=budget_bytes)
    return pipeline(dead, keys, tmp_path, CountingGenerator(), registry=entries, blobs=blobs,
                    bypass=bypass), dead


async def test_bypass_images_never_hold_more_than_their_budget(keys: Keys,
                                                               tmp_path: Path) -> None:
    pipe, dead = dead_store_pipeline(keys, tmp_path, keep_s=3600, budget_bytes=1)
    try:
        answers = [await pipe.generate(request(f"b{i}", f"a harbour at night number {i}"))
                   for i in range(5)]
    finally:
        await dead.aclose()
    assert [a.result.cache for a in answers] == ["bypass"] * 5
    # the budget holds less than one image: only the newest (just served) stays on disk
    newest = (answers[-1].result.image_url or "").rsplit("/", 1)[1].split(".")[0]
    assert images_on_disk(pipe.blobs) == {newest}
    assert len(pipe.bypass) == 1


async def test_bypass_images_are_deleted_once_kept_long_enough(keys: Keys,
                                                               tmp_path: Path) -> None:
    pipe, dead = dead_store_pipeline(keys, tmp_path, keep_s=0.0, budget_bytes=10**9)
    try:
        first = await pipe.generate(request("k1", "a fox in the snow"))
        assert len(images_on_disk(pipe.blobs)) == 1  # kept for its client
        second = await pipe.generate(request("k2", "a heron in the reeds"))
    finally:
        await dead.aclose()
    assert first.result.cache == second.result.cache == "bypass"
    assert len(images_on_disk(pipe.blobs)) == 1  # the first went when the second was written


async def test_a_bypass_image_an_entry_registered_meanwhile_is_kept(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    blobs = blob_store(tmp_path)
    entries = EntryRegistry(redis, keys, blobs, limit_bytes=10**9)
    bypass = BypassImages(blobs, entries, keep_s=0.0, budget_bytes=10**9)
    written = await asyncio.to_thread(blobs.put, b"\x89PNG same bytes", "image/png", b"thumb")
    await bypass.add(written)
    await entries.register(Registered("e_1", "k", written.sha256, "image/png", 20, 1.0))
    await bypass.reap()
    assert images_on_disk(blobs) == {written.sha256} and len(bypass) == 0
    other = await asyncio.to_thread(blobs.put, b"\x89PNG other", "image/png", b"thumb")
    await bypass.add(other)
    await bypass.reap()
    assert images_on_disk(blobs) == {written.sha256}  # unregistered: deleted
    assert not await redis.hlen(entries.deleting_key)


class RegisteringDuringScan(BlobStore):
    """The first existence check of a reconciliation lets another worker register an entry."""

    def __init__(self, root: Path, register: object) -> None:
        super().__init__(root / "images", root / "thumbnails")
        self.register = register

    def exists(self, sha256: str, content_type: str) -> bool:
        if self.register is not None:
            register, self.register = self.register, None
            register()  # type: ignore[operator]
        return super().exists(sha256, content_type)


async def test_reconcile_counts_a_registration_that_lands_during_its_scan(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path, redis_url: str) -> None:
    other_worker = syncredis.Redis.from_url(redis_url)
    script = other_worker.register_script(registry_module._REGISTER)
    late = Registered("e_late", "k2", "b" * 64, "image/png", 700, 1.0)

    def register_late() -> None:
        script(keys=[keys.entries, keys.lru, keys.blob_refs, keys.stored_bytes,
                     f"{keys.prefix}:cache:blob-deleting", f"{keys.prefix}:cache:scope-bytes"],
               args=[late.entry_id, late.to_json(), late.created, late.blob, late.bytes, 10**9,
                     ""])

    blobs = RegisteringDuringScan(tmp_path, register_late)
    entries = EntryRegistry(redis, keys, blobs, limit_bytes=10**9)
    await asyncio.to_thread(blobs.put, b"\x89PNG first", "image/png", b"thumb")
    first = blobs.describe(b"\x89PNG first", "image/png", b"thumb")
    await entries.register(Registered("e_first", "k1", first.sha256, "image/png", 300, 1.0))
    await redis.set(keys.exact("k1"), json.dumps({"entry_id": "e_first"}), ex=60)
    await redis.set(keys.exact("k2"), json.dumps({"entry_id": "e_late"}), ex=60)
    try:
        total, removed = await entries.reconcile(grace_s=0)
    finally:
        other_worker.close()
    # the scan had read the hash before e_late landed: the account still counts it
    assert removed == 0
    assert total == await entries.stored() == 300 + 700


async def test_reconcile_evicts_an_entry_no_exact_key_points_at(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    """A writer that died between registering its entry and writing its exact key leaves an
    entry nothing can serve (the prompt was generated again by the next request): the
    janitor's reconciliation evicts it once it is older than the grace; the entry the key
    names, and a young entry, stay."""
    blobs = blob_store(tmp_path)
    entries = EntryRegistry(redis, keys, blobs, limit_bytes=10**9)
    written = await asyncio.to_thread(blobs.put, b"\x89PNG same picture", "image/png", b"t")
    for entry_id, created in (("e_dead_writer", 1.0), ("e_served", 2.0),
                              ("e_young", time.time())):
        await entries.register(Registered(entry_id, "k", written.sha256, "image/png",
                                          written.image_bytes + written.thumbnail_bytes,
                                          created))
    await redis.set(keys.exact("k"), json.dumps({"entry_id": "e_served"}), ex=60)
    announced: list[tuple[str, str]] = []

    async def announce(eviction, reason: str) -> None:
        announced.append((eviction.entry.entry_id, reason))

    total, removed = await entries.reconcile(grace_s=600, announce=announce)
    assert removed == 1 and announced == [("e_dead_writer", "unreachable")]
    assert {k.decode() for k in await redis.hkeys(keys.entries)} == {"e_served", "e_young"}
    assert await redis.exists(keys.exact("k"))  # the served entry's key is untouched
    assert images_on_disk(blobs) == {written.sha256}  # still referenced
    assert total == await entries.stored()


# --- part 4: single flight ---------------------------------------------------------------------

class Gate(CountingGenerator):
    """Its first call waits for `open` and then raises `first_error`; later calls work."""

    def __init__(self, first_error: Exception) -> None:
        super().__init__()
        self.first_error = first_error
        self.open = asyncio.Event()

    async def generate(self, request):  # type: ignore[no-untyped-def]
        self.calls.append(request.prompt)
        if len(self.calls) == 1:
            await self.open.wait()
            raise self.first_error
        return await self._inner.generate(request)


class CountingLooks(ExactCache):
    """An exact tier that counts finished lookups (a follower waits on its leader right after)."""

    looks = 0

    async def get(self, cache_key: str) -> CacheEntry | None:
        entry = await super().get(cache_key)
        self.looks += 1
        return entry


async def _leader_and_followers(redis: aioredis.Redis, keys: Keys, tmp_path: Path,
                                gate: Gate, k: int) -> list[Outcome | BaseException]:
    exact = CountingLooks(redis, keys, ttl=_DAY)
    pipe = pipeline(redis, keys, tmp_path, gate, exact=exact)
    leader = asyncio.create_task(pipe.generate(request("lead", "a kite over a beach")))
    await wait_until(lambda: _true(len(gate.calls) == 1))
    looked = exact.looks
    followers = [asyncio.create_task(pipe.generate(request(f"f{i}", "a kite over a beach")))
                 for i in range(k)]
    await wait_until(lambda: _true(exact.looks == looked + k))  # all waiting on the leader
    gate.open.set()
    return await asyncio.gather(leader, *followers, return_exceptions=True)


async def test_followers_of_a_leader_that_stopped_make_one_generation(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    gate = Gate(RuntimeError("the leader's worker stopped"))
    got = await _leader_and_followers(redis, keys, tmp_path, gate, 4)
    assert isinstance(got[0], RuntimeError)
    answers = [o for o in got[1:] if isinstance(o, Outcome)]
    assert sorted(o.result.cache or "" for o in answers) == ["coalesced"] * 3 + ["miss"]
    assert len(gate.calls) == 2  # the leader's, then one follower's under the lock
    assert len({o.result.entry_id for o in answers}) == 1


async def test_followers_of_a_leader_whose_generation_failed_share_its_failure(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    gate = Gate(GenerationFailed("the backend is down", code="generator_unavailable"))
    got = await _leader_and_followers(redis, keys, tmp_path, gate, 4)
    assert all(isinstance(o, GenerationFailed) and o.code == "generator_unavailable"
               for o in got)
    assert len(gate.calls) == 1


async def test_lead_or_follow_looks_again_after_taking_the_lock(
        redis: aioredis.Redis, keys: Keys) -> None:
    flight = Flight(redis, keys)

    async def made_meanwhile() -> str:  # the holder stored it and released just now
        return "the entry"

    got = await flight.lead_or_follow("k-late", made_meanwhile)
    assert got == Found("the entry")
    assert not await redis.exists(flight.lock_name("k-late"))


class PausedAfterFirstLook(ExactCache):
    """A worker whose first lookup (a miss) is answered, then held until `go`."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.missed, self.go = asyncio.Event(), asyncio.Event()

    async def get(self, cache_key: str) -> CacheEntry | None:
        entry = await super().get(cache_key)
        if not self.missed.is_set():
            self.missed.set()
            await self.go.wait()
        return entry


async def test_a_holder_finishing_between_another_workers_look_and_lock_is_not_repeated(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    gate = CountingGenerator()
    one = pipeline(redis, keys, tmp_path / "w1", gate)
    paused = PausedAfterFirstLook(redis, keys, _DAY)
    two = pipeline(redis, keys, tmp_path / "w2", gate, exact=paused)
    late = asyncio.create_task(two.generate(request("w2", "a mill by a river")))
    await paused.missed.wait()  # worker 2 looked: a miss
    made = await one.generate(request("w1", "a mill by a river"))  # worker 1 makes it
    paused.go.set()
    got = await late
    assert made.result.cache == "miss" and got.result.cache == "coalesced"
    assert got.result.entry_id == made.result.entry_id
    assert len(gate.calls) == 1  # worker 1's only


# --- part 5: every eviction reaches the change stream ----------------------------------------

class FullDisk(BlobStore):
    def write(self, blob, data, thumbnail):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")


async def test_evictions_are_published_even_when_the_request_then_fails(
        redis: aioredis.Redis, keys: Keys, tmp_path: Path, redis_url: str) -> None:
    settings: Settings = make_settings(tmp_path, redis_url, keys)
    blobs = blob_store(tmp_path)
    entries = EntryRegistry(redis, keys, blobs, limit_bytes=10**9)
    guards = pipeline_guards(settings, redis, keys, blobs, entries)
    pipe = pipeline(redis, keys, tmp_path, CountingGenerator(), registry=entries, **guards)
    first = await pipe.generate(request("e1", "a red barn in a field"))
    entries.limit_bytes = await entries.stored() * 3 // 2  # room for one image, not two
    failing = pipeline(redis, keys, tmp_path, CountingGenerator(), registry=entries,
                       blobs=FullDisk(tmp_path / "images", tmp_path / "thumbnails"),
                       publish_changes=guards["publish_changes"])
    with pytest.raises(OSError):
        await failing.generate(request("e2", "a blue boat on a lake"))
    events = [ChangeEvent.model_validate_json(f[b"data"])
              for _, f in await redis.xrange(keys.changes)]
    evicted = [e for e in events if e.type == "entry_evicted"]
    assert [(e.entry_id, e.reason) for e in evicted] == [(first.result.entry_id,
                                                          "storage_limit")]
