"""WebP thumbnails with Pillow. Pure and sync: call through asyncio.to_thread."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from promptcache.errors import GenerationFailed


def make_thumbnail(data: bytes, size: int = 256, quality: int = 80) -> bytes:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            thumb = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise GenerationFailed("the generator returned bytes that are not an image",
                               code="generator_bad_response") from exc
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, format="WEBP", quality=quality, method=4)
    return out.getvalue()
