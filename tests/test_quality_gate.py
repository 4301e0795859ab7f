"""The quality gate (promptcache/quality.py): real pictures pass; black, flat, noisy-flat,
truncated, mislabelled and wrong-size images are rejected before anything is cached or written,
answered `failed` / `image_rejected`, and counted by reason in stats and /metrics."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis as syncredis
from PIL import Image

from ops.metrics import RedisCollector
from ops.status import render_stats, stream_stats
from promptcache.config import Settings
from promptcache.errors import ImageRejected
from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.procedural import ProceduralGenerator, _render
from promptcache.prompts import normalize_params
from promptcache.quality import (
    DEFAULT_MIN_STD,
    REASONS,
    GatePolicy,
    inspect,
    load_brisque,
)
from schemas.events import Params
from tests.conftest import make_settings
from tests.helpers import results_for, send, worker_for

SIZE = {"width": 256, "height": 256}
POLICY = GatePolicy()
PROMPTS = ["a red fox in the snow, golden hour", "two baseballs to the left of three tennis balls",
           "a black cat in a dark room", "a white lighthouse in thick fog",
           "an astronaut riding a horse on the moon", "minimalist poster, one small dot"]


def _request(prompt: str, width: int = 256, height: int = 256) -> GenerationRequest:
    params = normalize_params(Params(width=width, height=height), default_model="procedural-v1")
    return GenerationRequest(prompt=prompt, negative_prompt=None, params=params)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def black(width: int, height: int) -> bytes:
    return _png(Image.new("RGB", (width, height), (0, 0, 0)))


def flat(width: int, height: int) -> bytes:
    return _png(Image.new("RGB", (width, height), (128, 90, 200)))


def noisy_flat(width: int, height: int, sigma: float = 20.0) -> bytes:
    rng = np.random.default_rng(7)
    pixels = np.clip(rng.normal(110, sigma, (height, width, 3)), 0, 255).astype(np.uint8)
    return _png(Image.fromarray(pixels, "RGB"))


def truncated(width: int, height: int) -> bytes:
    whole = _render(_request("a truncated download", width, height))
    return whole[: len(whole) // 2]


def jpeg_labelled_png(width: int, height: int) -> bytes:
    with Image.open(io.BytesIO(_render(_request("a jpeg", width, height)))) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG")
    return out.getvalue()


def _check(data: bytes, size: tuple[int, int] = (256, 256), *,
           reported: tuple[int, int] | None = None, policy: GatePolicy = POLICY) -> None:
    inspect(data, "image/png", expected=size, reported=reported or size, policy=policy)


def _reason(data: bytes, **kwargs: object) -> str:
    with pytest.raises(ImageRejected) as caught:
        _check(data, **kwargs)  # type: ignore[arg-type]
    assert caught.value.code == "image_rejected"
    assert caught.value.message.startswith(f"{caught.value.reason}: ")
    return caught.value.reason


# --- the checks, on images -----------------------------------------------------------------

@pytest.mark.parametrize("size", [(256, 256), (1024, 1024), (1536, 1024), (64, 512)])
def test_procedural_pictures_pass(size):
    for prompt in PROMPTS:
        data = _render(_request(prompt, *size))
        result = inspect(data, "image/png", expected=size, reported=size, policy=POLICY)
        assert (result.width, result.height) == size
        assert result.spread >= DEFAULT_MIN_STD


def test_crafted_bad_images_fail_with_their_reason():
    assert _reason(black(256, 256)) == "uniform"
    assert _reason(flat(256, 256)) == "uniform"
    assert _reason(noisy_flat(256, 256, sigma=20)) == "uniform"  # noise averages away
    assert _reason(truncated(256, 256)) == "undecodable"
    assert _reason(b"<html>502 Bad Gateway</html>") == "undecodable"
    assert _reason(jpeg_labelled_png(256, 256)) == "undecodable"  # not the type it claims
    half = _render(_request("a picture", 128, 256))
    assert _reason(half) == "wrong_size"  # reported as asked, decodes at another size
    assert _reason(half, reported=(128, 256)) == "wrong_size"  # reported truly: still not asked


def test_the_threshold_is_a_setting_and_its_default_is_the_gates():
    assert Settings(_env_file=None).quality_min_std == DEFAULT_MIN_STD
    assert Settings(_env_file=None).quality_gate is True
    assert Settings(_env_file=None).quality_brisque_max is None  # BRISQUE off by default
    dim = _png(Image.fromarray(np.tile(np.linspace(0, 12, 256), (256, 1))[..., None]
                               .repeat(3, axis=2).astype(np.uint8), "RGB"))
    assert _reason(dim) == "uniform"  # a ramp over 12 grey levels: std about 3.5
    _check(dim, policy=GatePolicy(min_std=1.0))  # passes a lower threshold


def test_brisque_limit_rejects_above_it():
    brisque = load_brisque()
    data = _render(_request(PROMPTS[0]))
    passed = inspect(data, "image/png", expected=(256, 256), reported=(256, 256),
                     policy=GatePolicy(brisque_max=1000.0), brisque=brisque)
    assert passed.brisque is not None and passed.brisque < 1000.0
    with pytest.raises(ImageRejected) as caught:
        inspect(data, "image/png", expected=(256, 256), reported=(256, 256),
                policy=GatePolicy(brisque_max=passed.brisque - 1.0), brisque=brisque)
    assert caught.value.reason == "low_quality"


# --- through the real worker ---------------------------------------------------------------

Craft = Callable[[int, int], bytes]


@dataclass
class CraftedGenerator:
    """The procedural generator, except that a prompt starting with a key of `crafted` gets
    those bytes instead (reported at the size asked for, as a careless backend would)."""

    crafted: dict[str, Craft]
    name: str = "procedural"
    reports: Callable[[GenerationRequest], tuple[int, int]] | None = None
    calls: list[str] = field(default_factory=list)
    default_model: str = "procedural-v1"
    truncates_prompt: bool = False

    def __post_init__(self) -> None:
        self._inner = ProceduralGenerator(latency_ms=0)

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        self.calls.append(request.prompt)
        for trigger, make in self.crafted.items():
            if request.prompt == trigger or request.prompt.startswith(f"{trigger},"):
                width, height = self.reports(request) if self.reports else (request.width,
                                                                            request.height)
                return GeneratedImage(make(request.width, request.height), "image/png",
                                      width, height)
        return await self._inner.generate(request)

    async def aclose(self) -> None:
        return None


BAD = {"a black frame": black, "a flat frame": flat, "a noisy flat frame": noisy_flat,
       "a truncated download": truncated,
       "a half width picture": lambda w, h: _render(_request("half", w // 2, h))}
EXPECTED = {"a black frame": "uniform", "a flat frame": "uniform",
            "a noisy flat frame": "uniform", "a truncated download": "undecodable",
            "a half width picture": "wrong_size"}


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def test_rejected_images_fail_are_never_cached_or_written_and_are_counted(
        redis, redis_url, keys, settings):
    gen = CraftedGenerator(dict(BAD))
    for round_ in (1, 2):  # the second round asks again: a miss again, generated again
        for i, prompt in enumerate([*BAD, "a good picture of a fox"]):
            await send(redis, keys.requests, request_id=f"q{round_}-{i}", prompt=prompt,
                       params=SIZE)
        await worker_for(settings, redis, gen).run(burst=True)

        for i, prompt in enumerate(BAD):
            [result] = await results_for(redis, keys.results, f"q{round_}-{i}")
            assert result.status == "failed" and result.error is not None
            assert result.error.code == "image_rejected", result.error
            assert result.error.message.startswith(f"{EXPECTED[prompt]}: "), result.error
            assert result.image_url is None and result.entry_id is None
        [good] = await results_for(redis, keys.results, f"q{round_}-{len(BAD)}")
        assert good.status == "ok" and good.cache == ("miss" if round_ == 1 else "exact")

    for prompt in BAD:  # generated in both rounds: nothing was cached
        assert sum(c == prompt or c.startswith(f"{prompt},") for c in gen.calls) == 2
    # on disk: the good picture and its thumbnail only
    assert len(_files(settings.images_dir)) == 1 and len(_files(settings.thumbnails_dir)) == 1
    assert await redis.zcard(keys.lru) == 1  # one registered entry

    counted = {k.decode(): int(v) for k, v in (await redis.hgetall(keys.metrics_quality)).items()}
    assert counted == {"uniform": 6, "undecodable": 2, "wrong_size": 2}

    sync = syncredis.Redis.from_url(redis_url)
    try:
        families = {m.name: m for m in RedisCollector(sync, keys, 10_000_000).collect()}
    finally:
        sync.close()
    samples = {s.labels["reason"]: s.value for s in families["promptcache_images_rejected"].samples
               if s.name == "promptcache_images_rejected_total"}
    assert samples == {"uniform": 6.0, "undecodable": 2.0, "wrong_size": 2.0, "low_quality": 0.0}
    assert set(samples) == set(REASONS)

    overview = await stream_stats(redis, keys)
    assert overview["images_rejected"] == counted
    assert "quality gate rejected: uniform 6, " in render_stats(overview, None)


async def test_openai_sizes_are_checked_against_its_documented_size(redis, keys, settings):
    """OpenAI answers 1536x1024 for a 1920x1080 request: that passes; the size asked for, which
    OpenAI never returns, does not."""
    landscape = {"width": 1920, "height": 1080}
    documented = CraftedGenerator(
        {"as documented": lambda w, h: _render(_request("doc", 1536, 1024))}, name="openai",
        reports=lambda request: (1536, 1024))
    gen = CraftedGenerator({"as asked": lambda w, h: _render(_request("asked", w, h))},
                           name="openai")
    await send(redis, keys.requests, request_id="o1", prompt="as documented", params=landscape)
    await worker_for(settings, redis, documented).run(burst=True)
    await send(redis, keys.requests, request_id="o2", prompt="as asked", params=landscape)
    await worker_for(settings, redis, gen).run(burst=True)
    [ok] = await results_for(redis, keys.results, "o1")
    [bad] = await results_for(redis, keys.results, "o2")
    assert ok.status == "ok" and (ok.width, ok.height) == (1536, 1024)
    assert bad.status == "failed" and bad.error is not None
    assert bad.error.code == "image_rejected" and bad.error.message.startswith("wrong_size: ")


async def test_gate_off_caches_what_the_generator_returns(redis, keys, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, keys, quality_gate=False)
    gen = CraftedGenerator({"a black frame": black})
    await send(redis, keys.requests, request_id="off1", prompt="a black frame", params=SIZE)
    await worker_for(settings, redis, gen).run(burst=True)
    [result] = await results_for(redis, keys.results, "off1")
    assert result.status == "ok" and result.cache == "miss"
    assert await redis.hgetall(keys.metrics_quality) == {}


async def test_brisque_limit_from_the_settings_rejects_through_the_worker(
        redis, keys, tmp_path, redis_url):
    """PROMPTCACHE_QUALITY_BRISQUE_MAX reaches the worker's gate: under a limit no picture
    meets, a real picture fails as `low_quality`; under a generous one it is cached."""
    strict = make_settings(tmp_path, redis_url, keys, quality_brisque_max=-1000.0)
    gen = CraftedGenerator({})
    await send(redis, keys.requests, request_id="b1", prompt="a fox in a field", params=SIZE)
    await worker_for(strict, redis, gen).run(burst=True)
    [rejected] = await results_for(redis, keys.results, "b1")
    assert rejected.status == "failed" and rejected.error is not None
    assert rejected.error.message.startswith("low_quality: BRISQUE "), rejected.error
    assert await redis.hgetall(keys.metrics_quality) == {b"low_quality": b"1"}

    lenient = make_settings(tmp_path, redis_url, keys, quality_brisque_max=1000.0)
    await send(redis, keys.requests, request_id="b2", prompt="a fox in a field", params=SIZE)
    await worker_for(lenient, redis, gen).run(burst=True)
    [cached] = await results_for(redis, keys.results, "b2")
    assert cached.status == "ok" and cached.cache == "miss"  # the rejected one left nothing


def test_a_16_bit_grey_picture_is_judged_on_its_content():
    """A well-exposed 16-bit grey gradient is a picture, not a flat frame (Pillow's plain RGB
    conversion clips it to near-white)."""
    import io

    import numpy as np
    from PIL import Image

    from promptcache.quality import GatePolicy, inspect

    ramp = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (256, 1))
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")  # uint16: a 16-bit grey PNG
    seen = inspect(out.getvalue(), "image/png", expected=(256, 256), reported=(256, 256),
                   policy=GatePolicy())
    assert seen.spread > 50
