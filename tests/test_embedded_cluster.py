"""ops.embedded_cluster against real valkey-server processes: a 3-primary Valkey Cluster that
redis-py's cluster clients (sync and asyncio) use, a coordinated failover and a killed primary.

Findings recorded here (Valkey 8.1.8, redis-py 8.2):
- The stream tags of the contract, `{promptcache:s}:requests`, hash to slots 10229 (s=0),
  14292 (s=1) and 1975 (s=2). `valkey-cli --cluster create` splits 3 primaries evenly
  (0-5460, 5461-10922, 10923-16383), so s=0 lands on the 2nd primary, s=1 on the 3rd and s=2 on
  the 1st: three shards, three different primaries.
- After a primary is SIGKILLed its replica is promoted after the node timeout (2 s here) plus
  the election, ~4 s in all on this machine. An asyncio `RedisCluster` with default settings
  (`retry` of 10 attempts, jittered backoff from 10 ms to 1 s, ~3.5 s in all) raises
  ConnectionError for a command sent during that gap, and recovers by itself on the next
  command once the replica is promoted (it refreshes its slot map). To ride through the gap,
  give it a retry budget longer than node timeout + election, e.g.
  `retry=Retry(ExponentialBackoff(cap=1, base=0.1), 30)`. `cluster_error_retry_attempts=20`
  works too but is deprecated (a DeprecationWarning, an error under this project's pytest).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster, key_slot
from redis.exceptions import MovedError, RedisClusterException

from ops.embedded_cluster import ClusterNode, EmbeddedCluster
from tests.cluster_fixtures import start_cluster

pytestmark = pytest.mark.slow

STREAMS = [f"{{promptcache:{s}}}:requests" for s in range(3)]
WAIT_OK = 90.0  # generous: the machine may be shared


def tag_per_primary(cluster: EmbeddedCluster) -> dict[int, str]:
    """A hash tag owned by each primary now, by port."""
    tags: dict[int, str] = {}
    i = 0
    while len(tags) < len(cluster.primaries()):
        owner = cluster.primary_for_slot(key_slot(f"t{i}".encode()))
        tags.setdefault(owner.port, f"t{i}")
        i += 1
    return tags


def write_replicated(cluster: EmbeddedCluster, per_primary: int = 50) -> dict[str, str]:
    """Write keys on every primary over its own connection, then WAIT on that connection until
    its replica has them: the writes a failover must keep. Returns key -> value."""
    written: dict[str, str] = {}
    tags = tag_per_primary(cluster)
    for primary in cluster.primaries():
        with primary.client() as conn:
            for j in range(per_primary):
                key = f"{{{tags[primary.port]}}}:acked:{j}"
                conn.set(key, f"v{j}")
                written[key] = f"v{j}"
            assert conn.wait(1, 1000) == 1
    return written


def test_three_primaries_share_the_keys(tmp_path: Path) -> None:
    with start_cluster(tmp_path / "cluster", replicas=0) as cluster:
        assert len(cluster.nodes) == 3
        assert sorted(n.port for n in cluster.primaries()) == sorted(n.port for n in cluster.nodes)
        assert cluster.replicas() == []
        client = RedisCluster.from_url(cluster.url)
        try:
            for i in range(300):
                client.set(f"spread:{i}", i)
            assert [client.get(f"spread:{i}") for i in range(300)] == [
                str(i).encode() for i in range(300)]
        finally:
            client.close()
        sizes = {}
        for node in cluster.primaries():
            with node.client() as conn:
                sizes[node.port] = conn.dbsize()
        assert all(size > 0 for size in sizes.values()), sizes
        assert sum(sizes.values()) == 300
        for i in range(0, 300, 37):  # each key is where its slot's owner is
            with cluster.primary_for_slot(key_slot(f"spread:{i}".encode())).client() as conn:
                assert conn.get(f"spread:{i}") == str(i)
        for node in cluster.nodes:
            assert (node.data_dir / "nodes.conf").exists()
            assert (node.data_dir / "appendonlydir").is_dir()
    assert not any(node.alive for node in cluster.nodes)


def test_wait_ok_names_the_log_when_a_node_dies_or_the_cluster_fails(tmp_path: Path) -> None:
    with start_cluster(tmp_path / "cluster", replicas=0) as cluster:
        lost = cluster.primaries()[0]
        cluster.kill(lost)  # a primary without a replica: its slots are gone for good
        with pytest.raises(RuntimeError, match="cluster not ok within .*valkey.log"):
            cluster.wait_ok(timeout=3)
        other = cluster.primaries()[0]
        assert other.process is not None
        other.process.kill()  # not through the cluster: a child exiting on its own
        other.process.wait()
        with pytest.raises(RuntimeError, match=f"exited .*{other.data_dir}/valkey.log"):
            cluster.wait_ok(timeout=5)


def test_too_few_primaries_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3 primaries"):
        EmbeddedCluster(tmp_path, primaries=2)


async def test_asyncio_cluster_client_streams_groups_and_scripts(
        valkey_cluster: EmbeddedCluster) -> None:
    slots = [key_slot(stream.encode()) for stream in STREAMS]
    assert slots == [10229, 14292, 1975]
    owners = [valkey_cluster.primary_for_slot(slot) for slot in slots]
    ranks = sorted(valkey_cluster.primaries(), key=lambda n: min(n.myself().slots))
    # s=0 on the 2nd primary (5461-10922), s=1 on the 3rd, s=2 on the 1st: all different
    assert [ranks.index(owner) for owner in owners] == [1, 2, 0]
    client = AsyncRedisCluster.from_url(valkey_cluster.url)
    try:
        for stream, slot in zip(STREAMS, slots):
            assert await client.cluster_keyslot(stream) == slot
            await client.delete(stream)
            await client.xgroup_create(stream, "workers", id="0", mkstream=True)
            first = await client.xadd(stream, {"data": "first"})
            got = await client.xreadgroup("workers", "w1", {stream: ">"}, count=10, block=1000)
            assert got[0][1] == [(first, {b"data": b"first"})]

            # a read that blocks, answered by an XADD sent while it waits
            owner = valkey_cluster.primary_for_slot(slot)
            blocked_before = int(owner.info("clients")["blocked_clients"])
            reader = asyncio.create_task(
                client.xreadgroup("workers", "w2", {stream: ">"}, count=1, block=30_000))
            while int(owner.info("clients")["blocked_clients"]) <= blocked_before:
                assert not reader.done(), reader
                await asyncio.sleep(0.02)
            second = await client.xadd(stream, {"data": "second"})
            got = await asyncio.wait_for(reader, 60)
            assert got[0][1] == [(second, {b"data": b"second"})]

        counter = "{promptcache:0}:script-calls"
        await client.delete(counter)
        script = client.register_script(
            "redis.call('INCR', KEYS[2]) return redis.call('XLEN', KEYS[1])")
        assert await script(keys=[STREAMS[0], counter]) == 2  # NOSCRIPT, SCRIPT LOAD, EVALSHA
        assert await script(keys=[STREAMS[0], counter]) == 2  # EVALSHA alone
        assert await client.get(counter) == b"2"
        with owners[0].client() as conn:
            assert conn.script_exists(script.sha) == [True]
        with pytest.raises(RedisClusterException, match="same key slot"):
            await script(keys=[STREAMS[0], STREAMS[1]])  # two tags: refused by the client
        for key in [*STREAMS, counter]:
            await client.delete(key)
    finally:
        await client.aclose()


def test_failover_keeps_acknowledged_writes_and_the_client_follows(tmp_path: Path) -> None:
    with start_cluster(tmp_path / "cluster", replicas=1) as cluster:
        assert len(cluster.nodes) == 6
        assert len(cluster.primaries()) == 3 and len(cluster.replicas()) == 3
        client = RedisCluster.from_url(cluster.url)
        try:
            written = write_replicated(cluster)
            old = cluster.primary_for_slot(key_slot(next(iter(written)).encode()))
            heir = cluster.replicas_of(old)[0]

            promoted = cluster.failover(heir, timeout=WAIT_OK)

            assert promoted is heir
            assert heir.myself().is_primary
            assert [n.port for n in cluster.replicas_of(heir)] == [old.port]  # roles swapped
            assert old in cluster.replicas() and heir in cluster.primaries()
            with pytest.raises(ValueError, match="already a primary"):
                cluster.failover(heir)
            # the client had the old slot map: MOVED sends it to the new primary
            for key, value in written.items():
                assert client.get(key) == value.encode()
            tag = next(iter(written)).split("}")[0] + "}"
            client.set(f"{tag}:after", "yes")
            with heir.client() as conn:
                assert conn.get(f"{tag}:after") == "yes"
        finally:
            client.close()


async def test_killed_primary_is_replaced_and_clients_recover(tmp_path: Path) -> None:
    with start_cluster(tmp_path / "cluster", replicas=1) as cluster:
        # a retry budget (~27 s of backoff) longer than node timeout + election
        riding = AsyncRedisCluster.from_url(
            cluster.url, retry=Retry(ExponentialBackoff(cap=1, base=0.1), 30))
        default = AsyncRedisCluster.from_url(cluster.url)
        try:
            for stream in STREAMS:  # a consumer group with one pending entry on every shard
                await riding.xgroup_create(stream, "workers", id="0", mkstream=True)
                await riding.xadd(stream, {"data": "before"})
                assert await riding.xreadgroup("workers", "w1", {stream: ">"}, block=1000)
            written = write_replicated(cluster)  # WAITs after the stream writes too
            for client in (riding, default):  # both hold connections to every primary
                for key, value in written.items():
                    assert await client.get(key) == value.encode()
            victim = cluster.primaries()[0]
            heir = cluster.replicas_of(victim)[0]
            on_victim = [key for key in written
                         if cluster.primary_for_slot(key_slot(key.encode())) is victim]
            stream = next(s for s in STREAMS
                          if cluster.primary_for_slot(key_slot(s.encode())) is victim)
            # a worker's read, blocked on the victim when it dies (BLOCK under the 5 s
            # socket timeout redis-py has by default)
            reader = asyncio.create_task(
                riding.xreadgroup("workers", "w1", {stream: ">"}, block=3000))
            while int(victim.info("clients")["blocked_clients"]) < 1:
                assert not reader.done(), reader
                await asyncio.sleep(0.02)

            cluster.kill(victim)

            # sent while the slots have no live primary: retried until the replica takes over
            assert await riding.get(on_victim[0]) == written[on_victim[0]].encode()
            assert not await asyncio.wait_for(reader, WAIT_OK)  # re-sent to the heir: empty
            cluster.wait_ok(WAIT_OK)
            assert heir.myself().is_primary and not victim.alive
            assert victim not in cluster.primaries() + cluster.replicas()
            # the default client finds the new primary by itself once the cluster is ok
            for client in (riding, default):
                for key, value in written.items():
                    assert await client.get(key) == value.encode()
                await client.set(f"{on_victim[0]}:after", "yes")
            # the group and its pending entry were replicated: the heir has them
            assert (await default.xpending(stream, "workers"))["pending"] == 1
            added = await default.xadd(stream, {"data": "after"})
            got = await default.xreadgroup("workers", "w2", {stream: ">"}, block=1000)
            assert got[0][1] == [(added, {b"data": b"after"})]

            cluster.restart(victim)  # the old primary comes back as the heir's replica
            cluster.wait_ok(WAIT_OK)
            assert not victim.myself().is_primary
            assert cluster.replicas_of(heir) == [victim]
        finally:
            await riding.aclose()
            await default.aclose()


def test_stop_ends_every_node_right_after_start(tmp_path: Path) -> None:
    """Right after the start a replica may still be writing the AOF of its initial sync: it
    then refuses a SIGTERM and forgets it, so stop() sends it again (SIGKILL as a last resort).
    """
    cluster = start_cluster(tmp_path / "cluster", replicas=1)
    cluster.stop()
    assert not any(node.alive for node in cluster.nodes)
    cluster.stop()  # twice is harmless


def test_a_node_client_is_redirected_for_a_slot_it_does_not_own(
        valkey_cluster: EmbeddedCluster) -> None:
    node: ClusterNode = valkey_cluster.primaries()[0]
    tags = tag_per_primary(valkey_cluster)
    elsewhere = next(tag for port, tag in tags.items() if port != node.port)
    with node.client() as conn:
        assert conn.ping() is True
        with pytest.raises(MovedError):
            conn.get(f"{{{elsewhere}}}:x")
