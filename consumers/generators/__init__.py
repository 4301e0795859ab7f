"""Image generators behind one interface, chosen by PROMPTCACHE_GENERATOR."""

from __future__ import annotations

from consumers.config import Settings
from consumers.errors import ConfigError
from consumers.generators.base import GeneratedImage, GenerationRequest, Generator
from consumers.generators.breaker import CircuitBreaker, GuardedGenerator
from consumers.generators.http import secrets_of

__all__ = ["GeneratedImage", "GenerationRequest", "Generator", "build_generator", "guarded"]


def build_generator(settings: Settings) -> Generator:
    """The configured backend behind the circuit breaker and the concurrency cap."""
    return guarded(_backend(settings), settings)


def guarded(inner: Generator, settings: Settings) -> GuardedGenerator:
    breaker = CircuitBreaker(failures=settings.generator_breaker_failures,
                             failure_rate=settings.generator_breaker_failure_rate,
                             window=settings.generator_breaker_window,
                             cooldown=settings.generator_breaker_cooldown.total_seconds(),
                             name=inner.name)
    return GuardedGenerator(inner, breaker=breaker,
                            max_concurrency=settings.generator_max_concurrency,
                            secrets=secrets_of(settings))


def _backend(settings: Settings) -> Generator:
    kind = settings.generator
    if kind == "procedural":
        from consumers.generators.procedural import ProceduralGenerator

        return ProceduralGenerator(latency_ms=settings.generator_latency_ms)
    if kind == "runpod":
        from consumers.generators.runpod import RunPodGenerator

        return RunPodGenerator.from_settings(settings)
    if kind == "openai":
        from consumers.generators.openai_images import OpenAIImagesGenerator

        return OpenAIImagesGenerator.from_settings(settings)
    if kind == "automatic1111":
        from consumers.generators.automatic1111 import Automatic1111Generator

        return Automatic1111Generator.from_settings(settings)
    raise ConfigError(f"unknown PROMPTCACHE_GENERATOR {kind!r}")
