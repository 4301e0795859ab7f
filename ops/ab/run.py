"""Run a prompt set raw and optimised through one generator, score every image, pair them up.

The generator is called directly (no streams, no cache), at most `concurrency` images at once;
scoring runs on one thread of its own so it never takes more than one core. Both arms of a prompt
use the same params and seed: only the prompt differs. A prompt the content policy refuses is
counted and generated in neither arm (the service never sends it to a generator); an image the
generator fails to make is counted, and its prompt leaves the paired comparison.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import structlog
from PIL import Image

from ops.ab.scores import Scorer
from ops.ab.stats import CiMethod, Interval, paired_interval
from promptcache.errors import GenerationFailed
from promptcache.generators.base import GenerationRequest, Generator
from promptcache.optimizer import PolicySettings, Refused, optimize
from promptcache.prompts import NormalizedParams

log = structlog.get_logger(__name__)

Arm = Literal["raw", "optimised"]
ARMS: tuple[Arm, Arm] = ("raw", "optimised")
# verbatim: the user's text as typed; plain: the service with options.optimize off
# (standardised and fitted to the window, no enhancers or default negatives).
Baseline = Literal["verbatim", "plain"]
Progress = Callable[[int, int], None]


@dataclass
class Item:
    index: int
    prompt: str                       # the user's prompt (CLIP compares both images with it)
    sent: dict[Arm, str]              # what each arm sent the generator
    negative: dict[Arm, str | None]
    seed: int | None
    scores: dict[str, dict[Arm, float | None]] = field(default_factory=dict)
    errors: dict[Arm, str] = field(default_factory=dict)
    seconds: dict[Arm, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    prompt: str
    code: str
    category: str | None


@dataclass(frozen=True)
class MetricSummary:
    name: str
    label: str
    better: str
    raw_mean: float
    optimised_mean: float
    interval: Interval
    unscored: int  # pairs left out because one of the two images had no score


@dataclass
class Report:
    generator: str
    model: str
    params: NormalizedParams
    baseline: Baseline
    prompts: int
    items: list[Item]
    refused: list[Refusal]
    metrics: list[MetricSummary]
    notes: list[str]
    seconds: float

    @property
    def failed(self) -> list[Item]:
        return [item for item in self.items if item.errors]


def _arms(prompt: str, index: int, seed: int | None, baseline: Baseline,
          policy: PolicySettings, truncates: bool) -> Item:
    optimised = optimize(prompt, None, enabled=True, policy=policy, truncates=truncates)
    raw = prompt if baseline == "verbatim" else optimize(
        prompt, None, enabled=False, policy=policy, truncates=truncates).prompt_used
    return Item(index=index, prompt=prompt, sent={"raw": raw, "optimised": optimised.prompt_used},
                negative={"raw": None, "optimised": optimised.negative_used}, seed=seed)


async def run_ab(generator: Generator, prompts: Sequence[str], scorers: Sequence[Scorer], *,
                 params: NormalizedParams, policy: PolicySettings, baseline: Baseline = "verbatim",
                 concurrency: int = 4, seed: int = 0, ci: CiMethod = "t",
                 progress: Progress | None = None, save_dir: Path | None = None,
                 notes: Sequence[str] = ()) -> Report:
    started = time.monotonic()
    rng = random.Random(seed)
    items: list[Item] = []
    refused: list[Refusal] = []
    for index, prompt in enumerate(prompts):
        # one image seed per prompt, shared by its two arms (unless params fix one for all)
        image_seed = params.seed if params.seed is not None else rng.randrange(2**31)
        try:
            items.append(_arms(prompt, index, image_seed, baseline, policy,
                               generator.truncates_prompt))
        except Refused as exc:
            refused.append(Refusal(prompt, exc.code, exc.category))
            log.info("ab_prompt_refused", index=index, code=exc.code, category=exc.category)

    total = 2 * len(items)
    done = 0
    slots = asyncio.Semaphore(max(1, concurrency))
    scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ab-score")
    loop = asyncio.get_running_loop()

    def score(item: Item, arm: Arm, data: bytes) -> None:
        image = Image.open(io.BytesIO(data))
        image.load()
        if save_dir is not None:
            image.save(save_dir / f"{item.index:04d}-{arm}.png")
        for scorer in scorers:
            item.scores.setdefault(scorer.name, {})[arm] = scorer.score(image, item.prompt)

    async def one(item: Item, arm: Arm) -> None:
        nonlocal done
        request = GenerationRequest(
            prompt=item.sent[arm], negative_prompt=item.negative[arm],
            params=replace(params, seed=item.seed))
        try:
            async with slots:
                t0 = time.monotonic()
                image = await generator.generate(request)
                item.seconds[arm] = round(time.monotonic() - t0, 3)
            await loop.run_in_executor(scoring, score, item, arm, image.data)
        except GenerationFailed as exc:
            item.errors[arm] = f"{exc.code}: {exc.message}"
            log.warning("ab_generation_failed", index=item.index, arm=arm, code=exc.code)
        finally:
            done += 1
            if progress is not None:
                progress(done, total)

    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    try:
        await asyncio.gather(*(one(item, arm) for item in items for arm in ARMS))
    finally:
        scoring.shutdown(wait=True)
    metrics = [m for m in (_summary(scorer, items, ci, seed) for scorer in scorers) if m]
    return Report(generator=generator.name, model=params.model, params=params, baseline=baseline,
                  prompts=len(prompts), items=items, refused=refused, metrics=metrics,
                  notes=list(notes), seconds=round(time.monotonic() - started, 1))


def _summary(scorer: Scorer, items: list[Item], ci: CiMethod, seed: int) -> MetricSummary | None:
    pairs = [(s["raw"], s["optimised"]) for item in items if not item.errors
             and (s := item.scores.get(scorer.name)) is not None]
    scored = [(raw, opt) for raw, opt in pairs if raw is not None and opt is not None]
    if not scored:
        return None
    raw, opt = [r for r, _ in scored], [o for _, o in scored]
    return MetricSummary(name=scorer.name, label=scorer.label, better=scorer.better,
                         raw_mean=sum(raw) / len(raw), optimised_mean=sum(opt) / len(opt),
                         interval=paired_interval(raw, opt, ci, seed=seed),
                         unscored=len(pairs) - len(scored))
