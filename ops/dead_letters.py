"""`promptcache dead-letter`: list what could not be answered, and put it back on its stream."""

from __future__ import annotations

import redis.asyncio as aioredis

from promptcache.keys import Keys
from schemas.events import DeadLetter


async def dead_letters(redis: aioredis.Redis, keys: Keys, count: int) -> list[tuple[str, DeadLetter]]:
    entries = await redis.xrevrange(keys.dead_letter, count=count)
    return [(mid.decode(), DeadLetter.model_validate_json(f[b"data"])) for mid, f in entries]


async def replay(redis: aioredis.Redis, keys: Keys, ids: list[str] | None) -> int:
    """Put dead-lettered entries back on the stream they came from (as new entries) and drop them.

    A request that was dead-lettered after the delivery limit already got a `failed` result;
    replaying it is the operator's deliberate choice to try again, so its request id is
    forgotten and the replay gets a fresh result.
    """
    entries = await redis.xrange(keys.dead_letter) if ids is None else [
        e for mid in ids for e in await redis.xrange(keys.dead_letter, mid, mid)]
    replayed = 0
    for mid, fields in entries:
        letter = DeadLetter.model_validate_json(fields[b"data"])
        async with redis.pipeline(transaction=True) as pipe:
            if letter.request_id:
                pipe.delete(keys.done(letter.request_id))
            pipe.xadd(letter.stream, letter.entry)  # type: ignore[arg-type]
            pipe.xdel(keys.dead_letter, mid)
            await pipe.execute()
        replayed += 1
    return replayed
