"""The quality gate: a generated image is checked before it enters the cache.

A bad picture, once cached, is served to every later request for its prompt and its rewrites, so
the generation stage checks each image after the generator returns it and before anything is
registered or written (`Pipeline._generate_and_store`). Checks, cheapest first; the first that
fails names the reason (`REASONS`, stable: they label the counters):

* `undecodable`: the bytes do not decode completely as the type the generator said (truncated,
  corrupt, another format);
* `wrong_size`: the decoded size is not the size asked for (or the backend's documented size for
  it: OpenAI maps every request to its nearest supported size), or not the size the generator
  reported;
* `uniform`: near-uniform (Stable Diffusion's all-black safety-checker frame, a flat frame, a
  failed sampler's noise). The statistic is the largest per-channel standard deviation (0-255
  scale) of a copy box-filtered down to at most `SAMPLE_SIDE` pixels a side: box filtering
  averages pixel noise away, so a flat frame with noise scores near 0 while a picture keeps the
  spread of its shapes and light. Below `min_std` is rejected; the default is calibrated in
  benchmarks/README.md ("Quality gate");
* `low_quality`: a BRISQUE score (no-reference quality, lower is better; the one `promptcache ab`
  reports) above `brisque_max`. Off by default: it costs far more than the rest (measured in
  benchmarks/README.md) and needs the `ab` extra.

A rejection raises `ImageRejected` (a `failed` result with code `image_rejected`, the reason
first in the message) and is counted per reason in one Redis hash (`Keys.metrics_quality`) by
`RejectionCounter`, read by `promptcache stats` and `/metrics`. The checks are pure and sync;
`QualityGate.check` runs them in a thread.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError
from PIL import Image

from promptcache.errors import ConfigError, ImageRejected

log = structlog.get_logger(__name__)

REASONS = ("undecodable", "wrong_size", "uniform", "low_quality")
SAMPLE_SIDE = 24  # the uniformity statistic's copy: at most this many pixels a side
DEFAULT_MIN_STD = 5.0  # calibrated: benchmarks/README.md, "Quality gate"
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}

BrisqueScore = Callable[[np.ndarray], float | None]


@dataclass(frozen=True, slots=True)
class GatePolicy:
    min_std: float = DEFAULT_MIN_STD
    brisque_max: float | None = None  # None: BRISQUE is not computed


@dataclass(frozen=True, slots=True)
class Inspection:
    """What the gate measured of an image that passed it."""

    width: int
    height: int
    spread: float  # the uniformity statistic
    brisque: float | None = None


def decode(data: bytes, content_type: str,
           size: tuple[int, int] | None = None) -> Image.Image:
    """The image fully decoded (every byte read: a truncated file fails here), in RGB. With
    `size`, an image of another size is refused from its header, before its pixels are decoded
    (a huge image costs nothing)."""
    expected = FORMATS.get(content_type)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if expected is not None and image.format != expected:
                raise ImageRejected("undecodable", f"the generator said {content_type} but "
                                    f"the bytes are {image.format or 'unknown'}")
            if size is not None and image.size != size:
                raise ImageRejected("wrong_size", f"the image is {image.size[0]}x"
                                    f"{image.size[1]}; asked for {size[0]}x{size[1]}")
            image.load()
            return _as_rgb(image)
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
        raise ImageRejected("undecodable", f"the bytes do not decode as an image "
                            f"({type(exc).__name__}: {str(exc)[:120]})") from exc


def _as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit and 32-bit grey images are scaled to 8 bits first: Pillow's plain
    conversion clips them, and a well-exposed 16-bit image would come out near-white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def spread(image: Image.Image) -> float:
    """The largest per-channel standard deviation (0-255) of a box-filtered copy at most
    SAMPLE_SIDE pixels a side: near 0 for black, flat and flat-with-noise frames."""
    width, height = image.size
    scale = min(1.0, SAMPLE_SIDE / max(width, height))
    small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.Resampling.BOX) if scale < 1.0 else image
    pixels = np.asarray(small, dtype=np.float32).reshape(-1, 3)
    return float(pixels.std(axis=0).max())


def inspect(data: bytes, content_type: str, *, expected: tuple[int, int],
            reported: tuple[int, int], policy: GatePolicy,
            brisque: BrisqueScore | None = None) -> Inspection:
    """Check one image; raises ImageRejected with the first reason it fails."""
    image = decode(data, content_type, expected if expected == reported else None)
    size = image.size
    if size != expected or size != reported:
        raise ImageRejected("wrong_size", f"the image is {size[0]}x{size[1]}; asked for "
                            f"{expected[0]}x{expected[1]}, the generator reported "
                            f"{reported[0]}x{reported[1]}")
    value = spread(image)
    if value < policy.min_std:
        raise ImageRejected("uniform", f"near-uniform image (largest channel standard deviation "
                            f"{value:.2f} < {policy.min_std:g} at {SAMPLE_SIDE} px): a black "
                            "safety-checker frame, a flat frame or a failed sampler")
    score: float | None = None
    if policy.brisque_max is not None and brisque is not None:
        try:
            score = brisque(np.asarray(image))
        except Exception as exc:  # noqa: BLE001 - a scorer failure is not the image's fault
            log.warning("brisque_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            return Inspection(size[0], size[1], value, None)
        if score is None or score > policy.brisque_max:
            shown = "undefined" if score is None else f"{score:.1f}"
            raise ImageRejected("low_quality", f"BRISQUE {shown} above the limit "
                                f"{policy.brisque_max:g} (lower is better)")
    return Inspection(size[0], size[1], value, score)


def load_brisque() -> BrisqueScore:
    """BRISQUE from the `brisque` package (the `ab` extra), its model read from the package's
    files (nothing downloaded): RGB array in, score out (None where it is undefined). Raises
    ConfigError when the package is not installed."""
    try:
        from brisque import BRISQUE
    except ImportError as exc:
        raise ConfigError("BRISQUE needs the `ab` extra (pip install 'promptcache[ab]')") from exc

    class _Brisque(BRISQUE):  # type: ignore[misc]
        """brisque 0.2.0 with its feature scaling fixed for NumPy >= 2: some of its 36
        features come out as 1-element arrays, and `float()` of those raises (NumPy 2.4) or
        warns (earlier)."""

        def scale_features(self, features: Any) -> np.ndarray:
            flat = np.array([np.ravel(np.asarray(f, dtype=np.float64))[0] for f in features])
            low = np.asarray(self.scale_params["min_"], dtype=np.float64)
            high = np.asarray(self.scale_params["max_"], dtype=np.float64)
            return -1 + 2.0 / (high - low) * (flat - low)

    model = _Brisque(url=False)  # url=False: arrays in, no HTTP

    def score(rgb: np.ndarray) -> float | None:
        with np.errstate(all="ignore"):  # a flat image divides 0 by 0: no score, not a warning
            value = float(model.score(rgb))
        return value if math.isfinite(value) else None

    return score


@dataclass(frozen=True, slots=True)
class RejectionCounter:
    """Rejections by reason: HINCRBY on one hash where the rejection happens (the streams
    Redis, beside the result counters). Each rejected image counts once; a request that is
    redelivered and generated again counts its new image too. When the streams Redis cannot
    take the increment, the count is lost (logged); the request is still answered."""

    redis: aioredis.Redis
    key: str

    async def add(self, reason: str) -> None:
        try:
            await self.redis.hincrby(self.key, reason, 1)
        except (RedisError, OSError) as exc:  # a lost count, not a lost answer
            log.warning("rejection_not_counted", reason=reason, error=str(exc))


class QualityGate:
    """The checks above with a policy, a counter, and BRISQUE loaded once when enabled."""

    def __init__(self, policy: GatePolicy | None = None, *,
                 counter: RejectionCounter | None = None) -> None:
        self.policy = policy or GatePolicy()
        self.counter = counter
        self._brisque = load_brisque() if self.policy.brisque_max is not None else None

    async def check(self, data: bytes, content_type: str, *, expected: tuple[int, int],
                    reported: tuple[int, int]) -> Inspection:
        """Inspect in a thread; on a rejection, count it, log it, raise ImageRejected."""
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(inspect, data, content_type, expected=expected,
                                           reported=reported, policy=self.policy,
                                           brisque=self._brisque)
        except ImageRejected as exc:
            log.warning("image_rejected", reason=exc.reason, detail=exc.message,
                        gate_ms=round((time.perf_counter() - started) * 1000, 2))
            if self.counter is not None:
                await self.counter.add(exc.reason)
            raise
