"""The one interface every image generator implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a generator is asked for; params are already normalised (defaults filled in)."""

    prompt: str
    negative_prompt: str | None
    model: str
    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    seed: int | None


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    data: bytes  # encoded image file (PNG unless content_type says otherwise)
    content_type: str
    width: int
    height: int
    seed: int | None = None


class Generator(Protocol):
    name: str
    default_model: str
    # True when the backend reads only CLIP's 77-token window and drops the rest.
    truncates_prompt: bool

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        """Make one image. Raises a `promptcache.errors.GenerationFailed` subclass when it cannot."""
        ...

    async def aclose(self) -> None: ...
