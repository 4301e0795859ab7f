"""OpenAI's Images API (`images.generate`) with a GPT Image model, through the `openai` SDK.

What this API does not take, and so what this generator ignores:

* **negative prompt**: there is no such parameter; nothing is appended to the prompt either;
* **seed, steps, guidance, sampler**: not exposed; the image is not reproducible from a seed,
  so `GeneratedImage.seed` is None;
* **arbitrary sizes**: every GPT Image model takes 1024x1024, 1536x1024 and 1024x1536, so the
  request is mapped to the one nearest its aspect ratio and the size actually returned is read
  from the decoded image.

GPT Image models always answer `b64_json` (`response_format` is not sent). DALL-E models were
retired on 2026-05-12 and `gpt-image-1` was shut down on 2026-10-23 (per the SDK's model notes),
so asking for them is a configuration error / a rejection rather than a doomed API call.

The SDK's own retries are off (`max_retries=0`); errors are mapped onto `RetryPolicy`:
429 / 5xx / connection / timeout -> retried; `moderation_blocked` and other 4xx ->
`GenerationRejected` at once; a 429 for exhausted quota -> `GeneratorUnavailable` at once.
"""

from __future__ import annotations

import math
from typing import Any

import openai

from promptcache.config import Settings
from promptcache.errors import (
    ConfigError,
    GenerationFailed,
    GenerationRejected,
    GeneratorUnavailable,
)
from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.http import (
    BAD_RESPONSE,
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    RETRY_STATUSES,
    RetryPolicy,
    Transient,
    image_from_base64,
    retry_after_from_headers,
)

DEFAULT_MODEL = "gpt-image-2.5-sunburst"
SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (1536, 1024), (1024, 1536))
RETIRED_MODELS = {
    "gpt-image-1": "gpt-image-1 was shut down on 2026-10-23",
    "dall-e-2": "DALL-E models were retired on 2026-05-12",
    "dall-e-3": "DALL-E models were retired on 2026-05-12",
}
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})


def retired_reason(model: str) -> str | None:
    """Why `model` can no longer be used, or None if it may be."""
    if model.startswith("dall-e"):
        return RETIRED_MODELS["dall-e-2"]
    return RETIRED_MODELS.get(model)


def nearest_size(width: int, height: int) -> str:
    """The supported `WxH` whose aspect ratio is closest (in log space) to width:height."""
    ratio = math.log(max(width, 1) / max(height, 1))
    w, h = min(SIZES, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))
    return f"{w}x{h}"


class OpenAIImagesGenerator:
    """GPT Image models via `AsyncOpenAI(max_retries=0)`; retries are ours."""

    name = "openai"
    truncates_prompt = False

    def __init__(self, *, api_key: str, base_url: str | None = None, model: str | None = None,
                 policy: RetryPolicy | None = None) -> None:
        self.default_model = model or DEFAULT_MODEL
        if reason := retired_reason(self.default_model):
            raise ConfigError(f"PROMPTCACHE_GENERATOR_MODEL={self.default_model!r}: {reason}; "
                              f"use a current GPT Image model such as {DEFAULT_MODEL!r}")
        self.policy = policy or RetryPolicy()
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0,
                                          timeout=self.policy.timeout)

    @classmethod
    def from_settings(cls, settings: Settings, *, backoff_base: float = DEFAULT_BACKOFF_BASE,
                      backoff_cap: float = DEFAULT_BACKOFF_CAP) -> OpenAIImagesGenerator:
        if settings.generator_api_key is None or not settings.generator_api_key.get_secret_value():
            raise ConfigError("PROMPTCACHE_GENERATOR=openai needs PROMPTCACHE_GENERATOR_API_KEY "
                              "(an OpenAI API key)")
        return cls(api_key=settings.generator_api_key.get_secret_value(),
                   base_url=settings.generator_url or None, model=settings.generator_model,
                   policy=RetryPolicy.from_settings(settings, backoff_base=backoff_base,
                                                    backoff_cap=backoff_cap))

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        model = request.model or self.default_model
        if reason := retired_reason(model):
            raise GenerationRejected(f"openai model {model!r} cannot be used: {reason}")
        size = nearest_size(request.width, request.height)

        async def attempt() -> GeneratedImage:
            try:
                response = await self._client.images.generate(
                    model=model, prompt=request.prompt, size=size, n=1)
            except openai.APIError as exc:
                raise translate_error(exc) from exc
            return _decode(response)

        return await self.policy.run(attempt, backend=self.name, operation="images.generate")

    async def aclose(self) -> None:
        await self._client.close()


def _message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"][:300]
    return exc.message[:300]


def translate_error(exc: openai.APIError) -> Exception:
    """An SDK error as `Transient` (retry) or one of our terminal `GenerationFailed`s."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return Transient(f"{type(exc).__name__}: {exc.message}")
    if isinstance(exc, openai.APIStatusError):
        status, code = exc.status_code, exc.code
        if code == "moderation_blocked":
            return GenerationRejected(f"openai refused the prompt (moderation_blocked, blocked "
                                      f"by its safety system): {_message(exc)}")
        if status == 429 and code in _QUOTA_CODES:
            return GeneratorUnavailable(f"openai quota exhausted ({code}): {_message(exc)}")
        if status in RETRY_STATUSES:
            retry_after = retry_after_from_headers(exc.response.headers) if status == 429 else None
            return Transient(f"HTTP {status}: {_message(exc)}", status=status,
                             retry_after=retry_after)
        if 400 <= status < 500:
            return GenerationRejected(f"openai rejected the request (HTTP {status}"
                                      f"{', ' + code if code else ''}): {_message(exc)}")
        return GenerationFailed(f"openai answered HTTP {status}: {_message(exc)}")
    return GenerationFailed(f"openai answered unexpectedly: {_message(exc)}", code=BAD_RESPONSE)


def _decode(response: Any) -> GeneratedImage:
    data = getattr(response, "data", None) or []
    b64 = getattr(data[0], "b64_json", None) if data else None
    if not isinstance(b64, str) or not b64:
        raise GenerationFailed("openai answered without b64_json image data", code=BAD_RESPONSE)
    return image_from_base64(b64, backend="openai", seed=None)
