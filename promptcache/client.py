"""A producer's side of the contract: publish requests, collect their results.

Used by `promptcache submit`, the demo in `promptcache up` and the benchmarks; the same few
Redis calls work from any language.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable

import redis.asyncio as aioredis

from promptcache.errors import ConfigError
from promptcache.keys import Keys
from schemas.events import Request, Result


def parse_param(text: str) -> tuple[str, object]:
    """`--param KEY=VALUE` of the command line: the value as JSON (numbers, true), else text."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"--param {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


async def last_id(redis: aioredis.Redis, stream: str) -> str:
    newest = await redis.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


async def check_shards(redis: aioredis.Redis, keys: Keys, *, claim: bool = False) -> None:
    """Refuse to run with another PROMPTCACHE_SHARDS than the deployment's: requests sent to a
    shard no worker reads, or done markers split between two layouts, would break the
    exactly-once promise silently. `claim` (workers, the janitor) records N when none is."""
    if claim:
        await redis.set(keys.shard_count, keys.shards, nx=True)
    recorded = await redis.get(keys.shard_count)
    if recorded is not None and int(recorded) != keys.shards:
        raise ConfigError(
            f"PROMPTCACHE_SHARDS={keys.shards}, but this deployment runs {int(recorded)} shards "
            f"({keys.shard_count}); use the same N everywhere. To change N: stop the producers, "
            f"let `promptcache stats` show lag 0 and pending 0, stop the workers, DEL "
            f"{keys.shard_count}, then restart everything with the new N")


async def publish(redis: aioredis.Redis, keys: Keys, requests: Iterable[Request]) -> list[str]:
    """XADD each request to its shard's stream (`Keys.for_request`: crc32 of the id mod N)."""
    async with redis.pipeline(transaction=False) as pipe:
        for request in requests:
            pipe.xadd(keys.for_request(request.request_id).requests,
                      {"data": request.model_dump_json(exclude_none=True)})
        return [mid.decode() for mid in await pipe.execute()]


def results_streams(keys: Keys) -> list[str]:
    """Where results without a reply_to appear: every shard's results stream."""
    return [shard.results for shard in keys.all_shards()]


async def last_ids(redis: aioredis.Redis, streams: Iterable[str]) -> dict[str, str]:
    return {stream: await last_id(redis, stream) for stream in streams}


async def collect(redis: aioredis.Redis, stream: str, after: str, request_ids: Iterable[str],
                  timeout: float) -> dict[str, Result]:
    """Read `stream` after id `after` until every request id has a result or time runs out."""
    return await collect_many(redis, {stream: after}, request_ids, timeout)


async def collect_many(redis: aioredis.Redis, cursors: dict[str, str],
                       request_ids: Iterable[str], timeout: float) -> dict[str, Result]:
    """`collect` over several streams ({stream: after id}, e.g. every shard's results), one
    XREAD each: a cluster keeps them in different slots."""
    cursors = dict(cursors)
    wanted = set(request_ids)
    found: dict[str, Result] = {}
    deadline = time.monotonic() + timeout

    async def read(name: str, block: int) -> None:
        reply = await redis.xread({name: cursors[name]}, count=500, block=block)
        for _, entries in reply or []:
            for mid, fields in entries:
                cursors[name] = mid.decode()
                result = Result.model_validate_json(fields[b"data"])
                if result.request_id in wanted:
                    found[result.request_id] = result

    while wanted - found.keys() and time.monotonic() < deadline:
        block = int(min(1.0, max(deadline - time.monotonic(), 0.01)) * 1000)
        await asyncio.gather(*(read(name, block) for name in list(cursors)))
    return found


async def submit(redis: aioredis.Redis, keys: Keys, request: Request,
                 timeout: float = 60.0) -> Result | None:
    await check_shards(redis, keys)
    stream = request.reply_to or keys.for_request(request.request_id).results
    after = await last_id(redis, stream)
    await publish(redis, keys, [request])
    return (await collect(redis, stream, after, [request.request_id], timeout)).get(
        request.request_id)
