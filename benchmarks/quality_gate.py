"""The quality gate (promptcache/quality.py): its uniformity threshold calibrated, and its cost
per image beside the generation it guards.

    .venv/bin/python benchmarks/quality_gate.py [--prompts 40] [--repeat 5] [--no-brisque]

Calibration: the gate's statistic (largest per-channel standard deviation of a copy at most
24 px a side) on real pictures (the procedural generator's output for real prompts at several
sizes, and every photo or render shipped with scikit-image and scikit-learn when installed: the
`ab` extra brings them) against bad frames (black, flat colours, flat frames with pixel noise up
to full-range uniform noise, faint ramps, JPEG-compressed flat frames). Cost: `inspect` (full
decode, size check, statistic) per image, median and p99, beside the procedural generator's own
render time and the thumbnail the pipeline makes anyway; BRISQUE (off by default) likewise.

Prints a table and writes benchmarks/results/quality-gate-latest.json (and a stamped copy).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.harness import git_state, machine, percentiles, write_json  # noqa: E402
from promptcache.errors import ConfigError, ImageRejected  # noqa: E402
from promptcache.generators.base import GenerationRequest  # noqa: E402
from promptcache.generators.procedural import _render  # noqa: E402
from promptcache.prompts import normalize_params  # noqa: E402
from promptcache.quality import (  # noqa: E402
    DEFAULT_MIN_STD,
    SAMPLE_SIDE,
    GatePolicy,
    decode,
    inspect,
    load_brisque,
    spread,
)
from promptcache.thumbnails import make_thumbnail  # noqa: E402
from schemas.events import Params  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZES = ((512, 512), (1024, 1024), (1536, 1024))
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".gif")


def say(text: str = "") -> None:
    print(text, flush=True)


def prompts(limit: int) -> list[str]:
    lines = (ROOT / "ops" / "sample_prompts.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")][:limit]


def request(prompt: str, width: int, height: int) -> GenerationRequest:
    params = normalize_params(Params(width=width, height=height), default_model="procedural-v1")
    return GenerationRequest(prompt=prompt, negative_prompt=None, params=params)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def photo_files() -> list[Path]:
    """Photos and renders shipped inside installed packages (nothing downloaded)."""
    found: list[Path] = []
    for package, sub in (("skimage", "data"), ("sklearn", "datasets/images")):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        folder = Path(spec.origin).parent / sub
        found += sorted(p for p in folder.glob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    return found


def bad_frames(rng: np.random.Generator) -> dict[str, list[tuple[str, bytes]]]:
    w, h = 1024, 1024
    sets: dict[str, list[tuple[str, bytes]]] = {"black": [], "flat": [], "noisy flat": [],
                                                "faint ramp": [], "jpeg flat": []}
    for size in SIZES:
        sets["black"].append((f"{size[0]}x{size[1]}", png(Image.new("RGB", size, (0, 0, 0)))))
    for colour in rng.integers(0, 256, (6, 3)):
        sets["flat"].append((f"rgb{tuple(int(c) for c in colour)}",
                             png(Image.new("RGB", (w, h), tuple(int(c) for c in colour)))))
    for sigma in (2, 5, 10, 20, 40, 60):
        base = rng.integers(30, 220, 3)
        pixels = np.clip(rng.normal(base, sigma, (h, w, 3)), 0, 255).astype(np.uint8)
        sets["noisy flat"].append((f"gaussian sigma {sigma}", png(Image.fromarray(pixels, "RGB"))))
    for side in (512, 768, 1024):  # full-range noise: the smaller, the less the box averages
        sets["noisy flat"].append((f"uniform noise 0-255 {side}x{side}", png(Image.fromarray(
            rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB"))))
    pixels = np.clip(rng.normal(120, 40, (512, 512, 3)), 0, 255).astype(np.uint8)
    sets["noisy flat"].append(("gaussian sigma 40 512x512", png(Image.fromarray(pixels, "RGB"))))
    for levels in (2, 4, 8):
        ramp = np.tile(np.linspace(0, levels, w), (h, 1))[..., None].repeat(3, axis=2)
        sets["faint ramp"].append((f"0-{levels} grey levels",
                                   png(Image.fromarray(ramp.astype(np.uint8), "RGB"))))
    for quality in (10, 50):
        out = io.BytesIO()
        Image.new("RGB", (w, h), (120, 40, 200)).save(out, format="JPEG", quality=quality)
        sets["jpeg flat"].append((f"quality {quality}", out.getvalue()))
    return sets


def spread_of(data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as image:
        return spread(image.convert("RGB"))


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "min": round(min(values), 2),
            "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def timed(call: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def calibrate(texts: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(18)
    real: dict[str, list[tuple[str, float]]] = {"procedural": [], "photos": []}
    for size in SIZES:
        for text in texts:
            real["procedural"].append((f"{size[0]}x{size[1]} {text[:30]}",
                                       spread_of(_render(request(text, *size)))))
    for path in photo_files():
        try:
            real["photos"].append((path.name, spread_of(path.read_bytes())))
        except (OSError, ValueError) as exc:
            say(f"  skipped {path.name}: {exc}")
    bad = {kind: [(name, spread_of(data)) for name, data in frames]
           for kind, frames in bad_frames(rng).items()}
    lowest_real = min((v, f"{kind}: {name}") for kind, rows in real.items() for name, v in rows)
    highest_bad = max((v, f"{kind}: {name}") for kind, rows in bad.items() for name, v in rows)
    return {
        "statistic": f"largest per-channel std (0-255) of a box-filtered copy <= {SAMPLE_SIDE} px",
        "threshold": DEFAULT_MIN_STD,
        "real": {k: summary([v for _, v in rows]) for k, rows in real.items() if rows},
        "bad": {k: summary([v for _, v in rows]) for k, rows in bad.items()},
        "lowest_real": {"value": round(lowest_real[0], 2), "image": lowest_real[1]},
        "highest_bad": {"value": round(highest_bad[0], 2), "image": highest_bad[1]},
        "real_rejected": [f"{k}: {n} ({v:.2f})" for k, rows in real.items() for n, v in rows
                          if v < DEFAULT_MIN_STD],
        "bad_passed": [f"{k}: {n} ({v:.2f})" for k, rows in bad.items() for n, v in rows
                       if v >= DEFAULT_MIN_STD],
        "photos": {name: round(v, 2) for name, v in real["photos"]},
        "bad_frames": {f"{k}: {n}": round(v, 2) for k, rows in bad.items() for n, v in rows},
    }


def cost(texts: list[str], repeat: int, with_brisque: bool) -> dict[str, Any]:
    policy = GatePolicy()
    brisque = None
    if with_brisque:
        try:
            brisque = load_brisque()
        except ConfigError as exc:
            say(f"  BRISQUE not measured: {exc}")
    out: dict[str, Any] = {}
    for width, height in SIZES:
        render_ms: list[float] = []
        gate_ms: list[float] = []
        decode_ms: list[float] = []
        thumb_ms: list[float] = []
        brisque_ms: list[float] = []
        for text in texts:
            req = request(text, width, height)
            started = time.perf_counter()
            data = _render(req)
            render_ms.append((time.perf_counter() - started) * 1000)

            def gate(data: bytes = data) -> None:
                inspect(data, "image/png", expected=(width, height), reported=(width, height),
                        policy=policy)

            gate_ms += timed(gate, repeat)
            decode_ms += timed(lambda data=data: decode(data, "image/png"), repeat)
            thumb_ms += timed(lambda data=data: make_thumbnail(data, 256), max(1, repeat // 2))
            if brisque is not None and len(brisque_ms) < 10:
                rgb = np.asarray(decode(data, "image/png"))
                brisque_ms += timed(lambda rgb=rgb: brisque(rgb), 1)
        out[f"{width}x{height}"] = {
            "images": len(texts), "repeat": repeat,
            "gate_ms": percentiles(gate_ms, (50, 99)),
            "of_which_decode_ms": percentiles(decode_ms, (50, 99)),
            "thumbnail_ms": percentiles(thumb_ms, (50, 99)),
            "procedural_render_ms": percentiles(render_ms, (50, 99)),
            "brisque_ms": percentiles(brisque_ms, (50, 99)) if brisque_ms else None,
        }
    return out


def rejection_check() -> dict[str, str]:
    """Each bad kind through `inspect`, as a sanity line: the reason it gets."""
    w = h = 512
    good = _render(request("a sanity check", w, h))
    cases = {"black": png(Image.new("RGB", (w, h))), "truncated": good[: len(good) // 2],
             "wrong size": _render(request("half", w // 2, h)), "good": good}
    out = {}
    for name, data in cases.items():
        try:
            inspect(data, "image/png", expected=(w, h), reported=(w, h), policy=GatePolicy())
            out[name] = "passed"
        except ImageRejected as exc:
            out[name] = exc.reason
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-brisque", action="store_true")
    args = parser.parse_args()
    texts = prompts(args.prompts)
    report: dict[str, Any] = {"benchmark": "quality_gate", "machine": machine(),
                              "git": git_state(), "prompts": len(texts)}
    say(f"calibrating on {len(texts)} prompts x {len(SIZES)} sizes, photos, bad frames")
    report["calibration"] = cal = calibrate(texts)
    report["reasons"] = rejection_check()
    say(f"measuring cost ({args.repeat} runs per image)")
    report["cost"] = costs = cost(texts, args.repeat, not args.no_brisque)

    say("")
    say(f"uniformity statistic: {cal['statistic']}; threshold {cal['threshold']:g}")
    say(f"  {'set':<24}{'n':>5}{'min':>9}{'median':>9}{'max':>9}")
    for group in ("real", "bad"):
        for name, row in cal[group].items():
            say(f"  {group + ': ' + name:<24}{row['n']:>5}{row['min']:>9.2f}"
                f"{row['median']:>9.2f}{row['max']:>9.2f}")
    say(f"  lowest real {cal['lowest_real']['value']:.2f} ({cal['lowest_real']['image']}); "
        f"highest bad {cal['highest_bad']['value']:.2f} ({cal['highest_bad']['image']})")
    say(f"  real rejected: {cal['real_rejected'] or 'none'}; bad passed: "
        f"{cal['bad_passed'] or 'none'}")
    say(f"  reasons: {report['reasons']}")
    say("")
    say(f"  {'size':<11}{'gate p50':>10}{'gate p99':>10}{'decode p50':>12}{'thumb p50':>11}"
        f"{'render p50':>12}{'BRISQUE p50':>13}")
    for size, row in costs.items():
        brisque = f"{row['brisque_ms']['p50']:>13.1f}" if row["brisque_ms"] else f"{'-':>13}"
        say(f"  {size:<11}{row['gate_ms']['p50']:>10.1f}{row['gate_ms']['p99']:>10.1f}"
            f"{row['of_which_decode_ms']['p50']:>12.1f}{row['thumbnail_ms']['p50']:>11.1f}"
            f"{row['procedural_render_ms']['p50']:>12.1f}{brisque}")
    say("  (ms per image, one thread; a real backend takes seconds per image: the procedural "
        "generator's stand-in latency is 2000 ms)")
    path = write_json(report, RESULTS, "quality-gate")
    say(f"\nwrote {path}")


if __name__ == "__main__":
    main()
