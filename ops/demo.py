"""The demo run by `promptcache up --demo N`: real prompts sent twice, a table of what happened.

Round 1 sends N distinct prompts (generated: `miss`); round 2 sends the same prompts as a user
might retype them (other case, extra spaces, a trailing full stop), which the exact tier answers;
round 3 (with the semantic tier on) asks for the same pictures in other words ("please draw ...",
"... , please"), which the semantic tier answers once the verifier agrees.
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import statistics
import uuid
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis

from promptcache.client import collect_many, last_ids, publish, results_streams
from promptcache.keys import Keys
from schemas.events import Request, Result

_PACKAGED = Path(__file__).with_name("sample_prompts.txt")


def shared_prompts_dir() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base.parent / "shared" / "data" / "prompts"
        if candidate.is_dir():
            return candidate
    return None


def load_prompts(directory: Path | None = None) -> list[str]:
    """Real prompts: PartiPrompts and DiffusionDB's ImageReward sets, else the packaged sample."""
    directory = directory or shared_prompts_dir()
    prompts: list[str] = []
    if directory is not None:
        parti = directory / "PartiPrompts.tsv"
        if parti.exists():
            with parti.open(newline="") as fh:
                prompts += [row["Prompt"] for row in csv.DictReader(fh, delimiter="\t")]
        bench = directory / "imagereward_benchmark-prompts.json"
        if bench.exists():
            prompts += [item["prompt"] for item in json.loads(bench.read_text())]
    if not prompts:
        prompts = [line for line in _PACKAGED.read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    return [p.strip() for p in prompts if 3 <= len(p.split()) <= 40 and p.strip()]


def retype(prompt: str, rng: random.Random) -> str:
    """What a person typing the same prompt again might send. Text in quotes keeps its case
    (it is drawn in the picture, so the cache key keeps it too)."""
    if '"' in prompt or "'" in prompt:
        variant = prompt
    else:
        variant = prompt.upper() if rng.random() < 0.3 else prompt.capitalize()
    return "  " + variant.replace(" ", "  ", 1).rstrip(".") + ". "


def reword(prompt: str, rng: random.Random) -> str:
    """The same picture asked for in other words: request phrasing the semantic tier's verifier
    knows is harmless."""
    body = prompt.strip().rstrip(".")
    body = body[0].lower() + body[1:] if body[:1].isupper() and body[1:2].islower() else body
    return rng.choice([f"please draw {body}", f"{body}, please", f"an image of {body}",
                       f"can you make {body}"])


async def semantic_ready(redis: aioredis.Redis, keys: Keys, timeout: float = 180.0) -> bool:
    """True once a worker reports its semantic index (its model is loaded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        async for _ in redis.scan_iter(match=keys.semantic_index_stats("*"), count=100):
            return True
        await asyncio.sleep(0.5)
    return False


async def run_demo(redis: aioredis.Redis, keys: Keys, count: int, *, timeout: float = 300.0,
                   seed: int | None = None, semantic: bool = False,
                   say: Callable[[str], None] = print) -> list[tuple[int, Request, Result | None]]:
    rng = random.Random(seed)
    prompts = rng.sample(load_prompts(), count)
    run = uuid.uuid4().hex[:6]
    rounds = [
        [Request(request_id=f"demo-{run}-{i}-a", prompt=p) for i, p in enumerate(prompts)],
        [Request(request_id=f"demo-{run}-{i}-b", prompt=retype(p, rng))
         for i, p in enumerate(prompts)],
    ]
    if semantic:
        rounds.append([Request(request_id=f"demo-{run}-{i}-c", prompt=reword(p, rng))
                       for i, p in enumerate(prompts)])
    rows: list[tuple[int, Request, Result | None]] = []
    for number, requests in enumerate(rounds, start=1):
        if number == 3 and not await semantic_ready(redis, keys):
            say("demo: the semantic tier is not ready (model still loading?): round 3 skipped")
            break
        after = await last_ids(redis, results_streams(keys))
        await publish(redis, keys, requests)
        results = await collect_many(redis, after, [r.request_id for r in requests],
                                timeout)
        rows += [(number, r, results.get(r.request_id)) for r in requests]
    return rows


def render_table(rows: list[tuple[int, Request, Result | None]]) -> str:
    lines = [f"{'round':<6}{'cache':<15}{'latency':>10}  {'prompt':<52}image",
             "-" * 115]
    for number, request, result in rows:
        prompt = request.prompt.strip()
        prompt = prompt if len(prompt) <= 50 else prompt[:47] + "..."
        if result is None:
            lines.append(f"{number:<6}{'(none)':<15}{'-':>10}  {prompt:<52}no result in time")
            continue
        cache = result.cache or result.status
        if result.similarity is not None:
            cache = f"{cache} {result.similarity:.2f}"
        latency = f"{result.latency_ms:.0f} ms" if result.latency_ms is not None else "-"
        lines.append(f"{number:<6}{cache:<15}{latency:>10}  {prompt:<52}{result.image_url or ''}")
    lines.append("-" * 115)
    for tier in ("miss", "exact", "semantic"):
        latencies = [r.latency_ms for _, _, r in rows
                     if r is not None and r.cache == tier and r.latency_ms is not None]
        if latencies:
            lines.append(f"{tier:<6} n={len(latencies):<4} median {statistics.median(latencies):.1f}"
                         f" ms   max {max(latencies):.1f} ms")
    return "\n".join(lines)
