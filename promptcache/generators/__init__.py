"""Image generators behind one interface, chosen by PROMPTCACHE_GENERATOR."""

from __future__ import annotations

from promptcache.config import Settings
from promptcache.errors import ConfigError
from promptcache.generators.base import GeneratedImage, GenerationRequest, Generator
from promptcache.generators.breaker import CircuitBreaker, GuardedGenerator
from promptcache.generators.http import secrets_of

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
        from promptcache.generators.procedural import ProceduralGenerator

        return ProceduralGenerator(latency_ms=settings.generator_latency_ms)
    if kind == "runpod":
        from promptcache.generators.runpod import RunPodGenerator

        return RunPodGenerator.from_settings(settings)
    if kind == "openai":
        from promptcache.generators.openai_images import OpenAIImagesGenerator

        return OpenAIImagesGenerator.from_settings(settings)
    if kind == "automatic1111":
        from promptcache.generators.automatic1111 import Automatic1111Generator

        return Automatic1111Generator.from_settings(settings)
    raise ConfigError(f"unknown PROMPTCACHE_GENERATOR {kind!r}")
