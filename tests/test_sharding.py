"""The names of shared/CONTRACT.md "Sharded streams", and telling a cluster from one server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import zlib
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from consumers.group import UNREACHABLE
from promptcache.client import check_shards
from promptcache.errors import ConfigError
from promptcache.keys import Keys, shard_of
from promptcache.streams import FailingOver, GroupReader, Publisher, flush_outbox
from promptcache.topology import is_cluster, keys_for


def test_one_server_keeps_its_names():
    keys = Keys("promptcache")
    assert (keys.requests, keys.results, keys.dead_letter, keys.done("r1")) == (
        "promptcache:requests", "promptcache:results", "promptcache:dead-letter",
        "promptcache:done:r1")
    assert keys.exact("k") == "promptcache:cache:exact:k"
    assert [k.requests for k in keys.all_shards()] == ["promptcache:requests"]


def test_shard_s_lives_under_its_hash_tag_and_the_cache_under_the_prefix_tag():
    keys = Keys("promptcache", shards=3, cluster=True)
    shard = keys.for_shard(2)
    assert (shard.requests, shard.results, shard.dead_letter) == (
        "{promptcache:2}:requests", "{promptcache:2}:results", "{promptcache:2}:dead-letter")
    # everything one publish script touches is in the shard's slot
    slot = key_slot(shard.requests.encode())
    for name in (shard.results, shard.generate, shard.changes, shard.outbox, shard.done("x"),
                 shard.metrics_results, shard.metrics_scopes, shard.metrics_latency("exact"),
                 shard.changes_dead_letter):
        assert key_slot(name.encode()) == slot, name
    # the cache store's keys share one slot: the registry's scripts stay atomic
    cache = {key_slot(n.encode()) for n in (keys.exact("k"), keys.entries, keys.lru,
                                            keys.stored_bytes, keys.semantic_vectors,
                                            keys.semantic_log, keys.janitor_lock)}
    assert len(cache) == 1
    with pytest.raises(ValueError):
        keys.for_shard(3)


def test_a_producer_picks_crc32_of_the_request_id_mod_n():
    keys = Keys("promptcache", shards=5)
    for rid in ("req-8f14e45f", "a", "ünïcode-id", "x" * 128):
        assert shard_of(rid, 5) == zlib.crc32(rid.encode("utf-8")) % 5
        assert keys.for_request(rid).requests == f"{{promptcache:{shard_of(rid, 5)}}}:requests"
    assert shard_of("anything", 1) == 0


def test_n_is_1_on_a_cluster_uses_shard_0s_tag():
    keys = Keys("promptcache", cluster=True)
    assert keys.requests == "{promptcache:0}:requests"


def test_cluster_mode_is_detected_from_the_server(redis_url, valkey_cluster):
    assert is_cluster(redis_url) is False
    assert is_cluster(valkey_cluster.url) is True
    assert is_cluster(valkey_cluster.url, "off") is False  # the setting wins
    assert keys_for("p", redis_url=valkey_cluster.url, shards=2) == Keys("p", shards=2,
                                                                         cluster=True)
    assert keys_for("p", redis_url=redis_url) == Keys("p")


async def test_durable_results_are_refused_on_a_cluster(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    keys = Keys("p", cluster=True)
    publisher = Publisher(client, dead_letter_stream=keys.dead_letter, changes_stream=keys.changes,
                          results_stream=keys.results, metrics_results=keys.metrics_results,
                          done_ttl=timedelta(days=1), outbox=keys.outbox,
                          metrics_scopes=keys.metrics_scopes, durable=True, cluster=True)
    with pytest.raises(ConfigError, match="not supported on a cluster"):
        await publisher.check_durable()
    await client.aclose()


async def test_a_staged_result_for_another_slot_is_published_once_by_the_recovery_pass(
        valkey_cluster):
    """A worker killed between its publish script and moving a result to a `reply_to` in
    another slot: the janitor's pass publishes it (once, and only after the cluster grace),
    a WRONGTYPE reply_to gets the fallback on the results stream."""
    from consumers.wiring import streams_client

    keys = Keys(f"st{uuid.uuid4().hex[:6]}", shards=2, cluster=True).for_shard(1)
    redis = streams_client(valkey_cluster.url, cluster=True)
    reply_to, broken = f"app-{uuid.uuid4().hex[:6]}:out", f"app-{uuid.uuid4().hex[:6]}:str"
    await redis.set(broken, "not a stream")
    old = time.time() - 120
    for done, target in ((keys.done("a"), reply_to), (keys.done("b"), broken)):
        await redis.hset(keys.outbox, done, json.dumps([target, '{"request_id":"%s"}' % done,
                                                        '{"fallback":true}', old]))
    await redis.hset(keys.outbox, keys.done("c"), json.dumps([reply_to, "{}", "", time.time()]))
    try:
        assert await flush_outbox(redis, keys.outbox, keys.results, cluster=True) == 2
        assert await flush_outbox(redis, keys.outbox, keys.results, cluster=True) == 0
        assert [f[b"data"] for _, f in await redis.xrange(reply_to)] == [
            ('{"request_id":"%s"}' % keys.done("a")).encode()]
        assert [f[b"data"] for _, f in await redis.xrange(keys.results)] == [b'{"fallback":true}']
        assert await redis.hkeys(keys.outbox) == [keys.done("c").encode()]  # young: left
    finally:
        await redis.delete(reply_to, broken, keys.outbox, keys.results)
        await redis.aclose()


async def test_a_process_with_another_shard_count_is_refused(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    prefix = f"sc{uuid.uuid4().hex[:6]}"
    try:
        await check_shards(client, Keys(prefix, shards=3), claim=True)
        await check_shards(client, Keys(prefix, shards=3), claim=True)  # the same N: fine
        with pytest.raises(ConfigError, match="PROMPTCACHE_SHARDS=2, but this deployment runs 3"):
            await check_shards(client, Keys(prefix, shards=2))
    finally:
        await client.delete(Keys(prefix).shard_count)
        await client.aclose()


async def test_a_server_that_refuses_info_is_a_clear_error(redis_url):
    """An ACL user without INFO cannot be asked whether the server is a cluster: say what to
    set instead (the setting needs no question)."""
    admin = aioredis.Redis.from_url(redis_url)
    user = f"noinfo{uuid.uuid4().hex[:6]}"
    await admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"],
                            commands=["+@all", "-info"])
    where = urlsplit(redis_url)
    url = f"redis://{user}:pw@{where.hostname}:{where.port or 6379}/0"
    try:
        with pytest.raises(ConfigError, match="set PROMPTCACHE_CLUSTER=on or off"):
            is_cluster(url)
        assert is_cluster(url, "off") is False
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()


async def test_a_blocked_read_released_by_a_failover_is_retried_not_fatal(redis_url):
    """A failover releases blocked XREADGROUPs with an UNBLOCKED error (seen in CI: it ended
    both workers). It is an outage to retry, like a lost connection. Here the release comes
    from CLIENT UNBLOCK ... ERROR, which sends the same error."""
    stream = f"ub{uuid.uuid4().hex[:6]}:requests"
    blocked = aioredis.Redis.from_url(redis_url, client_name="blocked-reader")
    admin = aioredis.Redis.from_url(redis_url)
    reader = GroupReader(blocked, stream, "workers", "c1", claim_idle=timedelta(seconds=60),
                         block=timedelta(seconds=4))
    await reader.ensure_group()
    await reader.read(10)  # the own-pending check: the next read blocks
    try:
        read = asyncio.create_task(reader.read(10))
        client_id = None
        while client_id is None:
            await asyncio.sleep(0.05)
            client_id = next((c["id"] for c in await admin.client_list()
                              if c.get("name") == "blocked-reader" and c.get("cmd") == "xreadgroup"),
                             None)
        await admin.execute_command("CLIENT", "UNBLOCK", client_id, "ERROR")
        with pytest.raises(UNREACHABLE) as caught:
            await read
        assert isinstance(caught.value, FailingOver) and "UNBLOCKED" in str(caught.value)
    finally:
        await admin.delete(stream)
        await blocked.aclose()
        await admin.aclose()
