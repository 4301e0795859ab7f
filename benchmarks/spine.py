"""End-to-end benchmark of the stream-processing spine: real worker processes on a real Valkey.

    .venv/bin/python benchmarks/spine.py            # the default run (under 3 minutes)
    .venv/bin/python benchmarks/spine.py --quick    # a smoke run (about a minute)

Phases (see benchmarks/README.md):
  miss        M distinct real prompts, all at once: generation latency (procedural generator)
  exact       the same prompts retyped, open loop at --rate for --duration: exact-hit latency
  mixed       the same rate, --miss-share of them new prompts: do slow misses delay hits?
  throughput  K exact hits published at once: results per second end to end

The latency of a result is its `latency_ms` field: from the time in the request entry's id to
the worker publishing the result. The client also records its own end-to-end time (from the
scheduled send time to reading the result), which includes its XREAD and any send lag.

Everything runs on loopback; the Valkey server, the workers and the temp dir are removed at the
end, also on Ctrl-C, SIGTERM or an error. Every wait has a deadline, and the whole run is bounded
by --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from benchmarks.harness import (  # noqa: E402  (process, server and collector code)
    RESULTS_DIR, STOP, Interrupted, ResultReader, _sigterm, check_loopback, cleanup, git_state,
    install_signal_handlers, machine, percentiles, remove_signal_handlers, say, service_env,
    start_workers, wait_for_workers, write_json)
from ops.demo import load_prompts, retype  # noqa: E402
from ops.embedded_servers import EmbeddedValkey  # noqa: E402
from promptcache.config import Settings  # noqa: E402
from promptcache.keys import REQUESTS_GROUP, Keys  # noqa: E402
from promptcache.prompts import canonical_prompt  # noqa: E402
from schemas.events import Request  # noqa: E402

SHUTDOWN_RESERVE_S = 15.0  # kept back from --max-seconds for stopping workers and Valkey

DEFAULTS = {"prompts": 40, "duration": 20.0, "throughput_requests": 5000}
QUICK = {"prompts": 10, "duration": 5.0, "throughput_requests": 1000}


# --- arguments --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark promptcache workers end to end on a real (embedded) Valkey.")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--prompts", type=int, default=None,
                   help="distinct prompts warmed in the miss phase (default 40; --quick 10)")
    p.add_argument("--rate", type=float, default=100.0,
                   help="open-loop request rate of the exact and mixed phases, per second "
                        "(default 100)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of the exact and mixed phases (default 20; --quick 5)")
    p.add_argument("--miss-share", type=float, default=0.10,
                   help="share of new prompts in the mixed phase (default 0.10)")
    p.add_argument("--throughput-requests", type=int, default=None, metavar="K",
                   help="hits published at once in the throughput phase (default 5000; "
                        "--quick 1000)")
    p.add_argument("--generator-latency-ms", type=int, default=2000,
                   help="simulated generation time of the procedural generator (default 2000)")
    p.add_argument("--generation-concurrency", type=int, default=None,
                   help="PROMPTCACHE_GENERATION_CONCURRENCY for the workers "
                        "(default: the service's default)")
    p.add_argument("--redis-url", default=None,
                   help="use this (loopback) Redis/Valkey instead of an embedded one; a fresh "
                        "key prefix is used and its keys are deleted at the end")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10 prompts, 5 s phases, 1000 throughput requests")
    p.add_argument("--seed", type=int, default=1, help="prompt sampling and retyping seed")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="upper bound on the whole run (default 95 + 4 x duration: 175 s, "
                        "--quick 115 s); waits are cut short and phases skipped to keep it")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                   help=f"where the JSON goes (default {RESULTS_DIR.relative_to(REPO)})")
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    p.add_argument("--keep-temp", action="store_true",
                   help="keep the temp dir (worker logs, Valkey data) for inspection")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_seconds is None:
        args.max_seconds = 95 + 4 * args.duration
    if args.workers < 1 or args.prompts < 1 or args.rate <= 0 or args.duration <= 0 \
            or args.throughput_requests < 1 or not 0 <= args.miss_share < 1:
        p.error("--workers, --prompts, --rate, --duration and --throughput-requests must be "
                "positive and --miss-share in [0, 1)")
    if args.redis_url:
        check_loopback(p, args.redis_url)
    return args


# --- results collection -----------------------------------------------------------------------

@dataclass
class Sent:
    phase: str
    kind: str  # "miss" or "hit"
    scheduled: float  # monotonic
    sent: float = 0.0  # monotonic
    message_id: str = ""


@dataclass
class Got:
    status: str
    cache: str | None
    latency_ms: float | None
    received: float  # monotonic
    error: str | None = None


class Collector(ResultReader):
    """The results stream from a cursor onwards (one XREAD loop for the whole run), per request
    id and per phase (ids are `<run tag>.<phase>.<i>`)."""

    def __init__(self, url: str, stream: str) -> None:
        super().__init__(url, stream)
        self.got: dict[str, Got] = {}
        self.per_phase: collections.Counter[str] = collections.Counter()
        self.unknown = 0

    def take(self, data: dict[str, Any], now: float) -> None:
        rid = data.get("request_id", "")
        err = data.get("error")
        self.got[rid] = Got(status=data.get("status", "?"), cache=data.get("cache"),
                            latency_ms=data.get("latency_ms"), received=now,
                            error=err.get("code") if isinstance(err, dict) else None)
        parts = rid.split(".")
        if len(parts) == 3:
            self.per_phase[parts[1]] += 1
        else:
            self.unknown += 1


# --- the run ----------------------------------------------------------------------------------

@dataclass
class Bench:
    args: argparse.Namespace
    url: str
    keys: Keys
    run_tag: str
    deadline: float  # monotonic: the global bound minus the shutdown reserve
    collector: Collector
    client: aioredis.Redis
    sent: dict[str, Sent] = field(default_factory=dict)
    sent_per_phase: collections.Counter[str] = field(default_factory=collections.Counter)
    notes: list[str] = field(default_factory=list)

    def rid(self, phase: str, i: int) -> str:
        return f"{self.run_tag}.{phase}.{i}"

    def until(self, seconds: float) -> float:
        return min(time.monotonic() + seconds, self.deadline)

    async def publish(self, requests: list[tuple[Request, Sent]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for request, _ in requests:
                pipe.xadd(self.keys.requests, {"data": request.model_dump_json(exclude_none=True)})
            ids = await pipe.execute()
        now = time.monotonic()
        for (request, record), mid in zip(requests, ids, strict=True):
            record.sent = now
            record.message_id = mid.decode()
            self.sent[request.request_id] = record
            self.sent_per_phase[record.phase] += 1

    async def ticker(self, phase: str, total: int, started: float) -> None:
        while True:
            await asyncio.sleep(1.0)
            say(f"  [{phase:<10}] {time.monotonic() - started:6.1f} s   "
                f"sent {self.sent_per_phase[phase]:>6}/{total:<6}"
                f"   answered {self.collector.per_phase[phase]:>6}")

    async def with_ticker(self, phase: str, total: int, coro: Any) -> Any:
        started = time.monotonic()
        tick = asyncio.create_task(self.ticker(phase, total, started))
        try:
            return await coro
        finally:
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)

    # open-loop sending ------------------------------------------------------------------------

    async def open_loop(self, phase: str, requests: list[tuple[Request, str]],
                        rate: float) -> float:
        """Send request i at t0 + i/rate whatever the answers do; late sends go out together.
        Returns t0."""
        t0 = time.monotonic() + 0.05
        i = 0
        n = len(requests)
        while i < n:
            STOP.check()
            if time.monotonic() > self.deadline:
                self.notes.append(f"{phase}: stopped sending at {i}/{n} (time budget)")
                break
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            if due > i:
                batch = [(req, Sent(phase, kind, scheduled=t0 + j / rate))
                         for j, (req, kind) in enumerate(requests[i:due], start=i)]
                await self.publish(batch)
                i = due
            if i < n:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        return t0

    # phase reports ----------------------------------------------------------------------------

    def summarise(self, phase: str, kind: str | None = None) -> dict[str, Any]:
        ids = [rid for rid, s in self.sent.items()
               if s.phase == phase and (kind is None or s.kind == kind)]
        got = [(self.sent[rid], self.collector.got[rid]) for rid in ids if rid in self.collector.got]
        outcomes = collections.Counter(
            (g.cache if g.status == "ok" and g.cache else g.status) for _, g in got)
        errors = collections.Counter(g.error for _, g in got if g.error)
        latency = [g.latency_ms for _, g in got if g.latency_ms is not None]
        e2e = [(g.received - s.scheduled) * 1000 for s, g in got]
        lag = [(s.sent - s.scheduled) * 1000 for s in (self.sent[rid] for rid in ids)]
        sends = sorted(self.sent[rid].sent for rid in ids)
        # server-side publish times: the entry id's ms + latency_ms
        published = sorted(int(s.message_id.split("-")[0]) + g.latency_ms
                           for s, g in got if g.latency_ms is not None)
        out: dict[str, Any] = {
            "requests": len(ids),
            "answered": len(got),
            "share_answered": round(len(got) / len(ids), 4) if ids else None,
            "outcomes": dict(outcomes),
            "exact": outcomes.get("exact", 0),
            "errors": dict(errors),
            "latency_ms": percentiles(latency),
            "client_e2e_ms": percentiles(e2e),
            "send_lag_ms": percentiles(lag),
        }
        if len(sends) > 1 and sends[-1] > sends[0]:
            out["achieved_send_rate"] = round((len(sends) - 1) / (sends[-1] - sends[0]), 2)
        if len(published) > 1 and published[-1] > published[0]:
            out["answered_rate"] = round((len(published) - 1) * 1000
                                         / (published[-1] - published[0]), 2)
        return out


def pick_prompts(args: argparse.Namespace) -> tuple[list[str], list[str], int]:
    """Warm prompts (whose retyped forms canonicalise to the same key) and a pool of fresh ones.

    demo.retype() upper-cases or capitalizes the whole prompt; text inside quotes keeps its case
    in the canonical form, so such prompts would not be exact hits when retyped: they are left
    out of the warm set (the count is reported)."""
    rng = random.Random(args.seed)
    prompts = load_prompts()
    rng.shuffle(prompts)
    seen: set[str] = set()
    warm: list[str] = []
    fresh: list[str] = []
    excluded = 0

    class _Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    for prompt in prompts:
        canonical = canonical_prompt(prompt)
        if not canonical or canonical in seen:
            continue
        seen.add(canonical)
        if len(warm) < args.prompts:
            if all(canonical_prompt(retype(prompt, _Fixed(v))) == canonical for v in (0.0, 0.9)):
                warm.append(prompt)
            else:
                excluded += 1
                fresh.append(prompt)
        else:
            fresh.append(prompt)
    if len(warm) < args.prompts:
        raise RuntimeError(f"only {len(warm)} usable prompts, {args.prompts} asked for")
    return warm, fresh, excluded


async def run(args: argparse.Namespace, url: str, prefix: str, deadline: float,
              report: dict[str, Any]) -> None:
    keys = Keys(prefix)
    warm, fresh, excluded = pick_prompts(args)
    report["prompts"] = {"source_total": len(load_prompts()), "warm": len(warm),
                         "excluded_quoted_case": excluded}
    rng = random.Random(args.seed + 1)
    collector = Collector(url, keys.results)
    client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    bench = Bench(args, url, keys, run_tag=f"b{uuid.uuid4().hex[:8]}", deadline=deadline,
                  collector=collector, client=client)
    collector.start()
    phases: dict[str, Any] = {}
    report["phases"] = phases
    report["notes"] = bench.notes
    gen_s = args.generator_latency_ms / 1000
    concurrency = args.generation_concurrency or Settings.model_fields[
        "generation_concurrency"].default
    try:
        # 1. miss --------------------------------------------------------------------------
        say(f"\n== miss: {len(warm)} distinct prompts at once ==")
        now = time.monotonic()
        batch = [(Request(request_id=bench.rid("miss", i), prompt=p),
                  Sent("miss", "miss", scheduled=now)) for i, p in enumerate(warm)]
        ids = [r.request_id for r, _ in batch]
        # worst case: one worker took them all (it reads batches of up to 32)
        wait_s = 30 + gen_s * -(-len(warm) // concurrency)
        await bench.with_ticker("miss", len(ids), _send_and_wait(bench, batch, ids, wait_s))
        phases["miss"] = bench.summarise("miss")
        complete = phases["miss"]["answered"] == len(ids)
        if not complete:
            bench.notes.append("miss: not every warm prompt was answered; hit phases may miss")

        # 2. exact hits at the target rate ---------------------------------------------------
        n = max(1, int(args.rate * args.duration))
        say(f"\n== exact: {n} retyped prompts, open loop at {args.rate:g}/s "
            f"for {args.duration:g} s ==")
        requests = [(Request(request_id=bench.rid("exact", i),
                             prompt=retype(warm[i % len(warm)], rng)), "hit") for i in range(n)]
        await bench.with_ticker("exact", n, _open_loop_and_wait(
            bench, "exact", requests, args.rate, hit_wait=15.0, miss_wait=0.0))
        phases["exact"] = bench.summarise("exact")

        # 3. mixed ---------------------------------------------------------------------------
        n_miss = sum(1 for i in range(n) if _is_miss(i, args.miss_share))
        say(f"\n== mixed: {n} requests at {args.rate:g}/s for {args.duration:g} s, "
            f"{n_miss} of them new prompts ({args.miss_share:.0%}) ==")
        capacity = args.workers * concurrency / gen_s if gen_s else float("inf")
        offered = args.rate * args.miss_share
        if offered > capacity:
            bench.notes.append(
                f"mixed: {offered:g} misses/s offered > generation capacity {capacity:g}/s "
                f"({args.workers} workers x {concurrency} slots / {gen_s:g} s): misses queue "
                "and their latency grows through the phase")
        pool = iter(fresh)
        requests = []
        made_up = 0
        for i in range(n):
            if _is_miss(i, args.miss_share):
                prompt = next(pool, None)
                if prompt is None:
                    made_up += 1
                    prompt = f"{warm[made_up % len(warm)]}, study number {made_up}"
                requests.append((Request(request_id=bench.rid("mixed", i), prompt=prompt),
                                 "miss"))
            else:
                requests.append((Request(request_id=bench.rid("mixed", i),
                                         prompt=retype(warm[i % len(warm)], rng)), "hit"))
        if made_up:
            bench.notes.append(f"mixed: {made_up} miss prompts were made-up variants "
                               "(not enough distinct real prompts)")
        drain = 1.5 * n_miss * gen_s / (args.workers * concurrency) + 20
        await bench.with_ticker("mixed", n, _open_loop_and_wait(
            bench, "mixed", requests, args.rate, hit_wait=15.0, miss_wait=drain))
        phases["mixed"] = {"hit": bench.summarise("mixed", "hit"),
                           "miss": bench.summarise("mixed", "miss"),
                           "offered_miss_rate": offered,
                           "generation_capacity_per_s": round(capacity, 3)}

        # 4. throughput ----------------------------------------------------------------------
        k = args.throughput_requests
        if time.monotonic() + 10 > deadline:
            bench.notes.append("throughput: skipped (time budget)")
        else:
            say(f"\n== throughput: {k} hits published at once ==")
            phases["throughput"] = await bench.with_ticker(
                "throughput", k, _throughput(bench, warm, rng, k))
    finally:
        await collector.stop()
        # what the service says about itself, before the workers stop
        try:
            if STOP.reason is None:
                report["service"] = await _service_state(client, keys, collector)
        finally:
            await client.aclose()


async def run_all(args: argparse.Namespace, url: str, prefix: str, procs: list[Any],
                  logs: list[Path], started: float, deadline: float,
                  report: dict[str, Any]) -> None:
    install_signal_handlers()
    try:
        await wait_for_workers(url, Keys(prefix), procs, logs)
        report["startup_s"] = round(time.monotonic() - started, 2)
        say(f"ready after {report['startup_s']:.1f} s")
        await run(args, url, prefix, deadline, report)
    finally:
        remove_signal_handlers()


def _is_miss(i: int, share: float) -> bool:
    """Exactly `share` of the requests, spread evenly."""
    return int((i + 1) * share) > int(i * share)


async def _send_and_wait(bench: Bench, batch: list[tuple[Request, Sent]], ids: list[str],
                         wait_s: float) -> None:
    await bench.publish(batch)
    if not await bench.collector.wait(ids, bench.until(wait_s)):
        bench.notes.append(f"{batch[0][1].phase}: {len(ids) - bench.collector.answered(ids)} "
                           f"unanswered after {wait_s:.0f} s")


async def _open_loop_and_wait(bench: Bench, phase: str, requests: list[tuple[Request, str]],
                              rate: float, *, hit_wait: float, miss_wait: float) -> None:
    await bench.open_loop(phase, requests, rate)
    hits = [r.request_id for r, kind in requests if kind == "hit" and r.request_id in bench.sent]
    misses = [r.request_id for r, kind in requests if kind == "miss" and r.request_id in bench.sent]
    end = time.monotonic()
    if not await bench.collector.wait(hits, min(end + hit_wait, bench.deadline)):
        bench.notes.append(f"{phase}: {len(hits) - bench.collector.answered(hits)} hits "
                           f"unanswered {hit_wait:.0f} s after the last send")
    if misses:
        say(f"  [{phase:<10}] sending done; waiting up to {miss_wait:.0f} s for "
            f"{len(misses) - bench.collector.answered(misses)} outstanding misses")
        if not await bench.collector.wait(misses, min(end + miss_wait, bench.deadline)):
            bench.notes.append(f"{phase}: {len(misses) - bench.collector.answered(misses)} misses "
                               f"unanswered {miss_wait:.0f} s after the last send")


async def _throughput(bench: Bench, warm: list[str], rng: random.Random,
                      k: int) -> dict[str, Any]:
    requests = [Request(request_id=bench.rid("throughput", i),
                        prompt=retype(warm[i % len(warm)], rng)) for i in range(k)]
    start = time.monotonic()
    for offset in range(0, k, 1000):
        chunk = requests[offset:offset + 1000]
        await bench.publish([(r, Sent("throughput", "hit", scheduled=start)) for r in chunk])
    published = time.monotonic()
    ids = [r.request_id for r in requests]
    wait_s = 20 + k / 100  # a healthy 2-worker service needs ~k/400 s
    done = await bench.collector.wait(ids, bench.until(wait_s))
    if not done:
        bench.notes.append(f"throughput: {k - bench.collector.answered(ids)} unanswered after "
                           f"{time.monotonic() - start:.0f} s")
    summary = bench.summarise("throughput")
    received = [bench.collector.got[rid].received for rid in ids if rid in bench.collector.got]
    if received:
        wall = max(received) - start
        summary["publish_s"] = round(published - start, 3)
        summary["wall_s"] = round(wall, 3)
        summary["results_per_s"] = round(len(received) / wall, 1) if wall > 0 else None
        # the answers before the first pause of >= 2 s: what the workers sustain when nothing
        # stalls (requests left pending by a worker come back only after claim_idle)
        received.sort()
        first = next((i for i in range(1, len(received))
                      if received[i] - received[i - 1] >= 2.0), len(received))
        first_wall = received[first - 1] - start
        summary["first_pass"] = {
            "answered": first, "wall_s": round(first_wall, 3),
            "results_per_s": round(first / first_wall, 1) if first_wall > 0 else None,
            "stalled": len(received) - first + (k - len(received)),
            "pause_s": round(received[first] - received[first - 1], 1)
            if first < len(received) else None}
    return summary


async def _service_state(client: aioredis.Redis, keys: Keys,
                         collector: Collector) -> dict[str, Any]:
    state: dict[str, Any] = {"duplicate_results": collector.duplicates,
                             "results_for_unknown_ids": collector.unknown}
    try:
        pending = await client.xpending(keys.requests, REQUESTS_GROUP)
        state["pending_requests"] = int(pending["pending"])
        state["dead_letters"] = int(await client.xlen(keys.dead_letter))
        state["requests_stream_len"] = int(await client.xlen(keys.requests))
        state["results_stream_len"] = int(await client.xlen(keys.results))
        info = await client.info("server")
        state["server_version"] = info.get("valkey_version") or info.get("redis_version")
        memory = await client.info("memory")
        state["used_memory_mb"] = round(int(memory["used_memory"]) / 1e6, 1)
    except redis.RedisError as exc:
        state["error"] = repr(exc)
    return state


# --- processes --------------------------------------------------------------------------------

def worker_env(args: argparse.Namespace, url: str, prefix: str, data_dir: Path) -> dict[str, str]:
    """No DATABASE_URL (persister off), the cache in the same Valkey, the procedural generator."""
    env = service_env(url, prefix, data_dir, PROMPTCACHE_GENERATOR="procedural",
                      PROMPTCACHE_GENERATOR_LATENCY_MS=str(args.generator_latency_ms))
    if args.generation_concurrency:
        env["PROMPTCACHE_GENERATION_CONCURRENCY"] = str(args.generation_concurrency)
    return env


# --- output -----------------------------------------------------------------------------------

def _f(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["parameters"]
    lines = [
        "",
        f"promptcache spine benchmark  {report['started_at']}",
        f"  machine: {m['nproc']} CPUs, Python {m['python']}, {m.get('cpu_model', '?')}",
        f"  {p['workers']} workers, generator {p['generator_latency_ms']} ms "
        f"(x{p['generation_concurrency']} per worker), rate {p['rate']:g}/s, "
        f"phases {p['duration_s']:g} s, {p['prompts']} prompts, "
        f"throughput {p['throughput_requests']}, redis {p['redis']}",
        "",
        "latency_ms = request entry id time -> result published (the result's own field)",
        f"{'phase':<12}{'kind':<6}{'sent':>7}{'answered':>10}{'share':>8}{'rate/s':>9}"
        f"{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}  outcomes",
        "-" * 118,
    ]
    phases = report.get("phases", {})
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for name in ("miss", "exact", "mixed", "throughput"):
        if name not in phases:
            continue
        if name == "mixed":
            rows += [("mixed", "hit", phases[name]["hit"]), ("mixed", "miss", phases[name]["miss"])]
        else:
            rows.append((name, "miss" if name == "miss" else "hit", phases[name]))
    for name, kind, s in rows:
        lat = s.get("latency_ms") or {}
        share = f"{s['share_answered']:.1%}" if s.get("share_answered") is not None else "-"
        rate = s.get("results_per_s") if name == "throughput" else s.get("achieved_send_rate")
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(s.get("outcomes", {}).items()))
        lines.append(f"{name:<12}{kind:<6}{s['requests']:>7}{s['answered']:>10}{share:>8}"
                     f"{_f(rate):>9}{_f(lat.get('p50')):>10}{_f(lat.get('p90')):>10}"
                     f"{_f(lat.get('p99')):>10}{_f(lat.get('max')):>10}  {outcomes}")
    lines.append("-" * 118)
    lines.append("rate/s: achieved send rate (open-loop phases); results/s end to end (throughput)")
    if "exact" in phases and "mixed" in phases:
        e, h = phases["exact"].get("latency_ms"), phases["mixed"]["hit"].get("latency_ms")
        if e and h:
            lines.append(f"hits under misses: mixed-hit p50/p99 {h['p50']:.1f}/{h['p99']:.1f} ms vs "
                         f"exact-only {e['p50']:.1f}/{e['p99']:.1f} ms")
    for name in ("exact", "mixed"):
        if name in phases:
            s = phases[name] if name == "exact" else phases[name]["hit"]
            e2e, lag = s.get("client_e2e_ms") or {}, s.get("send_lag_ms") or {}
            lines.append(f"{name} hits, client-side: scheduled send -> result read p50 "
                         f"{_f(e2e.get('p50'))} p99 {_f(e2e.get('p99'))} max {_f(e2e.get('max'))} "
                         f"ms; send lag p99 {_f(lag.get('p99'))} max {_f(lag.get('max'))} ms; "
                         f"answered {_f(s.get('answered_rate'))}/s")
    if "throughput" in phases:
        t = phases["throughput"]
        lines.append(f"throughput: {t['answered']}/{t['requests']} answered in "
                     f"{_f(t.get('wall_s'), '{:.2f}')} s (publishing took "
                     f"{_f(t.get('publish_s'), '{:.2f}')} s) = {_f(t.get('results_per_s'))} "
                     f"results/s; server-side publish rate {_f(t.get('answered_rate'))}/s")
        fp = t.get("first_pass")
        if fp and fp["stalled"]:
            lines.append(f"  first pass (before the first pause of >= 2 s): {fp['answered']} in "
                         f"{fp['wall_s']:.2f} s = {_f(fp['results_per_s'])} results/s; "
                         f"{fp['stalled']} stalled"
                         + (f" (the rest came {fp['pause_s']:.0f} s later)"
                            if fp["pause_s"] else ""))
    svc = report.get("service", {})
    if svc:
        lines.append(f"service: pending {svc.get('pending_requests', '?')}, dead letters "
                     f"{svc.get('dead_letters', '?')}, duplicate results "
                     f"{svc.get('duplicate_results', '?')}, {svc.get('server_version', '')} "
                     f"used memory {svc.get('used_memory_mb', '?')} MB")
    for w in report.get("workers", {}).get("health", []):
        counts = {k: v for k, v in w.items() if k not in ("consumer", "at", "in_flight")}
        lines.append(f"worker {w.get('consumer')}: " + " ".join(
            f"{k}={v}" for k, v in sorted(counts.items())))
    logs = report.get("workers", {}).get("logs", {})
    if logs:
        lines.append("worker stderr (level:event counts): " + (", ".join(
            f"{k}={v}" for k, v in sorted(logs["events"].items())) or "nothing")
            + (f", {logs['unparsed_lines']} non-JSON lines" if logs["unparsed_lines"] else ""))
        for site, count in list(logs.get("exceptions", {}).items())[:5]:
            lines.append(f"  {count} x {site}")
        if not logs.get("exceptions"):
            for sample in logs["samples"][:5]:
                lines.append(f"  {sample[:200]}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    hard_deadline = started + args.max_seconds
    signal.signal(signal.SIGTERM, _sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="promptcache-bench-"))
    prefix = f"bench{uuid.uuid4().hex[:10]}"
    concurrency = args.generation_concurrency or Settings.model_fields[
        "generation_concurrency"].default
    report: dict[str, Any] = {
        "benchmark": "spine",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "parameters": {
            "workers": args.workers, "prompts": args.prompts, "rate": args.rate,
            "duration_s": args.duration, "miss_share": args.miss_share,
            "throughput_requests": args.throughput_requests,
            "generator_latency_ms": args.generator_latency_ms,
            "generation_concurrency": concurrency, "quick": args.quick, "seed": args.seed,
            "max_seconds": args.max_seconds, "prefix": prefix,
            "redis": "external" if args.redis_url else "embedded valkey",
        },
    }
    valkey: EmbeddedValkey | None = None
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    url = args.redis_url
    failed: BaseException | None = None
    try:
        if url is None:
            say(f"starting embedded Valkey in {tmp / 'valkey'} ...")
            valkey = EmbeddedValkey(tmp / "valkey").start()
            url = valkey.url
        env = worker_env(args, url, prefix, tmp)
        say(f"starting {args.workers} workers (prefix {prefix}, generator "
            f"{args.generator_latency_ms} ms) ...")
        procs, logs = start_workers(args.workers, env, tmp)

        def force() -> None:  # from the event loop, when the run is stuck after a signal
            cleanup(args, report, procs, logs, valkey, url, prefix, tmp)
        STOP.force = force
        asyncio.run(run_all(args, url, prefix, procs, logs, started,
                            hard_deadline - SHUTDOWN_RESERVE_S, report))
    except (KeyboardInterrupt, Interrupted) as exc:
        failed = KeyboardInterrupt(str(exc))
        say("\ninterrupted: stopping workers and Valkey ...")
    except Exception as exc:  # report, clean up, exit non-zero
        failed = exc
        say(f"\nerror: {exc!r}; stopping workers and Valkey ...")
    finally:
        STOP.force = None
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup is bounded; finish it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cleanup(args, report, procs, logs, valkey, url, prefix, tmp)
        finally:
            signal.signal(signal.SIGINT, previous)
    report.pop("cleaned_up", None)
    report["total_s"] = round(time.monotonic() - started, 2)
    if failed is not None:
        report["failed"] = repr(failed)
        if "phases" not in report:
            return 130 if isinstance(failed, KeyboardInterrupt) else 1
    say(render(report))
    say(f"total {report['total_s']:.1f} s")
    if not args.no_write and failed is None:
        path = write_json(report, args.output_dir, "spine")
        say(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
            f"and spine-latest.json")
    if failed is not None:
        return 130 if isinstance(failed, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
