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


async def collect(redis: aioredis.Redis, stream: str | dict[str, str], after: str,
                  request_ids: Iterable[str], timeout: float) -> dict[str, Result]:
    """Read `stream` after id `after` (or each stream of a {stream: after id} mapping: one
    XREAD each, as a cluster keeps them in different slots) until every request id has a
    result or time runs out."""
    cursors = dict(stream) if isinstance(stream, dict) else {stream: after}
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
    stream = request.reply_to or keys.for_request(request.request_id).results
    after = await last_id(redis, stream)
    await publish(redis, keys, [request])
    return (await collect(redis, stream, after, [request.request_id], timeout)).get(
        request.request_id)
