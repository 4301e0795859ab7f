"""One error hierarchy, decided once per message in the worker.

* PipelineError
  + RequestRejected       the request itself is wrong        -> `rejected` result, ack
  + GenerationFailed      the generator could not make it    -> `failed` result, ack
    - GenerationRejected  the generator said no for good (400, moderation)
    - GeneratorTimeout, GeneratorUnavailable (after the adapter's own retries)
    - ImageTooLarge       the image alone is larger than the storage cap
    - ImageRejected       the image failed the quality gate (promptcache/quality.py)
  + CacheUnavailable      the cache store is down or slow    -> bypass the cache, still answer
Anything else (a bug, a full disk, the streams Redis gone mid-request) leaves the message pending:
it is redelivered after `claim_idle` and, past `max_deliveries`, dead-lettered with a `failed`
result.
"""

from __future__ import annotations


class PipelineError(Exception):
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class RequestRejected(PipelineError):
    code = "invalid_request"


class GenerationFailed(PipelineError):
    code = "generator_failed"


class GenerationRejected(GenerationFailed):
    code = "generator_rejected"


class GeneratorTimeout(GenerationFailed):
    code = "generator_timeout"


class GeneratorUnavailable(GenerationFailed):
    code = "generator_unavailable"


class ImageTooLarge(GenerationFailed):
    """The image (with its thumbnail) is larger than the whole storage cap: never written."""

    code = "image_larger_than_storage_limit"


class ImageRejected(GenerationFailed):
    """The generated image failed the quality gate: never cached, never written. `reason` is
    one of promptcache.quality.REASONS; the message starts with it."""

    code = "image_rejected"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class CacheUnavailable(PipelineError):
    code = "cache_unavailable"


class ConfigError(Exception):
    """A setting is missing or wrong: reported at start, before any message is read."""
