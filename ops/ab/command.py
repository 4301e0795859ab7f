"""`promptcache ab` from Settings and the command line's choices: the generator from the factory,
the content policy from Settings, progress on stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ops.ab.prompts import prompt_set
from ops.ab.report import PROCEDURAL_NOTE, as_json, render
from ops.ab.run import Baseline, Report, run_ab
from ops.ab.scores import BrisqueScorer, Scorer, find_clip
from ops.ab.stats import CiMethod
from promptcache.client import parse_param
from promptcache.config import Settings
from promptcache.errors import ConfigError
from promptcache.generators import build_generator
from promptcache.optimizer import PolicySettings
from promptcache.prompts import normalize_params
from schemas.events import Params


@dataclass(frozen=True)
class AbOptions:
    prompts: Path | None = None
    limit: int | None = None
    seed: int = 0
    baseline: Baseline = "verbatim"
    ci: CiMethod = "t"
    clip_model: str | None = None
    no_clip: bool = False
    concurrency: int | None = None  # default: PROMPTCACHE_GENERATION_CONCURRENCY
    params: Params = Params()
    save_dir: Path | None = None
    progress: bool = True


def _progress(done: int, total: int) -> None:
    print(f"ab: {done}/{total} images", file=sys.stderr, flush=True)


async def ab(settings: Settings, options: AbOptions) -> Report:
    if options.limit is not None and options.limit < 1:
        raise ConfigError("--limit must be at least 1")
    prompts = prompt_set(options.prompts, options.limit, options.seed)
    notes: list[str] = []
    scorers: list[Scorer] = [BrisqueScorer()]
    if options.no_clip:
        notes.append("CLIP similarity skipped (--no-clip)")
    else:
        try:
            clip, note = find_clip(options.clip_model)
        except (OSError, ImportError) as exc:
            raise ConfigError(f"--clip-model {options.clip_model}: cannot load a CLIP model "
                              f"from it without downloading ({exc})") from exc
        if clip is not None:
            scorers.append(clip)
        if note:
            notes.append(note)
    if settings.generator == "procedural":
        notes.insert(0, PROCEDURAL_NOTE)
    generator = build_generator(settings)
    try:
        params = normalize_params(options.params, default_model=generator.default_model)
        policy = PolicySettings(explicit=settings.policy_explicit, gore=settings.policy_gore,
                                hate=settings.policy_hate, real_person=settings.policy_real_person)
        return await run_ab(generator, prompts, scorers, params=params, policy=policy,
                            baseline=options.baseline, seed=options.seed, ci=options.ci,
                            concurrency=options.concurrency or settings.generation_concurrency,
                            progress=_progress if options.progress else None,
                            save_dir=options.save_dir, notes=notes)
    finally:
        await generator.aclose()


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run it as the command line asked; 0 when at least one metric was compared, else 1."""
    try:
        params = Params.model_validate(dict(map(parse_param, args.param)))
    except ValidationError as exc:
        raise ConfigError(f"--param: {exc}") from exc
    options = AbOptions(prompts=args.prompts, limit=args.limit, seed=args.seed,
                        baseline=args.baseline, ci=args.ci, clip_model=args.clip_model,
                        no_clip=args.no_clip, concurrency=args.concurrency, params=params,
                        save_dir=args.save_images)
    report = asyncio.run(ab(settings, options))
    print(json.dumps(as_json(report), indent=2, ensure_ascii=False) if args.json
          else render(report))
    return 0 if report.metrics else 1
