"""`promptcache dead-letter`: list what could not be answered (requests, `promptcache:dead-letter`)
or written (change events PostgreSQL refused, `promptcache:changes:dead-letter`), and put it back
on its stream."""

from __future__ import annotations

import redis.asyncio as aioredis

from promptcache.keys import Keys
from promptcache.streams import id_order
from schemas.events import DeadLetter


def _streams(keys: Keys) -> list[tuple[Keys, str]]:
    """Every shard's two dead-letter streams, with the shard they belong to."""
    return [(shard, name) for shard in keys.all_shards()
            for name in (shard.dead_letter, shard.changes_dead_letter)]


async def dead_letters(redis: aioredis.Redis, keys: Keys, count: int) -> list[tuple[str, DeadLetter]]:
    """The newest `count` dead letters of both kinds, newest first (a letter's `stream` says
    which stream its entry came from). Sharded, an id reads `shard/entry id` (two shards'
    streams can hold equal ids); `replay` takes either form."""
    found: list[tuple[str, str, DeadLetter]] = []
    for shard, stream in _streams(keys):
        for mid, f in await redis.xrevrange(stream, count=count):
            label = f"{shard.shard}/{mid.decode()}" if keys.sharded else mid.decode()
            found.append((mid.decode(), label, DeadLetter.model_validate_json(f[b"data"])))
    found.sort(key=lambda item: id_order(item[0]), reverse=True)
    return [(label, letter) for _, label, letter in found[:count]]


def _wanted(ids: list[str], shard: Keys) -> list[str]:
    """The entry ids of `ids` ("shard/id" or a bare id, which matches in every shard) that
    belong to `shard`."""
    wanted = []
    for item in ids:
        where, sep, mid = item.rpartition("/")
        if not sep or where == str(shard.shard):
            wanted.append(mid)
    return wanted


async def replay(redis: aioredis.Redis, keys: Keys, ids: list[str] | None) -> int:
    """Put dead-lettered entries back on the stream they came from (as new entries) and drop them.

    A change event goes back on the change stream: written if PostgreSQL now takes it,
    dead-lettered again otherwise. A request that was dead-lettered after the delivery limit
    already got a `failed` result; replaying it is the operator's deliberate choice to try
    again, so its request id is forgotten and the replay gets a fresh result.
    """
    replayed = 0
    for shard, stream in _streams(keys):
        entries = await redis.xrange(stream) if ids is None else [
            e for mid in _wanted(ids, shard) for e in await redis.xrange(stream, mid, mid)]
        for mid, fields in entries:
            letter = DeadLetter.model_validate_json(fields[b"data"])
            # the letter, its stream and its done marker share the shard's slot
            async with redis.pipeline(transaction=True) as pipe:
                if letter.request_id:
                    pipe.delete(shard.done(letter.request_id))
                pipe.xadd(letter.stream, letter.entry)  # type: ignore[arg-type]
                pipe.xdel(stream, mid)
                await pipe.execute()
            replayed += 1
    return replayed
