"""The hit path at stream-processor speed (issue 13): every target measured in one run, on the
same servers.

    .venv/bin/python benchmarks/hit_path.py            # the full run (about 10 minutes)
    .venv/bin/python benchmarks/hit_path.py --quick    # a smoke run (about 3 minutes)
    .venv/bin/python benchmarks/hit_path.py --configs bare,w1 --requests 5000 --repeats 5

One embedded Valkey (AOF on, everysec, as `promptcache up` starts it) and one embedded
PostgreSQL serve every configuration in turn (`--configs`, default bare,w1,w2,durable):

  bare     benchmarks/bare_consumer.py: one redis-py process, XREADGROUP COUNT 100, then per
           event GET + MULTI { XADD result, XACK }. The floor, throughput only.
  wN       N worker processes (`python -m ops worker`) and the janitor, with DATABASE_URL set so
           each worker runs its persister, as `promptcache up` runs them (the web process is
           left out: it is not on the hit path). Embeddings as `up` has them by default
           (`--embeddings local`); the procedural generator at --generator-latency-ms.
  durable  w1 with PROMPTCACHE_DURABLE_RESULTS=true (WAITAOF 1 0 before each batch counts).
           `wN-durable` for N workers.

Each worker configuration gets a fresh key prefix and a fresh PostgreSQL database (migrated),
warms --warm distinct prompts (misses), then, --repeats times:

  throughput  --requests exact hits (the warm prompts retyped) published at once: results/s,
              from the first XADD to the last result read.
  open        exact hits open loop at --open-rate (1000/s) for --open-seconds: latency_ms
              p50/p99, achieved rate.
  burst       --burst new prompts (misses) and, right after them, --burst exact hits, each
              group in one pipeline: the hits' latency_ms p50/p99 (the misses are waited for
              before the next phase).

latency_ms is the result's own field: request entry id time -> result published (server side).
Throughout, the persister's backlog on the change stream (XINFO GROUPS: `lag`, `pending` of
group `persister`) is sampled every 0.25 s: max per phase, max overall, final (after the last
phase), and how long it took to drain afterwards (bounded).

Figures are medians over the repeats (every repeat is in the JSON). The table goes to stdout,
the JSON to benchmarks/results/hit-path-<UTC stamp>.json and hit-path-latest.json. Every wait
has a deadline, the whole run is bounded by --max-seconds, and the servers, processes and temp
dir are removed at the end, also on Ctrl-C, SIGTERM or an error.
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
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    RESULTS_DIR, STOP, Interrupted, ResultReader, _sigterm, config_footer, cpu_times,
    install_signal_handlers, load_avg, percentiles, remove_signal_handlers, say,
    scan_worker_logs, service_env, start_processes, stop_workers, wait_for_workers,
    report_head, worker_health, write_json)
from benchmarks.spine import pick_prompts  # noqa: E402
from ops.demo import retype  # noqa: E402
from ops.embedded_servers import EmbeddedPostgres, EmbeddedValkey  # noqa: E402
from promptcache.config import Settings  # noqa: E402
from promptcache.keys import PERSISTER_GROUP, REQUESTS_GROUP, Keys  # noqa: E402
from promptcache.storage.migrate import apply  # noqa: E402
from schemas.events import Request  # noqa: E402

SHUTDOWN_RESERVE_S = 30.0  # kept back from --max-seconds for stopping processes and servers
TARGETS = {"ratio_1_worker_to_bare": 0.25, "burst_p99_ms": 100.0, "open_p99_ms": 10.0}
DEFAULTS = {"requests": 20000, "repeats": 3, "warm": 100, "burst": 200, "open_seconds": 10.0,
            "max_seconds": 1500.0}
QUICK = {"requests": 2000, "repeats": 1, "warm": 30, "burst": 200, "open_seconds": 3.0,
         "max_seconds": 480.0}
CONFIG_RE = re.compile(r"^(bare|durable|w(\d+)(-durable)?)$")


# --- arguments --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    name: str
    workers: int  # 0: the bare loop
    durable: bool = False


def parse_config(text: str) -> Config:
    m = CONFIG_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"unknown config {text!r} (bare, wN, wN-durable, "
                                         "durable)")
    if text == "bare":
        return Config("bare", 0)
    if text == "durable":
        return Config("durable", 1, durable=True)
    n = int(m.group(2))
    if n < 1:
        raise argparse.ArgumentTypeError("wN needs N >= 1")
    return Config(text, n, durable=bool(m.group(3)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="bare,w1,w2,durable",
                   help="comma-separated, run in this order: bare, wN (N workers), "
                        "wN-durable, durable (= w1-durable); default bare,w1,w2,durable")
    p.add_argument("--requests", type=int, default=None,
                   help="exact hits published at once in the throughput phase (default 20000; "
                        "--quick 2000)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats of every phase per configuration; figures are medians "
                        "(default 3; --quick 1)")
    p.add_argument("--warm", type=int, default=None,
                   help="distinct prompts warmed per configuration (default 100; --quick 30)")
    p.add_argument("--burst", type=int, default=None,
                   help="misses, then as many exact hits, sent at once (default 200)")
    p.add_argument("--open-rate", type=float, default=1000.0,
                   help="exact hits per second of the open-loop phase (default 1000)")
    p.add_argument("--open-seconds", type=float, default=None,
                   help="seconds of the open-loop phase (default 10; --quick 3)")
    p.add_argument("--generator-latency-ms", type=int, default=200,
                   help="procedural generator latency for the misses (default 200)")
    p.add_argument("--embeddings", choices=("local", "off"), default="local",
                   help="PROMPTCACHE_EMBEDDINGS of the workers (default local, as `promptcache "
                        "up` runs them; the model loads before anything is measured)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2000 requests, 1 repeat, 30 warm prompts, 3 s open loop")
    p.add_argument("--seed", type=int, default=1, help="prompt sampling and retyping seed")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="upper bound on the whole run (default 1500; --quick 480)")
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
    if min(args.requests, args.repeats, args.warm, args.burst) < 1 or args.open_rate <= 0 \
            or args.open_seconds <= 0:
        p.error("--requests, --repeats, --warm, --burst, --open-rate and --open-seconds must be "
                "positive")
    return args


# --- results ----------------------------------------------------------------------------------

@dataclass
class Got:
    cache: str  # exact/semantic/miss/... or the status when not ok
    latency_ms: float | None
    received: float  # monotonic


class Collector(ResultReader):
    def __init__(self, url: str, stream: str) -> None:
        super().__init__(url, stream)
        self.got: dict[str, Got] = {}

    def take(self, data: dict[str, Any], now: float) -> None:
        status = data.get("status", "?")
        cache = data.get("cache") if status == "ok" and data.get("cache") else status
        self.got[data.get("request_id", "")] = Got(cache, data.get("latency_ms"), now)


class LagSampler:
    """XINFO GROUPS on the change stream every `every` s: the persister group's lag (entries
    not yet delivered to it) and pending (delivered, not yet acknowledged)."""

    def __init__(self, url: str, keys: Keys, every: float = 0.25) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=5)
        self.stream = keys.changes
        self.every = every
        self.phase = "start"
        self.samples: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.t0 = time.monotonic()

    async def sample(self) -> dict[str, Any] | None:
        try:
            groups = await self.client.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return None
        for g in groups:
            if g["name"].decode() == PERSISTER_GROUP:
                lag = g.get("lag")
                row = {"t": round(time.monotonic() - self.t0, 2), "phase": self.phase,
                       "lag": None if lag is None else int(lag), "pending": int(g["pending"])}
                self.samples.append(row)
                return row
        return None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.sample()
            except redis.RedisError:
                pass
            await asyncio.sleep(self.every)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=6)
        await self.client.aclose()

    async def drain(self, deadline: float) -> float | None:
        """Seconds until lag and pending are both 0 (None if not by `deadline`)."""
        started = time.monotonic()
        while time.monotonic() < deadline:
            STOP.check()
            row = await self.sample()
            if row is not None and row["lag"] == 0 and row["pending"] == 0:
                return round(time.monotonic() - started, 2)
            await asyncio.sleep(0.25)
        return None

    def summary(self) -> dict[str, Any]:
        def backlog(r: dict[str, Any]) -> int:
            return (r["lag"] or 0) + r["pending"]
        per_phase: dict[str, dict[str, int]] = {}
        for r in self.samples:
            cur = per_phase.setdefault(r["phase"], {"max_lag": 0, "max_pending": 0,
                                                    "samples": 0})
            cur["max_lag"] = max(cur["max_lag"], r["lag"] or 0)
            cur["max_pending"] = max(cur["max_pending"], r["pending"])
            cur["samples"] += 1
        measured = [r for r in self.samples if r["phase"] != "drain"]
        final = measured[-1] if measured else None
        return {
            "samples": len(self.samples),
            "lag_unknown_samples": sum(1 for r in self.samples if r["lag"] is None),
            "max_lag": max((r["lag"] or 0 for r in measured), default=None),
            "max_pending": max((r["pending"] for r in measured), default=None),
            "max_backlog": max((backlog(r) for r in measured), default=None),
            "final": final,
            "per_phase": per_phase,
            "series": self.samples[::max(1, len(self.samples) // 400)],
        }


# --- one configuration ------------------------------------------------------------------------

@dataclass
class Run:
    args: argparse.Namespace
    config: Config
    keys: Keys
    client: aioredis.Redis
    collector: Collector
    deadline: float
    tag: str = field(default_factory=lambda: f"h{uuid.uuid4().hex[:8]}")
    sent: dict[str, tuple[float, int]] = field(default_factory=dict)  # rid -> (sent, entry ms)
    notes: list[str] = field(default_factory=list)
    counter: int = 0

    def rid(self, phase: str) -> str:
        self.counter += 1
        return f"{self.tag}.{phase}.{self.counter}"

    def until(self, seconds: float) -> float:
        return min(time.monotonic() + seconds, self.deadline)

    async def publish(self, requests: list[Request]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for request in requests:
                pipe.xadd(self.keys.requests, {"data": request.model_dump_json(exclude_none=True)})
            ids = await pipe.execute()
        now = time.monotonic()
        for request, mid in zip(requests, ids, strict=True):
            self.sent[request.request_id] = (now, int(mid.decode().split("-")[0]))

    async def wait(self, phase: str, ids: list[str], seconds: float) -> None:
        if not await self.collector.wait(ids, self.until(seconds)):
            self.notes.append(f"{phase}: {len(ids) - self.collector.answered(ids)} of {len(ids)} "
                              f"unanswered after {seconds:.0f} s")

    def summarise(self, ids: list[str]) -> dict[str, Any]:
        got = [self.collector.got[rid] for rid in ids if rid in self.collector.got]
        outcomes = collections.Counter(g.cache for g in got)
        published = sorted(self.sent[rid][1] + g.latency_ms for rid, g in
                           ((r, self.collector.got[r]) for r in ids if r in self.collector.got)
                           if g.latency_ms is not None)
        out: dict[str, Any] = {
            "requests": len(ids), "answered": len(got), "outcomes": dict(outcomes),
            "latency_ms": percentiles(g.latency_ms for g in got if g.latency_ms is not None)}
        if len(published) > 1 and published[-1] > published[0]:
            out["answered_rate"] = round((len(published) - 1) * 1000
                                         / (published[-1] - published[0]), 1)
        return out


async def throughput(run: Run, warm: list[str], rng: random.Random) -> dict[str, Any]:
    k = run.args.requests
    requests = [Request(request_id=run.rid("tp"), prompt=retype(warm[i % len(warm)], rng))
                for i in range(k)]
    start = time.monotonic()
    for offset in range(0, k, 1000):
        await run.publish(requests[offset:offset + 1000])
    published = time.monotonic()
    ids = [r.request_id for r in requests]
    await run.wait("throughput", ids, 30 + k / 200)
    out = run.summarise(ids)
    received = [run.collector.got[rid].received for rid in ids if rid in run.collector.got]
    if received:
        wall = max(received) - start
        out.update(publish_s=round(published - start, 3), wall_s=round(wall, 3),
                   results_per_s=round(len(received) / wall, 1) if wall > 0 else None)
    return out


async def open_loop(run: Run, warm: list[str], rng: random.Random) -> dict[str, Any]:
    rate, n = run.args.open_rate, max(1, int(run.args.open_rate * run.args.open_seconds))
    ids: list[str] = []
    lag: list[float] = []
    t0 = time.monotonic() + 0.05
    i = 0
    while i < n:
        STOP.check()
        if time.monotonic() > run.deadline:
            run.notes.append(f"open: stopped sending at {i}/{n} (time budget)")
            break
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        if due > i:
            batch = [Request(request_id=run.rid("open"), prompt=retype(warm[j % len(warm)], rng))
                     for j in range(i, due)]
            await run.publish(batch)
            now = time.monotonic()
            lag += [(now - (t0 + j / rate)) * 1000 for j in range(i, due)]
            ids += [r.request_id for r in batch]
            i = due
        if i < n:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    sends = sorted(run.sent[rid][0] for rid in ids)
    await run.wait("open", ids, 15)
    out = run.summarise(ids)
    out["send_lag_ms"] = percentiles(lag)
    if len(sends) > 1 and sends[-1] > sends[0]:
        out["achieved_send_rate"] = round((len(sends) - 1) / (sends[-1] - sends[0]), 1)
    return out


async def burst(run: Run, warm: list[str], fresh: list[str], rng: random.Random
                ) -> dict[str, Any]:
    b = run.args.burst
    misses = [Request(request_id=run.rid("burstmiss"), prompt=fresh.pop()) for _ in range(b)]
    hits = [Request(request_id=run.rid("burst"), prompt=retype(warm[i % len(warm)], rng))
            for i in range(b)]
    await run.publish(misses)
    await run.publish(hits)
    hit_ids = [r.request_id for r in hits]
    miss_ids = [r.request_id for r in misses]
    await run.wait("burst hits", hit_ids, 30)
    gen_s = run.args.generator_latency_ms / 1000
    slots = run.config.workers * Settings.model_fields["generation_concurrency"].default
    await run.wait("burst misses", miss_ids, 30 + 2 * b * gen_s / slots)
    out = run.summarise(hit_ids)
    out["misses"] = run.summarise(miss_ids)
    return out


async def warm_up(run: Run, warm: list[str]) -> dict[str, Any]:
    requests = [Request(request_id=run.rid("warm"), prompt=p) for p in warm]
    await run.publish(requests)
    ids = [r.request_id for r in requests]
    gen_s = run.args.generator_latency_ms / 1000
    slots = run.config.workers * Settings.model_fields["generation_concurrency"].default
    await run.wait("warm", ids, 60 + 2 * len(warm) * gen_s / slots)
    return run.summarise(ids)


def fresh_database(admin_url: str, name: str, migrations: Path) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(admin_url, dbname=name)
    apply(url, migrations)
    return url


async def run_config(args: argparse.Namespace, config: Config, url: str, admin_db: str | None,
                     tmp: Path, deadline: float, prompts: tuple[list[str], list[str]],
                     procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> dict[str, Any]:
    """One configuration: start its processes (appended to `procs`, stopped by the caller),
    measure, and return its report."""
    prefix = f"hp{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    data_dir = tmp / config.name
    data_dir.mkdir()
    report: dict[str, Any] = {"config": config.name, "workers": config.workers,
                              "durable": config.durable, "prefix": prefix,
                              "load_avg_before": load_avg()}
    started = time.monotonic()
    if config.workers == 0:
        admin = redis.Redis.from_url(url, socket_timeout=5)
        try:
            admin.xgroup_create(keys.requests, REQUESTS_GROUP, id="0", mkstream=True)
            admin.set(f"{prefix}:bare:entry", "x" * 300)
        finally:
            admin.close()
        log = data_dir / "bare.stderr"
        with log.open("wb") as fh:
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "benchmarks" / "bare_consumer.py"), url,
                 keys.requests, REQUESTS_GROUP, keys.results, f"{prefix}:bare:entry"],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh,
                start_new_session=True))
        logs.append(log)
        mine = procs[-1:]
        report["ready_s"] = round(await wait_for_bare(url, keys, mine[0], log, deadline), 1)
    else:
        assert admin_db is not None
        database_url = await asyncio.to_thread(fresh_database, admin_db, f"hp_{prefix}",
                                               Settings.model_fields["migrations_dir"].default)
        env = service_env(url, prefix, data_dir, DATABASE_URL=database_url,
                          PROMPTCACHE_GENERATOR="procedural",
                          PROMPTCACHE_GENERATOR_LATENCY_MS=str(args.generator_latency_ms),
                          PROMPTCACHE_EMBEDDINGS=args.embeddings,
                          PROMPTCACHE_DURABLE_RESULTS="true" if config.durable else "false",
                          HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        (data_dir / "logs").mkdir()
        mine, mine_logs = start_processes(config.workers, env, data_dir / "logs", "worker")
        janitor, janitor_logs = start_processes(1, env, data_dir / "logs", "janitor")
        procs += mine + janitor
        logs += mine_logs + janitor_logs
        ready = await wait_for_workers(url, keys, mine, mine_logs,
                                       max(min(deadline - time.monotonic(), 240), 1),
                                       semantic=args.embeddings == "local")
        report["ready_s"] = round(ready, 1)
    say(f"  ready after {time.monotonic() - started:.1f} s")
    client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    collector = Collector(url, keys.results)
    sampler = LagSampler(url, keys)
    run = Run(args, config, keys, client, collector, deadline)
    report["notes"] = run.notes
    rng = random.Random(args.seed + 1)
    warm, fresh_pool = prompts
    fresh = list(reversed(fresh_pool))
    collector.start()
    sampler.start()
    pids = [p.pid for p in mine]
    cpu0 = cpu_times(pids)
    repeats: list[dict[str, Any]] = []
    report["repeats"] = repeats
    try:
        if config.workers:
            sampler.phase = "warm"
            say(f"  warm: {len(warm)} distinct prompts")
            report["warm"] = await warm_up(run, warm)
        for r in range(args.repeats):
            rep: dict[str, Any] = {}
            repeats.append(rep)
            sampler.phase = f"throughput.{r}"
            rep["throughput"] = await throughput(run, warm, rng)
            say(f"  [{r + 1}/{args.repeats}] throughput "
                f"{rep['throughput'].get('results_per_s')} results/s")
            if config.workers == 0:
                continue
            if rep["throughput"]["answered"] < args.requests / 2:
                run.notes.append("throughput: fewer than half answered; the other phases of "
                                 "this configuration are skipped (see its stderr)")
                break
            sampler.phase = f"open.{r}"
            rep["open"] = await open_loop(run, warm, rng)
            say(f"  [{r + 1}/{args.repeats}] open loop at {args.open_rate:g}/s: p99 "
                f"{(rep['open']['latency_ms'] or {}).get('p99')} ms")
            if len(fresh) < args.burst:
                run.notes.append("burst: skipped, not enough fresh prompts")
                continue
            sampler.phase = f"burst.{r}"
            rep["burst"] = await burst(run, warm, fresh, rng)
            say(f"  [{r + 1}/{args.repeats}] burst of {args.burst} hits after {args.burst} "
                f"misses: p50 {(rep['burst']['latency_ms'] or {}).get('p50')} p99 "
                f"{(rep['burst']['latency_ms'] or {}).get('p99')} ms")
        report["worker_cpu_s"] = round(cpu_times(pids) - cpu0, 1)
        if config.workers:
            sampler.phase = "end"
            await sampler.sample()
            sampler.phase = "drain"
            report["persister_drain_s"] = await sampler.drain(run.until(30))
            report["persister"] = sampler.summary()
            report["service"] = await service_state(client, keys, collector)
    finally:
        await sampler.stop()
        await collector.stop()
        await client.aclose()
    report["medians"] = medians(repeats)
    report["load_avg_after"] = load_avg()
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


async def wait_for_bare(url: str, keys: Keys, proc: subprocess.Popen[bytes], log: Path,
                        deadline: float, timeout: float = 30.0) -> float:
    """The bare consumer has read from the group once (it shows in XINFO CONSUMERS): its
    start-up is not in the measured time."""
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    started = time.monotonic()
    try:
        while True:
            STOP.check()
            if proc.poll() is not None:
                raise RuntimeError(f"bare consumer exited with {proc.returncode}:\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")
            consumers = await client.xinfo_consumers(keys.requests, REQUESTS_GROUP)
            if any(c["name"].decode() == "bare" for c in consumers):
                return time.monotonic() - started
            if time.monotonic() > min(started + timeout, deadline):
                raise RuntimeError("the bare consumer did not join the group in time")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def service_state(client: aioredis.Redis, keys: Keys, collector: Collector
                        ) -> dict[str, Any]:
    state: dict[str, Any] = {"duplicate_results": collector.duplicates}
    try:
        state["pending_requests"] = int(
            (await client.xpending(keys.requests, REQUESTS_GROUP))["pending"])
        state["dead_letters"] = int(await client.xlen(keys.dead_letter))
        state["changes_stream_len"] = int(await client.xlen(keys.changes))
    except redis.RedisError as exc:
        state["error"] = repr(exc)
    return state


def medians(repeats: list[dict[str, Any]]) -> dict[str, float | None]:
    def med(path: tuple[str, ...]) -> float | None:
        values = []
        for rep in repeats:
            cur: Any = rep
            for part in path:
                cur = cur.get(part) if isinstance(cur, dict) else None
            if isinstance(cur, (int, float)):
                values.append(float(cur))
        return round(statistics.median(values), 2) if values else None
    return {
        "throughput_results_per_s": med(("throughput", "results_per_s")),
        "throughput_answered_rate": med(("throughput", "answered_rate")),
        "throughput_p99_ms": med(("throughput", "latency_ms", "p99")),
        "open_p50_ms": med(("open", "latency_ms", "p50")),
        "open_p99_ms": med(("open", "latency_ms", "p99")),
        "open_achieved_rate": med(("open", "achieved_send_rate")),
        "burst_p50_ms": med(("burst", "latency_ms", "p50")),
        "burst_p99_ms": med(("burst", "latency_ms", "p99")),
    }


# --- the run ----------------------------------------------------------------------------------

async def run_all(args: argparse.Namespace, url: str, admin_db: str | None, tmp: Path,
                  deadline: float, report: dict[str, Any],
                  procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    install_signal_handlers()
    try:
        need = args.warm + args.repeats * args.burst
        warm, fresh, excluded = pick_prompts(SimpleNamespace(seed=args.seed, prompts=args.warm))
        if len(fresh) < args.repeats * args.burst:
            made = [f"{warm[i % len(warm)]}, study number {i}"
                    for i in range(args.repeats * args.burst - len(fresh))]
            fresh = fresh + made
            report["notes"].append(f"{len(made)} burst misses are made-up variants (not enough "
                                   f"distinct real prompts for {need})")
        report["prompts"] = {"warm": len(warm), "fresh": len(fresh),
                             "excluded_quoted_case": excluded}
        client = aioredis.Redis.from_url(url, socket_timeout=5)
        try:
            aof = await client.config_get("appendonly")
            fsync = await client.config_get("appendfsync")
            info = await client.info("server")
            report["valkey"] = {"appendonly": aof.get("appendonly"),
                                "appendfsync": fsync.get("appendfsync"),
                                "version": info.get("valkey_version") or info.get("redis_version")}
        finally:
            await client.aclose()
        if report["valkey"]["appendonly"] != "yes" and any(c.durable for c in args.config_list):
            raise RuntimeError("durable mode needs appendonly yes on the Valkey")
        for config in args.config_list:
            if time.monotonic() + 30 > deadline:
                report["notes"].append(f"{config.name}: skipped (time budget)")
                continue
            say(f"\n== {config.name}: " + ("bare redis-py consumer loop" if not config.workers
                else f"{config.workers} worker(s) + persister + janitor, PostgreSQL, durable "
                f"{'on' if config.durable else 'off'}") + " ==")
            mine_from = len(procs)
            try:
                report["configs"][config.name] = await run_config(
                    args, config, url, admin_db, tmp, deadline, (warm, fresh), procs, logs)
            finally:
                mine, mine_logs = procs[mine_from:], logs[mine_from:]
                stopped = await asyncio.to_thread(stop_workers, mine)
                entry = report["configs"].setdefault(config.name, {"config": config.name})
                entry["stopped"] = stopped
                entry["logs"] = scan_worker_logs(mine_logs, ())
                if config.workers:
                    try:
                        entry["health"] = await asyncio.to_thread(
                            worker_health, url, Keys(entry.get("prefix", "?")))
                    except redis.RedisError as exc:
                        entry["health_error"] = repr(exc)
    finally:
        remove_signal_handlers()


# --- output -----------------------------------------------------------------------------------

def _f(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    configs = report.get("configs", {})
    bare = (configs.get("bare") or {}).get("medians", {}).get("throughput_results_per_s")
    out: dict[str, Any] = {}
    for name, c in configs.items():
        m = c.get("medians") or {}
        tp = m.get("throughput_results_per_s")
        if bare and tp and name != "bare":
            c["ratio_to_bare"] = round(tp / bare, 3)
    w1 = configs.get("w1", {})
    if "ratio_to_bare" in w1:
        out["ratio_1_worker_to_bare"] = {"value": w1["ratio_to_bare"],
                                         "target": f">= {TARGETS['ratio_1_worker_to_bare']}",
                                         "met": w1["ratio_to_bare"]
                                         >= TARGETS["ratio_1_worker_to_bare"]}
    for key, target in (("burst_p99_ms", TARGETS["burst_p99_ms"]),
                        ("open_p99_ms", TARGETS["open_p99_ms"])):
        for name in ("w1", "w2"):
            v = (configs.get(name, {}).get("medians") or {}).get(key)
            if v is not None:
                out[f"{name}.{key}"] = {"value": v, "target": f"<= {target:g}",
                                        "met": v <= target}
    for name, c in configs.items():
        p = c.get("persister")
        if p and p.get("final") is not None:
            out[f"{name}.persister"] = {"max_backlog": p["max_backlog"],
                                        "final_backlog": (p["final"]["lag"] or 0)
                                        + p["final"]["pending"],
                                        "drained_after_s": c.get("persister_drain_s")}
    return out


def render(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["parameters"]
    lines = [
        "",
        f"promptcache hit path (issue 13)  {report['started_at']}",
        f"  machine: {m['nproc']} CPUs, Python {m['python']}, {m.get('cpu_model', '?')}, load "
        f"average at start {m.get('load_avg_at_start')}",
        f"  valkey {report.get('valkey', {})}; embeddings {p['embeddings']}; generator "
        f"{p['generator_latency_ms']} ms; {p['requests']} throughput requests, "
        f"{p['repeats']} repeat(s) (medians), open loop {p['open_rate']:g}/s for "
        f"{p['open_seconds']:g} s, burst {p['burst']}+{p['burst']}",
        "",
        "latency_ms = request entry id -> result published (the result's own field)",
        f"{'config':<12}{'results/s':>11}{'x bare':>8}{'tp p99':>9}{'open p50':>10}"
        f"{'open p99':>10}{'open /s':>9}{'burst p50':>11}{'burst p99':>11}"
        f"{'lag max':>9}{'final':>7}{'drain s':>9}",
        "-" * 116,
    ]
    for name, c in report.get("configs", {}).items():
        md = c.get("medians") or {}
        per = c.get("persister") or {}
        final = per.get("final")
        final_s = "-" if final is None else str((final["lag"] or 0) + final["pending"])
        lines.append(
            f"{name:<12}{_f(md.get('throughput_results_per_s')):>11}"
            f"{_f(c.get('ratio_to_bare'), '{:.3f}'):>8}{_f(md.get('throughput_p99_ms')):>9}"
            f"{_f(md.get('open_p50_ms'), '{:.2f}'):>10}{_f(md.get('open_p99_ms'), '{:.2f}'):>10}"
            f"{_f(md.get('open_achieved_rate'), '{:.0f}'):>9}"
            f"{_f(md.get('burst_p50_ms')):>11}{_f(md.get('burst_p99_ms')):>11}"
            f"{_f(per.get('max_backlog'), '{:.0f}'):>9}{final_s:>7}"
            f"{_f(c.get('persister_drain_s'), '{:.1f}'):>9}")
    lines += [
        "-" * 116,
        "results/s: throughput phase, answered / (last result read - first XADD); x bare: "
        "over the bare loop's; tp p99: that phase's latency_ms p99",
        "open: exact hits open loop (p50/p99 latency_ms, achieved send rate); burst: hits sent "
        "right after as many misses",
        "lag max / final: persister backlog on the change stream (XINFO GROUPS lag + pending), "
        "max through the run and at its end; drain s: time to 0 afterwards",
    ]
    for name, v in report.get("verdicts", {}).items():
        lines.append(f"target {name}: {v}")
    for name, c in report.get("configs", {}).items():
        for rep_i, rep in enumerate(c.get("repeats", [])):
            outs = {ph: rep[ph].get("outcomes") for ph in ("throughput", "open", "burst")
                    if ph in rep}
            if "burst" in rep:
                outs["burst misses"] = rep["burst"]["misses"].get("outcomes")
            lines.append(f"{name} repeat {rep_i + 1} outcomes: {outs}")
        svc = c.get("service")
        if svc:
            lines.append(f"{name} service: {svc}")
        lines += config_footer(name, c, events="events", label="level:event")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.max_seconds - SHUTDOWN_RESERVE_S
    signal.signal(signal.SIGTERM, _sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="promptcache-hitpath-"))
    report: dict[str, Any] = {
        **report_head("hit_path", argv),
        "parameters": {
            "configs": [c.name for c in args.config_list], "requests": args.requests,
            "repeats": args.repeats, "warm": args.warm, "burst": args.burst,
            "open_rate": args.open_rate, "open_seconds": args.open_seconds,
            "generator_latency_ms": args.generator_latency_ms, "embeddings": args.embeddings,
            "quick": args.quick, "seed": args.seed, "max_seconds": args.max_seconds},
        "targets": TARGETS,
        "configs": {},
        "notes": [],
    }
    valkey: EmbeddedValkey | None = None
    postgres: EmbeddedPostgres | None = None
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    failed: BaseException | None = None

    def stop_everything() -> None:
        if report.get("cleaned_up"):
            return
        report["cleaned_up"] = True
        stop_workers(procs)
        if valkey is not None:
            valkey.stop()
        if postgres is not None:
            postgres.stop()
        if args.keep_temp:
            say(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    try:
        say(f"starting embedded Valkey and PostgreSQL in {tmp} ...")
        valkey = EmbeddedValkey(tmp / "valkey").start()
        admin_db = None
        if any(c.workers for c in args.config_list):
            postgres = EmbeddedPostgres(tmp / "postgres").start()
            admin_db = postgres.url
        STOP.force = stop_everything
        asyncio.run(run_all(args, valkey.url, admin_db, tmp, deadline, report, procs, logs))
    except (KeyboardInterrupt, Interrupted) as exc:
        failed = KeyboardInterrupt(str(exc))
        say("\ninterrupted: stopping processes and servers ...")
    except Exception as exc:  # report, clean up, exit non-zero
        failed = exc
        say(f"\nerror: {exc!r}; stopping processes and servers ...")
    finally:
        STOP.force = None
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup is bounded; finish it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stop_everything()
        finally:
            signal.signal(signal.SIGINT, previous)
    report.pop("cleaned_up", None)
    report["verdicts"] = verdicts(report)
    report["load_avg_at_end"] = load_avg()
    report["total_s"] = round(time.monotonic() - started, 1)
    if failed is not None:
        report["failed"] = repr(failed)
    if report["configs"]:
        say(render(report))
    say(f"total {report['total_s']:.0f} s")
    if not args.no_write and failed is None:
        path = write_json(report, args.output_dir, "hit-path")
        say(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
            "and hit-path-latest.json")
    if failed is not None:
        return 130 if isinstance(failed, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
