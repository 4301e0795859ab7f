"""Hostile change events through the persister into real PostgreSQL (issue 14, part 1): text
PostgreSQL cannot hold is made safe in every field, one bad event is dead-lettered and the rest
of its batch written, an outage is retried (leases kept) and never dead-lettered. Afterwards
nothing is pending. Real Valkey, real PostgreSQL, the real worker."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from redis.exceptions import ResponseError

from consumers.persister import UNREADABLE, UNWRITABLE, Persister
from ops.dead_letters import dead_letters, replay
from promptcache.keys import PERSISTER_GROUP
from promptcache.storage.db import MetadataStore
from promptcache.storage.safe_text import REPLACEMENT, safe
from tests.conftest import wait_until
from tests.helpers import CountingGenerator, results, send, worker_for

# what PostgreSQL refuses (NUL, lone surrogates, as JSON escapes) and what it must keep as is
HOSTILE = "a red\x00 fox \ud800 lone \udfff; ctrl \x01\x07\x1b[31m\x7f\t\n\r end"
SAFE = "a red\ufffd fox \ufffd lone \ufffd; ctrl \x01\x07\x1b[31m\x7f\t\n\r end"
AT = 1_790_000_000.0


def _long(tag: str) -> str:
    """4,000 characters that do not compress to nothing, hostile throughout."""
    body = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(4000))
    return (f"{tag}:{HOSTILE}{body}")[:4000 - len(HOSTILE)] + HOSTILE


INDEXED = ("entry_id", "cache_key", "request_id", "blob_sha256", "partition", "embedding_model")


def _long_text(field: str) -> str:
    """4,000 characters in every field but the indexed ones (ids, keys, hashes: ours, and
    short), which a btree index row could not hold at that length."""
    return f"long/{field}/{HOSTILE}" if field in INDEXED else _long(field)


def _stored(tag: str, text: Any = None, **extra: Any) -> dict[str, Any]:
    """An entry_stored event whose every text field holds `text(field)`."""
    t = text or (lambda field: f"{tag}/{field}/{HOSTILE}")
    vector = base64.b64encode(struct.pack("<4f", 0.1, 0.2, 0.3, 0.4)).decode()
    event = {"type": "entry_stored", "entry_id": t("entry_id"), "at": AT,
             "cache_key": t("cache_key"), "tier": "miss", "request_id": t("request_id"),
             "prompt": t("prompt"), "canonical_prompt": t("canonical_prompt"),
             "negative_prompt": t("negative_prompt"),
             "params": {t("param key"): t("param value"), "nested": [t("list"), {"k": t("d")}]},
             "optimizer_version": t("optimizer_version"), "generator": t("generator"),
             "blob_sha256": t("blob_sha256"), "content_type": t("content_type"), "width": 64,
             "height": 64, "image_bytes": 10, "thumbnail_bytes": 1, "generation_ms": 5.0,
             "embedding": vector, "embedding_model": t("embedding_model"),
             "partition": t("partition")}
    event.update(extra)
    return event


async def _xadd(redis, stream: str, *events: dict[str, Any] | bytes) -> None:
    for event in events:  # json.dumps escapes NUL and lone surrogates as \u0000, \ud800
        await redis.xadd(stream, {"data": event if isinstance(event, bytes)
                                  else json.dumps(event)})


async def _persist(redis, keys, db, **kwargs: Any) -> Persister:
    store = MetadataStore(db)
    persister = Persister(redis=redis, keys=keys, store=store, consumer="p",
                          block=timedelta(milliseconds=100), **kwargs)
    try:
        await persister.run(burst=True)
    finally:
        await store.aclose()
    return persister


async def _nothing_left(redis, keys) -> None:
    [group] = [g for g in await redis.xinfo_groups(keys.changes)
               if g["name"] == PERSISTER_GROUP.encode()]
    assert group["pending"] == 0 and (group["lag"] or 0) == 0


def _rows(db: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


async def test_hostile_text_in_every_field_is_written_safely(redis, keys, db):
    answers = {"type": "requests_answered", "entry_id": "", "at": AT, "answers": [
        {"request_id": f"hit/{HOSTILE}", "status": "ok", "tier": "exact",
         "entry_id": f"one/entry_id/{HOSTILE}", "latency_ms": 2.0, "generation_ms": 5.0},
        {"request_id": f"no/{HOSTILE}", "status": "failed", "latency_ms": 3.0,
         "reason": HOSTILE}]}
    old_hit = {"type": "entry_hit", "entry_id": f"one/entry_id/{HOSTILE}", "at": AT,
               "request_id": f"old/{HOSTILE}", "tier": "semantic", "latency_ms": 4.0}
    old_answer = {"type": "request_answered", "entry_id": HOSTILE, "at": AT,
                  "request_id": f"old/{HOSTILE}", "tier": "semantic", "status": "ok",
                  "latency_ms": 4.0, "reason": HOSTILE}
    evicted = {"type": "entry_evicted", "entry_id": f"two/entry_id/{HOSTILE}", "at": AT,
               "reason": HOSTILE, "image_bytes": 7}
    await _xadd(redis, keys.changes, _stored("one"), _stored("two"),
                _stored("long", text=_long_text), answers, old_hit, old_answer, evicted)

    persister = await _persist(redis, keys, db)
    await _nothing_left(redis, keys)
    assert persister.dead_lettered == 0 and persister.written == 7
    assert await redis.xlen(keys.changes_dead_letter) == 0

    columns = ("entry_id", "cache_key", "prompt", "canonical_prompt", "negative_prompt",
               "optimizer_version", "generator", "blob_sha256", "content_type")
    rows = _rows(db, f"SELECT {', '.join(columns)}, params, hit_count FROM cache_entries"
                     " ORDER BY length(prompt)")
    assert len(rows) == 2  # "two" was evicted
    for row, tag, text in ((rows[0], "one", None), (rows[1], "long", _long_text)):
        expect = safe(_stored(tag, text=text))
        assert row[:len(columns)] == tuple(expect[c] for c in columns)
        assert row[len(columns)] == expect["params"]
    assert rows[0][-1] == 2  # the batched hit and the old one
    assert len(rows[1][2]) == 4000 and rows[1][2].count(REPLACEMENT) == 6
    assert "\x01\x07\x1b[31m\x7f\t\n\r" in rows[1][2]
    assert SAFE in rows[0][2] and "\x00" not in rows[0][2]

    assert _rows(db, "SELECT request_id, tier, latency_ms FROM cache_hits ORDER BY at, tier") \
        == [(f"hit/{SAFE}", "exact", 2.0), (f"old/{SAFE}", "semantic", 4.0)]
    assert sorted(_rows(db, "SELECT entry_id, request_id FROM entry_origins")) == sorted(
        (f"{t}/entry_id/{SAFE}", f"{t}/request_id/{SAFE}") for t in ("one", "two", "long"))
    assert sorted(_rows(db, "SELECT partition, model, canonical_prompt FROM semantic_entries")) \
        == sorted((safe(t("partition")), safe(t("embedding_model")),
                   safe(t("canonical_prompt")))
                  for t in (lambda f: f"one/{f}/{HOSTILE}", _long_text))
    assert _rows(db, "SELECT reason, evictions, bytes_freed FROM evictions_hourly") \
        == [(SAFE, 1, 7)]
    assert sorted(_rows(db, "SELECT tier, status, requests, generator_calls FROM stats_hourly")) \
        == [("", "failed", 1, 0), ("exact", "ok", 1, 0), ("miss", "ok", 0, 3),
            ("semantic", "ok", 1, 0)]


async def test_a_bad_event_is_dead_lettered_and_the_rest_of_its_batch_written(redis, keys, db):
    good = [_stored(f"good{i}") for i in range(6)]
    bad = [_stored("too wide", width=2**40),  # integer out of range: 22003
           _stored("no key", cache_key=None),  # NOT NULL violation: 23502
           _stored("far future", at=1e300),  # no timestamp can say when
           _stored("huge id", entry_id=_long("entry_id")),  # too large for an index row: 54000
           b'{"type": "entry_stored", "entry_id": ',  # not JSON
           b'{"type": "no such event", "entry_id": "x", "at": 1}']  # not a change event
    mixed: list[dict[str, Any] | bytes] = [good[0], bad[0], good[1], good[2], bad[1], bad[2],
                                           good[3], bad[3], good[4], bad[4], good[5], bad[5]]
    await _xadd(redis, keys.changes, *mixed)

    persister = await _persist(redis, keys, db, batch_size=200)
    await _nothing_left(redis, keys)
    assert persister.batches == 1 and persister.written == 6 and persister.dead_lettered == 6
    assert sorted(r[0] for r in _rows(db, "SELECT entry_id FROM cache_entries")) == sorted(
        safe(e["entry_id"]) for e in good)

    letters = await dead_letters(redis, keys, count=50)
    assert len(letters) == 6 and {letter.stream for _, letter in letters} == {keys.changes}
    codes = sorted(letter.error.code for _, letter in letters)
    assert codes == [UNREADABLE] * 2 + [UNWRITABLE] * 4
    unwritable = sorted(letter.error.message.split(":")[0] for _, letter in letters
                        if letter.error.code == UNWRITABLE)
    assert unwritable == ["NotNullViolation", "NumericValueOutOfRange", "OverflowError",
                          "ProgramLimitExceeded"]
    ids = {json.loads(letter.entry["data"]).get("entry_id") for _, letter in letters
           if letter.error.code == UNWRITABLE}
    assert ids == {e["entry_id"] for e in bad[:4]}  # the whole event, lone surrogates and all

    # replayed, they go back on the change stream, and (still refused) to the dead letter again
    assert await replay(redis, keys, None) == 6
    assert await redis.xlen(keys.changes_dead_letter) == 0
    again = await _persist(redis, keys, db)
    assert again.dead_lettered == 6 and again.written == 0
    await _nothing_left(redis, keys)


async def test_an_admin_shutdown_is_an_outage_retried_not_dead_lettered(redis, keys, db):
    store = MetadataStore(db)
    persister = Persister(redis=redis, keys=keys, store=store, consumer="p",
                          block=timedelta(milliseconds=100))
    task = asyncio.create_task(persister.run())
    try:
        await _xadd(redis, keys.changes, _stored("before"))

        async def written(n: int) -> bool:
            return persister.written == n

        await wait_until(lambda: written(1), timeout=30)
        with psycopg.connect(db, autocommit=True) as conn:
            [(killed,)] = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'").fetchall()
        assert killed >= 1
        await _xadd(redis, keys.changes, _stored("after"))
        await wait_until(lambda: written(2), timeout=30)
        assert persister.dead_lettered == 0
        await _nothing_left(redis, keys)
    finally:
        persister.stop()
        await asyncio.wait_for(task, 30)
        await store.aclose()
    assert len(_rows(db, "SELECT 1 FROM cache_entries")) == 2


@pytest.mark.chaos
async def test_a_write_blocked_past_its_timeout_is_retried_and_keeps_its_lease(redis, keys, db):
    """A lock holds the persister's writes past its statement timeout (57014, an outage): the
    batch is retried, never dead-lettered, and its lease renewed, so another persister's
    XAUTOCLAIM meanwhile takes nothing over."""
    store = MetadataStore(db, statement_timeout=timedelta(milliseconds=200))
    claim_idle = timedelta(seconds=2)
    persister = Persister(redis=redis, keys=keys, store=store, consumer="p1",
                          claim_idle=claim_idle, block=timedelta(milliseconds=100))
    locker = psycopg.connect(db)
    locker.execute("LOCK TABLE cache_entries IN ACCESS EXCLUSIVE MODE")
    task = asyncio.create_task(persister.run())
    try:
        await _xadd(redis, keys.changes, _stored("blocked"))

        async def held_by_p1() -> bool:
            try:
                pending = await redis.xpending_range(keys.changes, PERSISTER_GROUP, "-", "+", 10)
            except ResponseError:  # the group is not there yet
                return False
            return [p["consumer"] for p in pending] == [b"p1"]

        await wait_until(held_by_p1, timeout=30)
        # more than twice the claim idle time: without renewal the entry could be claimed
        await asyncio.sleep(claim_idle.total_seconds() * 2.5)
        # what another persister's read does first
        claimed = await redis.xautoclaim(  # with JUSTID: the ids claimed
            keys.changes, PERSISTER_GROUP, "p2", int(claim_idle.total_seconds() * 1000),
            start_id="0-0", justid=True)
        assert claimed == [] and await held_by_p1()
        assert persister.written == 0 and persister.dead_lettered == 0
    finally:
        locker.rollback()
        locker.close()
    try:
        async def written() -> bool:
            return persister.written == 1

        await wait_until(written, timeout=60)
        assert persister.dead_lettered == 0
        await _nothing_left(redis, keys)
    finally:
        persister.stop()
        await asyncio.wait_for(task, 30)
        await store.aclose()


async def test_hostile_requests_through_the_whole_service_leave_nothing_stuck(
        redis, keys, settings, db):
    """Issue 14's reproduction: a NUL in a prompt stopped every PostgreSQL write for good."""
    prompts = {"nul": "a red\x00 fox", "ctrl": "a \x01\x07\x1b[31m fox\t\n in \x7f snow",
               "long": "a fox, " + "in deep snow " * 306,
               "neg": "a quiet lake"}
    for rid, prompt in prompts.items():
        extra = {"negative_prompt": "blur\x00 noise\x02"} if rid == "neg" else {}
        await send(redis, keys.requests, request_id=rid, prompt=prompt[:4000], **extra)
    await send(redis, keys.requests, raw='{"request_id": "surrogate", "prompt": "a \\ud800 fox"}')
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    for rid in prompts:  # and once more each: exact hits
        await send(redis, keys.requests, request_id=f"{rid}-again", prompt=prompts[rid][:4000],
                   **({"negative_prompt": "blur\x00 noise\x02"} if rid == "neg" else {}))
    await worker_for(settings, redis, CountingGenerator()).run(burst=True)
    answered = {r.request_id: r for r in await results(redis, keys.results)}
    assert set(answered) == {*prompts, *(f"{r}-again" for r in prompts), "surrogate"}

    persister = await _persist(redis, keys, db)
    await _nothing_left(redis, keys)
    assert persister.dead_lettered == 0
    rows = dict(_rows(db, "SELECT prompt, negative_prompt FROM cache_entries"))
    assert set(rows) == {safe(p[:4000]) for p in prompts.values()}
    assert "\x00" not in "".join(f"{k}{v}" for k, v in rows.items())
    assert "noise" in rows["a quiet lake"]
    assert [h for (h,) in _rows(db, "SELECT hit_count FROM cache_entries")] == [1] * 4
    [(requests,)] = _rows(db, "SELECT sum(requests)::int FROM stats_hourly")
    assert requests == len(answered)
