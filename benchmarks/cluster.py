"""Exact hits per second on a real local Valkey Cluster, 1 shard against 3, and what each
primary spends per hit (the basis of the sharded design's capacity prediction).

    .venv/bin/python benchmarks/cluster.py            # the full run (about 3-5 minutes)
    .venv/bin/python benchmarks/cluster.py --quick    # a smoke run (about 1-2 minutes)
    .venv/bin/python benchmarks/cluster.py --configs cluster-s1,cluster-s3 --requests 40000

Starts a 3-primary Valkey Cluster (ops/embedded_cluster.py, no replicas, AOF everysec) and, for
reference, one embedded Valkey (non-cluster). `--configs` (default valkey,cluster-s1,cluster-s3)
run in turn, each with a fresh prefix, --workers (2) `python -m ops worker` processes and one
janitor (as `promptcache up` runs them; no DATABASE_URL, so no persister; embeddings off, so only
the exact tier; the procedural generator at --generator-latency-ms):

  valkey       the single Valkey, PROMPTCACHE_SHARDS=1 (the one-server names)
  cluster-sN   the cluster, PROMPTCACHE_SHARDS=N. The prefix is picked so that the shards'
               hash tags {prefix:s} land on distinct primaries (for N = 3: every primary), and,
               for N = 1, so that the cache store's slot {prefix} is on another primary than
               shard 0: the stream primary and the cache primary are then measured apart.

Per configuration: warm --warm distinct prompts (misses), prime with as many exact hits (scripts
loaded, `prepare` memoised; not measured), then --repeats times: --requests exact hits (the warm
prompts retyped, unique ids, each XADDed to shard crc32(id) mod N by promptcache.client.publish)
published at once; hits/s = answered / (first XADD -> last result read). Results are read with
one XREAD loop per shard's results stream (each stream on the node that owns its slot).

Around each repeat, every node's `INFO commandstats` (calls, usec per command) and `INFO cpu`
(used_cpu_sys + used_cpu_user) are read: their deltas divided by the hits answered give commands
and server CPU per hit per node. From those: a stream-shard primary's ceiling = 1 / (its CPU
seconds per hit of its own shard) and the cache slot's primary's ceiling = 1 / (its CPU seconds
per hit, cache commands only): how many stream primaries one cache slot can feed.

On a small box every node, the workers and this producer share the same cores: the measured
1-vs-3-shard ratio then shows CPU contention, not cluster capacity; the per-node CPU figures are
the basis of the prediction. Figures are medians over the repeats (every repeat is in the JSON:
benchmarks/results/cluster-<UTC stamp>.json and cluster-latest.json). Every wait has a deadline,
the run is bounded by --max-seconds, and the servers, processes and temp dir are removed at the
end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from redis.asyncio.cluster import RedisCluster  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    RESULTS_DIR, STOP, Interrupted, ResultReader, _sigterm, config_footer, cpu_times,
    install_signal_handlers, load_avg, progress, remove_signal_handlers, say,
    scan_worker_logs, service_env, start_processes, stop_workers, system_cpu, wait_for_workers,
    report_head, worker_health, write_json)
from benchmarks.spine import pick_prompts  # noqa: E402
from ops.demo import retype  # noqa: E402
from ops.embedded_cluster import EmbeddedCluster  # noqa: E402
from ops.embedded_servers import EmbeddedValkey  # noqa: E402
from promptcache.client import publish  # noqa: E402
from promptcache.keys import Keys, shard_of  # noqa: E402
from schemas.events import Request  # noqa: E402

SHUTDOWN_RESERVE_S = 30.0
DEFAULTS = {"requests": 20000, "repeats": 3, "warm": 1000, "max_seconds": 1200.0}
QUICK = {"requests": 4000, "repeats": 1, "warm": 300, "max_seconds": 480.0}
CONFIG_RE = re.compile(r"^(valkey|cluster-s(\d+))$")
# connection and bookkeeping commands, left out of "commands per hit" (INFO is ours)
ADMIN = re.compile(r"^(info|ping|hello|select|client\|.*|cluster\|.*|command\|.*|config\|.*|"
                   r"readonly|script\|.*|function\|.*)$")
# cache-store commands (the exact tier's GETEX pipeline; the janitor's LRU touch ZADD and what
# else it reads of the registry): their share of a node's command usec is reported (for a
# primary with a shard and the cache slot it undercounts the cache part: see split_mixed)
CACHE_COMMANDS = frozenset({"getex", "zadd", "zrangebyscore", "zcard", "zscore", "get", "mget",
                            "hget", "hmget", "hgetall"})
# expected warnings: no DATABASE_URL on purpose (no persister)
EXPECTED = frozenset({"no_database_url"})


# --- arguments --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    name: str
    cluster: bool
    shards: int


def parse_config(text: str) -> Config:
    m = CONFIG_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"unknown config {text!r} (valkey, cluster-sN)")
    if text == "valkey":
        return Config("valkey", False, 1)
    n = int(m.group(2))
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError("cluster-sN needs 1 <= N <= 64")
    return Config(text, True, n)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="valkey,cluster-s1,cluster-s3",
                   help="comma-separated, run in this order: valkey (one non-cluster Valkey, 1 "
                        "shard), cluster-sN (the 3-primary cluster, N shards); default "
                        "valkey,cluster-s1,cluster-s3")
    p.add_argument("--requests", type=int, default=None,
                   help="exact hits published at once per repeat (default 20000; --quick 4000)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats per configuration; figures are medians (default 3; --quick 1)")
    p.add_argument("--warm", type=int, default=None,
                   help="distinct prompts warmed per configuration (default 1000; --quick "
                        "300): enough that a batch of 100 holds no repeated prompt, so every "
                        "hit costs one GETEX (a batch's GETEX pipeline asks each key once)")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes per configuration (each runs a worker per shard; "
                        "default 2)")
    p.add_argument("--no-janitor", action="store_true",
                   help="run no janitor (by default one runs, as under `promptcache up`: its "
                        "LRU touches are cache-slot work)")
    p.add_argument("--generator-latency-ms", type=int, default=50,
                   help="procedural generator latency for the warm-up misses (default 50)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4000 requests, 1 repeat, 300 warm prompts")
    p.add_argument("--seed", type=int, default=1, help="prompt sampling and retyping seed")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="upper bound on the whole run (default 1200; --quick 480)")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                   help=f"where the JSON goes (default {RESULTS_DIR.relative_to(REPO)})")
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    p.add_argument("--keep-temp", action="store_true",
                   help="keep the temp dir (process logs, server data) for inspection")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.config_list = [parse_config(c.strip()) for c in args.configs.split(",") if c.strip()]
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if not args.config_list or len({c.name for c in args.config_list}) != len(args.config_list):
        p.error("--configs: at least one, each once")
    if min(args.requests, args.repeats, args.warm, args.workers) < 1 \
            or args.generator_latency_ms < 0:
        p.error("--requests, --repeats, --warm and --workers must be positive")
    return args


# --- the servers' nodes -----------------------------------------------------------------------

@dataclass
class Node:
    """One server measured: its URL, its pid (for a /proc cross-check) and what it carries in
    this configuration."""
    url: str
    port: int
    pid: int | None
    shards: list[int]
    cache: bool

    @property
    def role(self) -> str:
        parts = [f"shard {','.join(map(str, self.shards))}"] if self.shards else []
        if self.cache:
            parts.append("cache slot")
        return " + ".join(parts) or "idle"


def pick_prefix(cluster: EmbeddedCluster, shards: int) -> tuple[str, dict[int, int]]:
    """A fresh prefix whose shards' hash tags land on distinct primaries (as many as there are,
    every primary when shards >= primaries), and, when a primary is left without a shard, with
    the cache store's slot on such a primary. Returns it and slot -> owner port."""
    ranges = [(lo, hi, int(entry.address.rsplit(":", 1)[1]))
              for entry in cluster.nodes[0].cluster_nodes() if entry.is_primary
              for lo, hi in entry.slots]
    owner_of: dict[int, int] = {}

    def owner(slot: int) -> int:
        if slot not in owner_of:
            owner_of[slot] = next(port for lo, hi, port in ranges if lo <= slot <= hi)
        return owner_of[slot]

    primaries = {node.port for node in cluster.primaries()}
    want = min(shards, len(primaries))
    for _ in range(20_000):
        prefix = f"cb{uuid.uuid4().hex[:8]}"
        owners = {owner(key_slot(f"{{{prefix}:{s}}}".encode())) for s in range(shards)}
        if len(owners) < want:
            continue
        cache_owner = owner(key_slot(f"{{{prefix}}}".encode()))
        if owners != primaries and cache_owner in owners:
            continue
        return prefix, owner_of
    raise RuntimeError("no prefix spreads the shards as wanted")


