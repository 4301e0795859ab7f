"""The one interface every image generator implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from promptcache.prompts import NormalizedParams


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a generator is asked for: the prompt sent, and params already normalised (defaults
    filled in); the params' fields are readable on the request itself."""

    prompt: str
    negative_prompt: str | None
    params: NormalizedParams

    @property
    def model(self) -> str:
        return self.params.model

    @property
    def width(self) -> int:
        return self.params.width

    @property
    def height(self) -> int:
        return self.params.height

    @property
    def steps(self) -> int:
        return self.params.steps

    @property
    def guidance(self) -> float:
        return self.params.guidance

    @property
    def sampler(self) -> str:
        return self.params.sampler

    @property
    def seed(self) -> int | None:
        return self.params.seed


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
