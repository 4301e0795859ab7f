"""`promptcache ab`'s output: a table for people, the same as JSON with `--json`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ops.ab.run import Report

PROCEDURAL_NOTE = ("the procedural generator is a stand-in: it draws shapes from a hash of the "
                   "prompt, not what the prompt says, so these numbers say nothing about the "
                   "optimizer. Set PROMPTCACHE_GENERATOR to runpod, openai or automatic1111 "
                   "(see the README) to measure it")


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def as_json(report: Report) -> dict[str, Any]:
    return {
        "generator": report.generator, "model": report.model, "params": report.params.as_dict(),
        "baseline": report.baseline, "prompts": report.prompts,
        "pairs": sum(1 for item in report.items if not item.errors),
        "refused": [asdict(r) for r in report.refused],
        "failed": [{"index": i.index, "prompt": i.prompt, "errors": i.errors}
                   for i in report.failed],
        "difference": "optimised - raw",
        "metrics": {m.name: {"label": m.label, "better": m.better, "n": m.interval.n,
                             "raw_mean": m.raw_mean, "optimised_mean": m.optimised_mean,
                             "mean_difference": m.interval.mean,
                             "ci": [m.interval.low, m.interval.high],
                             "ci_method": m.interval.method, "ci_level": m.interval.level,
                             "excludes_zero": m.interval.excludes_zero,
                             "unscored": m.unscored} for m in report.metrics},
        "notes": report.notes, "seconds": report.seconds,
        "items": [{"index": i.index, "prompt": i.prompt, "sent": i.sent, "negative": i.negative,
                   "seed": i.seed, "scores": i.scores, "errors": i.errors,
                   "generation_seconds": i.seconds} for i in report.items],
    }


def _verdict(better: str, low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "too few pairs for an interval"
    if low <= 0 <= high:
        return "no clear difference (the interval spans 0)"
    improved = (high < 0) if better == "lower" else (low > 0)
    return "optimised better" if improved else "optimised worse"


def render(report: Report) -> str:
    p = report.params
    pairs = sum(1 for item in report.items if not item.errors)
    lines = [
        f"promptcache ab: {report.prompts} prompts through {report.generator} "
        f"(model {report.model}, {p.width}x{p.height}, {p.steps} steps), "
        f"raw = {'the prompt as typed' if report.baseline == 'verbatim' else 'optimize off'}, "
        f"optimised = prompt_used + negative; {report.seconds:.1f} s",
        f"pairs compared {pairs}; refused by the content policy {len(report.refused)}; "
        f"generation failed {len(report.failed)}",
        *(f"note: {note}" for note in report.notes),
    ]
    if report.metrics:
        ci = report.metrics[0].interval
        ci_label = f"{ci.level:.0%} CI ({ci.method})"
        lines += ["", f"{'metric':<34}{'raw':>9}{'optimised':>11}{'difference':>12}"
                      f"   {ci_label:<22}{'n':>4}  verdict"]
    for m in report.metrics:
        iv = m.interval
        label = f"{m.label} ({m.better} is better)"
        bounds = f"[{_signed(iv.low)}, {_signed(iv.high)}]" if iv.low is not None else "-"
        lines.append(f"{label:<34}{m.raw_mean:>9.2f}{m.optimised_mean:>11.2f}"
                     f"{iv.mean:>+12.2f}   {bounds:<22}{iv.n:>4}  "
                     f"{_verdict(m.better, iv.low, iv.high)}")
        if m.unscored:
            lines.append(f"  ({m.unscored} pairs left out: an image had no {m.label} score)")
    if not report.metrics:
        lines += ["", "no pair was scored: nothing to compare"]
    lines.append("difference = optimised - raw, paired by prompt (same params and seed)")
    for refusal in report.refused:
        lines.append(f"refused: {refusal.code}"
                     f"{f' ({refusal.category})' if refusal.category else ''}: "
                     f"{refusal.prompt[:70]}")
    for item in report.failed:
        for arm, error in item.errors.items():
            lines.append(f"failed ({arm}): {error}: {item.prompt[:60]}")
    return "\n".join(lines)
