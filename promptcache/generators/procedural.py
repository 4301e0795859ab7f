"""The embedded default generator: a real Pillow image that stands in for a model.

It is deterministic for (prompt, params, seed), visibly different for different prompts (colours,
shapes and layout all come from a hash of them), and it waits `latency_ms` to stand in for the
seconds a real API takes. It is not a model: it does not draw what the prompt says.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time

import numpy as np
from PIL import Image, ImageDraw

from promptcache.generators.base import GeneratedImage, GenerationRequest

_MAX_SIDE = 1024  # draw at most this big; the image is scaled to the requested size ratio


def _render(request: GenerationRequest) -> bytes:
    material = json.dumps(
        [request.prompt, request.negative_prompt, request.model, request.width, request.height,
         request.steps, request.guidance, request.sampler, request.seed],
        ensure_ascii=False,
    ).encode()
    digest = hashlib.sha256(material).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    scale = min(1.0, _MAX_SIDE / max(request.width, request.height))
    width, height = max(8, int(request.width * scale)), max(8, int(request.height * scale))

    # background: a two-colour gradient
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).copy(), "RGB")

    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(int(rng.integers(6, 18))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(max(4, width // 20), max(8, width // 3)))
        fill = (*(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(120, 230)))
        box = (x0 - size, y0 - size, x0 + size, y0 + size)
        match int(rng.integers(0, 3)):
            case 0:
                draw.ellipse(box, fill=fill)
            case 1:
                draw.rectangle(box, fill=fill)
            case _:
                draw.polygon([(x0, y0 - size), (x0 - size, y0 + size), (x0 + size, y0 + size)],
                             fill=fill)
    draw.text((8, 8), request.prompt[:60], fill=(255, 255, 255, 255))
    if scale < 1.0:
        image = image.resize((request.width, request.height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


class ProceduralGenerator:
    name = "procedural"
    default_model = "procedural-v1"
    truncates_prompt = False

    def __init__(self, latency_ms: int = 2000) -> None:
        self.latency_s = latency_ms / 1000

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        started = time.monotonic()
        data = await asyncio.to_thread(_render, request)
        await asyncio.sleep(max(0.0, self.latency_s - (time.monotonic() - started)))
        return GeneratedImage(data=data, content_type="image/png", width=request.width,
                              height=request.height, seed=request.seed)

    async def aclose(self) -> None:
        return None