# --- results ----------------------------------------------------------------------------------

class ShardReader(ResultReader):
    """One shard's results stream, read from the node that owns its slot; every shard's reader
    shares one `got` (request id -> (cache or status, monotonic time read))."""

    def __init__(self, url: str, stream: str, got: dict[str, tuple[str, float]]) -> None:
        super().__init__(url, stream)
        self.got = got

    def take(self, data: dict[str, Any], now: float) -> None:
        status = data.get("status", "?")
        cache = data.get("cache") if status == "ok" and data.get("cache") else status
        self.got[data.get("request_id", "")] = (cache, now)


# --- node statistics --------------------------------------------------------------------------

async def snapshot(clients: dict[int, aioredis.Redis]) -> dict[int, dict[str, Any]]:
    """Per node: calls and usec per command (INFO commandstats), used_cpu_sys + used_cpu_user."""
    async def one(client: aioredis.Redis) -> dict[str, Any]:
        stats = await client.info("commandstats")
        cpu = await client.info("cpu")
        return {"calls": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
                "usec": {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()},
                "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])}
    got = await asyncio.gather(*(one(c) for c in clients.values()))
    return dict(zip(clients, got, strict=True))


def node_delta(node: Node, before: dict[str, Any], after: dict[str, Any], hits: int,
               shard_hits: dict[int, int], proc_cpu_s: float | None) -> dict[str, Any]:
    calls = {k: v - before["calls"].get(k, 0) for k, v in after["calls"].items()}
    calls = {k: v for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
             if v > 0 and not ADMIN.match(k)}
    usec = {k: after["usec"][k] - before["usec"].get(k, 0) for k in calls}
    cpu = after["cpu_s"] - before["cpu_s"]
    own = sum(shard_hits.get(s, 0) for s in node.shards)
    total_usec = sum(usec.values())
    cache_usec = sum(v for k, v in usec.items() if k in CACHE_COMMANDS)
    out: dict[str, Any] = {
        "port": node.port, "role": node.role, "shards": node.shards, "cache_slot": node.cache,
        "calls": calls, "usec": usec, "cpu_s": round(cpu, 4),
        "proc_cpu_s": None if proc_cpu_s is None else round(proc_cpu_s, 2),
        "commands_per_hit": round(sum(calls.values()) / hits, 3) if hits else None,
        "calls_per_hit": {k: round(v / hits, 4) for k, v in calls.items()} if hits else {},
        "cpu_us_per_hit": round(cpu * 1e6 / hits, 2) if hits else None,
        "own_shard_hits": own,
        "cache_usec_share": round(cache_usec / total_usec, 3) if total_usec else None,
    }
    if node.shards and own and not node.cache:
        # a shard-only primary: all its CPU is the stream-shard part, per hit of its own shard
        out["stream_cpu_us_per_own_hit"] = round(cpu * 1e6 / own, 2)
        out["stream_commands_per_own_hit"] = round(sum(calls.values()) / own, 3)
    if node.cache and not node.shards and hits:
        # the cache slot alone on its primary: all its CPU is cache work
        out["cache_cpu_us_per_hit"] = round(cpu * 1e6 / hits, 2)
        out["cache_commands_per_hit"] = round(sum(calls.values()) / hits, 3)
    return out


def split_mixed(rows: list[dict[str, Any]], hits: int) -> None:
    """A primary with a shard and the cache slot: its cache part estimated as its CPU minus its
    own shard's hits times the stream CPU per hit of this repeat's shard-only primaries (the
    usec share of the commands undercounts the GETEX replies' network writes)."""
    pure = [r["stream_cpu_us_per_own_hit"] for r in rows if "stream_cpu_us_per_own_hit" in r]
    if not pure or not hits:
        return
    stream = statistics.median(pure)
    for r in rows:
        if r["shards"] and r["cache_slot"]:
            cache_us = r["cpu_s"] * 1e6 - stream * r["own_shard_hits"]
            r["cache_cpu_us_per_hit_est"] = round(cache_us / hits, 2)
            r["stream_cpu_us_per_own_hit_assumed"] = round(stream, 2)


# --- one configuration ------------------------------------------------------------------------

@dataclass
class Run:
    keys: Keys
    client: Any
    readers: dict[int, ShardReader]
    got: dict[str, tuple[str, float]]
    deadline: float
    tag: str

    async def send(self, requests: list[Request]) -> None:
        for offset in range(0, len(requests), 1000):
            await publish(self.client, self.keys, requests[offset:offset + 1000])

    async def wait(self, ids: list[str], seconds: float, notes: list[str], what: str) -> None:
        until = min(time.monotonic() + seconds, self.deadline)
        by_shard: dict[int, list[str]] = collections.defaultdict(list)
        for rid in ids:
            by_shard[shard_of(rid, self.keys.shards)].append(rid)
        for shard, shard_ids in sorted(by_shard.items()):
            if not await self.readers[shard].wait(shard_ids, until, f"{what} shard {shard}"):
                missing = len(shard_ids) - self.readers[shard].answered(shard_ids)
                notes.append(f"{what}: shard {shard}: {missing} of {len(shard_ids)} "
                             f"unanswered after {seconds:.0f} s")

    def outcomes(self, ids: list[str]) -> dict[str, int]:
        return dict(collections.Counter(self.got[rid][0] for rid in ids if rid in self.got))


async def run_config(args: argparse.Namespace, config: Config, url: str, nodes: list[Node],
                     keys: Keys, tmp: Path, deadline: float, warm: list[str],
                     procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> dict[str, Any]:
    data_dir = tmp / config.name
    (data_dir / "logs").mkdir(parents=True)
    report: dict[str, Any] = {
        "config": config.name, "cluster": config.cluster, "shards": config.shards,
        "workers": args.workers, "prefix": keys.prefix,
        "nodes": [{"port": n.port, "role": n.role} for n in nodes],
        "load_avg_before": load_avg()}
    notes: list[str] = []
    report["notes"] = notes
    started = time.monotonic()
    env = service_env(url, keys.prefix, data_dir, PROMPTCACHE_SHARDS=str(config.shards),
                      PROMPTCACHE_GENERATOR="procedural",
                      PROMPTCACHE_GENERATOR_LATENCY_MS=str(args.generator_latency_ms),
                      PROMPTCACHE_EMBEDDINGS="off",
                      PROMPTCACHE_CLUSTER="on" if config.cluster else "off")
    mine, mine_logs = start_processes(args.workers, env, data_dir / "logs", "worker")
    procs += mine
    logs += mine_logs
    if not args.no_janitor:
        janitor, janitor_logs = start_processes(1, env, data_dir / "logs", "janitor")
        procs += janitor
        logs += janitor_logs
    client: Any = (RedisCluster.from_url(url, socket_timeout=10, socket_connect_timeout=5)
                   if config.cluster else
                   aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5))
    node_clients = {n.port: aioredis.Redis.from_url(n.url, socket_timeout=10) for n in nodes}
    got: dict[str, tuple[str, float]] = {}
    by_port = {n.port: n for n in nodes}
    readers: dict[int, ShardReader] = {}
    for shard in keys.all_shards():
        owner = next(n for n in nodes if shard.shard in n.shards)
        readers[shard.shard] = ShardReader(owner.url, shard.results, got)
    run = Run(keys, client, readers, got, deadline, f"{uuid.uuid4().hex[:6]}")
    try:
        report["ready_s"] = round(await wait_for_workers(
            "", keys, mine, mine_logs, max(min(deadline - time.monotonic(), 120), 1),
            client=client), 1)
        say(f"  {args.workers} workers ready after {time.monotonic() - started:.1f} s")
        for reader in readers.values():
            reader.start()
        rng = random.Random(args.seed + 1)

        # warm: the distinct prompts (misses); prime: as many exact hits (not measured)
        requests = [Request(request_id=f"{run.tag}.warm.{i}", prompt=p)
                    for i, p in enumerate(warm)]
        t0 = time.monotonic()
        await run.send(requests)
        ids = [r.request_id for r in requests]
        await run.wait(ids, 60 + 2 * len(warm) * args.generator_latency_ms / 1000, notes, "warm")
        report["warm"] = {"requests": len(ids), "outcomes": run.outcomes(ids),
                          "seconds": round(time.monotonic() - t0, 2)}
        say(f"  warm: {len(warm)} distinct prompts in {report['warm']['seconds']} s "
            f"{report['warm']['outcomes']}")
        requests = [Request(request_id=f"{run.tag}.prime.{i}", prompt=retype(p, rng))
                    for i, p in enumerate(warm)]
        await run.send(requests)
        ids = [r.request_id for r in requests]
        await run.wait(ids, 30, notes, "prime")
        report["prime"] = {"requests": len(ids), "outcomes": run.outcomes(ids)}

        repeats: list[dict[str, Any]] = []
        report["repeats"] = repeats
        pids = [p.pid for p in mine]
        k = args.requests
        for r in range(args.repeats):
            STOP.check()
            if time.monotonic() + 30 + k / 500 > deadline:
                notes.append(f"repeat {r + 1}: skipped (time budget)")
                break
            requests = [Request(request_id=f"{run.tag}.r{r}.{i}",
                                prompt=retype(warm[i % len(warm)], rng)) for i in range(k)]
            ids = [q.request_id for q in requests]
            shard_hits = collections.Counter(shard_of(rid, keys.shards) for rid in ids)
            await asyncio.sleep(0.3)  # let the prime's or last repeat's tail settle
            before = await snapshot(node_clients)
            proc0 = {n.port: cpu_times([n.pid]) for n in nodes if n.pid}
            workers0 = cpu_times(pids)
            busy0, total0 = system_cpu()
            start = time.monotonic()
            await run.send(requests)
            published = time.monotonic()
            await run.wait(ids, 30 + k / 200, notes, f"repeat {r + 1}")
            after = await snapshot(node_clients)
            busy1, total1 = system_cpu()
            received = [got[rid][1] for rid in ids if rid in got]
            answered = len(received)
            wall = (max(received) - start) if received else None
            rep: dict[str, Any] = {
                "requests": k, "answered": answered, "outcomes": run.outcomes(ids),
                "per_shard_requests": {str(s): shard_hits[s] for s in sorted(shard_hits)},
                "publish_s": round(published - start, 3),
                "wall_s": None if wall is None else round(wall, 3),
                "hits_per_s": round(answered / wall, 1) if wall else None,
                "worker_cpu_s": round(cpu_times(pids) - workers0, 2),
                "machine_busy": round((busy1 - busy0) / (total1 - total0), 3)
                if total1 > total0 else None,
            }
            exact_by_shard = collections.Counter(
                shard_of(rid, keys.shards) for rid in ids if got.get(rid, ("",))[0] == "exact")
            exact = sum(exact_by_shard.values())
            rep["nodes"] = [node_delta(n, before[n.port], after[n.port], exact, exact_by_shard,
                                       cpu_times([n.pid]) - proc0[n.port] if n.pid else None)
                            for n in by_port.values()]
            split_mixed(rep["nodes"], exact)
            repeats.append(rep)
            say(f"  [{r + 1}/{args.repeats}] {rep['hits_per_s']} hits/s ({answered}/{k} "
                f"answered, {rep['outcomes']}, machine busy {rep['machine_busy']})")
        report["medians"] = medians(repeats)
        report["seconds"] = round(time.monotonic() - started, 1)
    finally:
        for reader in readers.values():
            await reader.stop()
        for c in node_clients.values():
            await c.aclose()
        await client.aclose()
    report["load_avg_after"] = load_avg()
    return report


def med(values: list[Any]) -> float | None:
    values = [float(v) for v in values if isinstance(v, (int, float))]
    return round(statistics.median(values), 2) if values else None


def medians(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"hits_per_s": med([r.get("hits_per_s") for r in repeats]),
                           "worker_cpu_s": med([r.get("worker_cpu_s") for r in repeats]),
                           "machine_busy": med([r.get("machine_busy") for r in repeats])}
    nodes: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in repeats:
        for n in r.get("nodes", []):
            nodes[n["port"]].append(n)
    out["nodes"] = []
    for port, rows in nodes.items():
        row: dict[str, Any] = {"port": port, "role": rows[0]["role"],
                               "shards": rows[0]["shards"], "cache_slot": rows[0]["cache_slot"]}
        for key in ("commands_per_hit", "cpu_us_per_hit", "stream_cpu_us_per_own_hit",
                    "stream_commands_per_own_hit", "cache_cpu_us_per_hit",
                    "cache_commands_per_hit", "cache_cpu_us_per_hit_est",
                    "stream_cpu_us_per_own_hit_assumed", "cache_usec_share"):
            if any(key in x for x in rows):
                row[key] = med([x.get(key) for x in rows])
        names = sorted({k for x in rows for k in x["calls_per_hit"]},
                       key=lambda k: -max(x["calls_per_hit"].get(k, 0) for x in rows))
        row["calls_per_hit"] = {k: round(statistics.median(
            [x["calls_per_hit"].get(k, 0) for x in rows]), 4) for k in names}
        out["nodes"].append(row)
    cpus = [sum(n["cpu_s"] for n in r.get("nodes", [])) * 1e6 / max(
        r["outcomes"].get("exact", 0), 1) for r in repeats if r.get("nodes")]
    out["all_nodes_cpu_us_per_hit"] = med(cpus)
    return out


# --- the prediction ---------------------------------------------------------------------------

def prediction(report: dict[str, Any]) -> dict[str, Any]:
    """Per cluster configuration, a stream-shard primary's ceiling (1 / its CPU seconds per hit
    of its own shard, median over the shard-only primaries); the cache slot's primary's ceiling
    (1 / its CPU seconds per hit, where it carries no shard); how many stream primaries one
    cache slot feeds (the ratio)."""
    configs = {name: c for name, c in report.get("configs", {}).items()
               if c.get("cluster") and c.get("medians")}
    out: dict[str, Any] = {"stream": {}, "cache": {}, "cache_estimate_beside_a_shard": {}}
    for name, c in configs.items():
        nodes = c["medians"]["nodes"]
        stream = [n["stream_cpu_us_per_own_hit"] for n in nodes
                  if n.get("stream_cpu_us_per_own_hit")]
        if stream:
            us = statistics.median(stream)
            out["stream"][name] = {"cpu_us_per_hit": round(us, 2), "primaries": len(stream),
                                   "ceiling_hits_per_s": round(1e6 / us)}
        for n in nodes:
            if n.get("cache_cpu_us_per_hit"):
                us = n["cache_cpu_us_per_hit"]
                out["cache"][name] = {"cpu_us_per_hit": us, "port": n["port"],
                                      "ceiling_hits_per_s": round(1e6 / us)}
            if n.get("cache_cpu_us_per_hit_est") is not None:
                out["cache_estimate_beside_a_shard"][name] = {
                    "cpu_us_per_hit": n["cache_cpu_us_per_hit_est"], "port": n["port"]}
    if out["cache"] and out["stream"]:
        cache = statistics.median(c["ceiling_hits_per_s"] for c in out["cache"].values())
        out["cache_ceiling_hits_per_s"] = round(cache)
        out["stream_primaries_one_cache_slot_feeds"] = {
            name: round(cache / st["ceiling_hits_per_s"], 1) for name, st in out["stream"].items()}
    return out


# --- the run ----------------------------------------------------------------------------------

async def run_all(args: argparse.Namespace, cluster: EmbeddedCluster | None,
                  valkey: EmbeddedValkey | None, tmp: Path, deadline: float,
                  report: dict[str, Any], procs: list[subprocess.Popen[bytes]],
                  logs: list[Path]) -> None:
    install_signal_handlers()
    try:
        warm, _, excluded = pick_prompts(SimpleNamespace(seed=args.seed, prompts=args.warm))
        report["prompts"] = {"warm": len(warm), "excluded_quoted_case": excluded}
        for config in args.config_list:
            if time.monotonic() + 60 > deadline:
                report["notes"].append(f"{config.name}: skipped (time budget)")
                continue
            if config.cluster:
                assert cluster is not None
                prefix, _ = await asyncio.to_thread(pick_prefix, cluster, config.shards)
                keys = Keys(prefix, shards=config.shards, cluster=True)
                cache_port = cluster.primary_for_slot(key_slot(f"{{{prefix}}}".encode())).port
                nodes = []
                for node in cluster.primaries():
                    shards = [s.shard for s in keys.all_shards()
                              if cluster.primary_for_slot(key_slot(s.requests.encode())).port
                              == node.port]
                    nodes.append(Node(node.url, node.port, node.process.pid if node.process
                                      else None, shards, node.port == cache_port))
                url = cluster.url
            else:
                assert valkey is not None
                prefix = f"vb{uuid.uuid4().hex[:8]}"
                keys = Keys(prefix)
                nodes = [Node(valkey.url, urlparse(valkey.url).port or 6379,
                              valkey.process.pid if valkey.process else None, [0], True)]
                url = valkey.url
            say(f"\n== {config.name}: {'3-primary cluster' if config.cluster else 'one Valkey'}"
                f", PROMPTCACHE_SHARDS={config.shards}, {args.workers} workers, prefix {prefix}"
                f" ==")
            say("  nodes: " + "; ".join(f":{n.port} {n.role}" for n in nodes))
            mine_from = len(procs)
            try:
                report["configs"][config.name] = await run_config(
                    args, config, url, nodes, keys, tmp, deadline, warm, procs, logs)
            finally:
                mine, mine_logs = procs[mine_from:], logs[mine_from:]
                stopped = await asyncio.to_thread(stop_workers, mine)
                entry = report["configs"].setdefault(config.name, {"config": config.name})
                entry["stopped"] = stopped
                entry["logs"] = scan_worker_logs(mine_logs, EXPECTED)
                cache_node = next(n for n in nodes if n.cache)
                try:
                    entry["health"] = await asyncio.to_thread(worker_health, cache_node.url, keys)
                except redis.RedisError as exc:
                    entry["health_error"] = repr(exc)
    finally:
        remove_signal_handlers()


# --- output -----------------------------------------------------------------------------------

def _f(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["parameters"]
    lines = [
        "",
        f"promptcache on a Valkey Cluster  {report['started_at']}",
        f"  machine: {m['nproc']} CPUs, Python {m['python']}, {m.get('cpu_model', '?')}, load "
        f"average at start {m.get('load_avg_at_start')}",
        f"  {p['workers']} worker processes (+ {'no' if p['no_janitor'] else 'one'} janitor), "
        f"embeddings off, {p['requests']} exact hits at once, {p['repeats']} repeat(s) "
        f"(medians), {p['warm']} warm prompts",
        "",
        f"{'config':<12}{'shards':>7}{'hits/s':>10}{'repeats':>26}{'busy':>7}"
        f"{'worker cpu s':>14}{'server µs/hit':>15}",
        "-" * 91,
    ]
    for name, c in report.get("configs", {}).items():
        md = c.get("medians")
        if not md:
            lines.append(f"{name:<12}  (no measurement: see the errors and notes below)")
            continue
        reps = ", ".join(_f(r.get("hits_per_s"), "{:.0f}") for r in c.get("repeats", []))
        lines.append(f"{name:<12}{c.get('shards', '-'):>7}{_f(md.get('hits_per_s'), '{:.0f}'):>10}"
                     f"{reps:>26}{_f(md.get('machine_busy'), '{:.2f}'):>7}"
                     f"{_f(md.get('worker_cpu_s')):>14}"
                     f"{_f(md.get('all_nodes_cpu_us_per_hit')):>15}")
    lines += [
        "-" * 91,
        "hits/s: answered / (first XADD -> last result read); busy: the machine's CPU busy "
        "share during the repeat;",
        "server µs/hit: used_cpu_sys+user of every node, summed, per hit",
        "",
        "per node (medians over repeats; per hit = per exact hit answered in the whole run, "
        "'own' = per hit of the node's own shards)",
        f"{'config':<12}{'node':>7}  {'role':<22}{'cmds/hit':>9}{'cpu µs/hit':>11}"
        f"{'stream µs/own':>14}{'cache µs/hit':>13}  top commands per hit",
        "-" * 130,
    ]
    for name, c in report.get("configs", {}).items():
        for n in (c.get("medians") or {}).get("nodes", []):
            top = ", ".join(f"{k} {v:.3g}" for k, v in list(n["calls_per_hit"].items())[:6])
            cache = n.get("cache_cpu_us_per_hit", n.get("cache_cpu_us_per_hit_est"))
            lines.append(f"{name:<12}{n['port']:>7}  {n['role']:<22}"
                         f"{_f(n.get('commands_per_hit'), '{:.2f}'):>9}"
                         f"{_f(n.get('cpu_us_per_hit')):>11}"
                         f"{_f(n.get('stream_cpu_us_per_own_hit')):>14}"
                         f"{_f(cache):>13}"
                         f"  {top}")
    lines += [
        "-" * 130,
        "stream µs/own: CPU of a shard-only primary per hit of its shard; cache µs/hit: CPU of "
        "the cache slot's primary per hit (with a",
        "shard beside it: its CPU minus that shard's hits x the shard-only primaries' stream "
        "µs/own, an estimate)",
    ]
    pr = report.get("prediction") or {}
    if pr:
        lines += ["", "prediction (one core per primary; CPU per hit as measured here):"]
        for name, st in pr.get("stream", {}).items():
            lines.append(f"  a stream-shard primary ({name}, median of {st['primaries']}): "
                         f"{st['cpu_us_per_hit']} µs per hit of its shard -> ceiling "
                         f"{st['ceiling_hits_per_s']:,} hits/s per stream primary")
        for name, ca in pr.get("cache", {}).items():
            lines.append(f"  the cache slot's primary ({name}, no shard beside it): "
                         f"{ca['cpu_us_per_hit']} µs per hit -> ceiling "
                         f"{ca['ceiling_hits_per_s']:,} hits/s for the whole cluster")
        for name, feeds in pr.get("stream_primaries_one_cache_slot_feeds", {}).items():
            lines.append(f"  -> one cache slot feeds about {feeds} saturated stream primaries "
                         f"at {name}'s stream cost before it saturates")
        for name, est in pr.get("cache_estimate_beside_a_shard", {}).items():
            lines.append(f"  cross-check ({name}, :{est['port']}: a shard and the cache slot): "
                         "its CPU minus its shard's hits x the shard-only primaries' µs per hit "
                         f"leaves {est['cpu_us_per_hit']} µs per hit for the cache slot (noisy: a "
                         "difference of larger figures)")
    lines += [
        "",
        f"note: on this {m['nproc']}-CPU box every node, the workers and this producer share "
        f"the same {m['nproc']} cores: the measured",
        "1-vs-3-shard ratio reflects CPU contention, not cluster capacity. The per-node CPU "
        "figures are the basis of the prediction",
        "(and CPU per hit depends on batch sizes, which depend on the load).",
    ]
    for name, c in report.get("configs", {}).items():
        lines += config_footer(name, c)
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.max_seconds - SHUTDOWN_RESERVE_S
    signal.signal(signal.SIGTERM, _sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="promptcache-cluster-"))
    report: dict[str, Any] = {
        **report_head("cluster", argv),
        "parameters": {
            "configs": [c.name for c in args.config_list], "requests": args.requests,
            "repeats": args.repeats, "warm": args.warm, "workers": args.workers,
            "no_janitor": args.no_janitor, "embeddings": "off",
            "generator_latency_ms": args.generator_latency_ms, "quick": args.quick,
            "seed": args.seed, "max_seconds": args.max_seconds},
        "configs": {},
        "notes": [],
    }
    cluster: EmbeddedCluster | None = None
    valkey: EmbeddedValkey | None = None
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    failed: BaseException | None = None

    def stop_everything() -> None:
        if report.get("cleaned_up"):
            return
        report["cleaned_up"] = True
        stop_workers(procs)
        if cluster is not None:
            cluster.stop()
        if valkey is not None:
            valkey.stop()
        if args.keep_temp:
            say(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    try:
        if any(c.cluster for c in args.config_list):
            say(f"starting a 3-primary embedded Valkey Cluster in {tmp} ...")
            cluster = EmbeddedCluster(tmp / "cluster", primaries=3, replicas=0).start()
            with cluster.nodes[0].client() as c:
                report["valkey"] = {"version": c.info("server").get("valkey_version")}
        if any(not c.cluster for c in args.config_list):
            progress("starting an embedded Valkey ...")
            valkey = EmbeddedValkey(tmp / "valkey").start()
        STOP.force = stop_everything
        asyncio.run(run_all(args, cluster, valkey, tmp, deadline, report, procs, logs))
    except (KeyboardInterrupt, Interrupted) as exc:
        failed = KeyboardInterrupt(str(exc))
        say("\ninterrupted: stopping processes and servers ...")
    except Exception as exc:  # report, clean up, exit non-zero
        failed = exc
        say(f"\nerror: {exc!r}; stopping processes and servers ...")
    finally:
        STOP.force = None
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stop_everything()
        finally:
            signal.signal(signal.SIGINT, previous)
    report.pop("cleaned_up", None)
    report["prediction"] = prediction(report)
    report["load_avg_at_end"] = load_avg()
    report["total_s"] = round(time.monotonic() - started, 1)
    if failed is not None:
        report["failed"] = repr(failed)
    if report["configs"]:
        say(render(report))
    say(f"total {report['total_s']:.0f} s")
    if not args.no_write and failed is None:
        path = write_json(report, args.output_dir, "cluster")
        say(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
            "and cluster-latest.json")
    if failed is not None:
        return 130 if isinstance(failed, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
