"""One server or a Redis/Valkey Cluster: which it is, and the names that follow from it.

`PROMPTCACHE_CLUSTER` = `auto` (default: ask the server, `INFO cluster`), `on` or `off`.
`PROMPTCACHE_SHARDS` = N splits the request path into N shards (`Keys`, shared/CONTRACT.md
"Sharded streams"). One server with one shard keeps the one-server names.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import redis
import structlog

from promptcache.errors import ConfigError
from promptcache.keys import Keys

log = structlog.get_logger(__name__)

ClusterMode = Literal["auto", "on", "off"]


@lru_cache(maxsize=64)
def _detect(url: str) -> bool:
    """`INFO cluster` of the server at `url`; a connection error propagates (not remembered)."""
    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError as exc:  # e.g. an ACL user without INFO
        raise ConfigError(f"cannot ask {redis_display(url)} whether it is a cluster ({exc}); "
                          "set PROMPTCACHE_CLUSTER=on or off") from exc
    finally:
        client.close()


def redis_display(url: str) -> str:
    """A URL without its password, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"


def is_cluster(url: str | None, mode: ClusterMode = "auto") -> bool:
    """Whether `url` names a cluster node: the setting, or (auto) the server's own answer
    (redis.ConnectionError when it cannot be asked: a service waits and asks again,
    `consumers.wiring.reachable_keys`)."""
    if mode != "auto" or not url:
        return mode == "on"
    return _detect(url)


def keys_for(prefix: str, *, redis_url: str | None, cache_redis_url: str | None = None,
             shards: int = 1, mode: ClusterMode = "auto") -> Keys:
    """The names for this deployment. The request path's follow the streams server (and N);
    the cache store's hash tag follows the cache store. A separate cache store that cannot be
    asked at start is taken to be what the streams server is (it is bypassed until it answers;
    set PROMPTCACHE_CLUSTER=on|off to leave nothing to guess)."""
    cluster = is_cluster(redis_url, mode)
    cache_cluster = cluster
    if cache_redis_url and cache_redis_url != redis_url:
        try:
            cache_cluster = is_cluster(cache_redis_url, mode)
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("cache_store_unreachable_at_start", url=redis_display(cache_redis_url),
                        assumed_cluster=cluster)
    return Keys(prefix, shards=shards, cluster=cluster,
                cache_cluster=None if cache_cluster == cluster else cache_cluster)
