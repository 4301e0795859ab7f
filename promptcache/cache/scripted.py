"""Scripts inside a pipeline, on one server or a cluster.

redis-py's plain pipeline loads the scripts it is given before it runs them; its cluster
pipeline does not, so a script the node has not seen (a fresh node, a replica promoted in a
failover, after SCRIPT FLUSH) fails with NOSCRIPT. `scripted_pipeline` loads the scripts and
runs the pipeline again once. Only for pipelines whose every step is safe to repeat.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError


async def scripted_pipeline(redis: aioredis.Redis, scripts: Sequence[AsyncScript],
                            fill: Callable[[Any], Awaitable[None]]) -> list[Any]:
    """Queue commands with `fill(pipe)` on a non-transactional pipeline and execute it; on
    NOSCRIPT, load `scripts` (on every primary, on a cluster) and do it all once more."""
    for attempt in (1, 2):
        async with redis.pipeline(transaction=False) as pipe:
            await fill(pipe)
            try:
                return await pipe.execute()  # type: ignore[no-any-return]
            except NoScriptError:
                if attempt == 2:
                    raise
        for script in scripts:
            await redis.script_load(script.script)
    raise AssertionError("unreachable")
