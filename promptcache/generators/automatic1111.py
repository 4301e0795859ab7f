"""AUTOMATIC1111 stable-diffusion-webui (started with `--api`), and API-compatible forks (Forge).

`POST {base}/sdapi/v1/txt2img` with `prompt`, `negative_prompt`, `width`, `height`, `steps`,
`cfg_scale`, `sampler_name`, `seed` (-1 = random), `batch_size: 1`, `n_iter: 1` and, when a model
other than the placeholder default is asked for, `override_settings.sd_model_checkpoint`. The
answer is `{"images": ["<base64 png>"], "parameters": {...}, "info": "<JSON string>"}`, whose
`info.seed` is the seed actually used.

Auth: A1111's `--api-auth user:password` is HTTP basic auth, so an API key of the form
`user:password` is sent that way; a key without a colon is sent as a Bearer token (for a reverse
proxy in front of the webui). The sampler name is passed through as given (A1111 names such as
`Euler a`, `DPM++ 2M`). A1111 chunks prompts longer than 75 tokens, so `truncates_prompt = False`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from promptcache.config import Settings
from promptcache.errors import GenerationFailed
from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.http import (
    BAD_RESPONSE,
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    RetryPolicy,
    image_from_base64,
    raise_for_status,
    response_json,
)

DEFAULT_URL = "http://127.0.0.1:7860"
DEFAULT_MODEL = "a1111-default"  # placeholder: "the checkpoint the webui has loaded"


class Automatic1111Generator:
    """One A1111 webui; one `httpx.AsyncClient` per instance."""

    name = "automatic1111"
    truncates_prompt = False

    def __init__(self, *, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 model: str | None = None, policy: RetryPolicy | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.default_model = model or DEFAULT_MODEL
        self.policy = policy or RetryPolicy()
        auth: httpx.Auth | None = None
        headers: dict[str, str] = {}
        if api_key:
            user, sep, password = api_key.partition(":")
            if sep:
                auth = httpx.BasicAuth(user, password)
            else:
                headers["Authorization"] = f"Bearer {api_key}"
        self._client = client or httpx.AsyncClient(
            auth=auth, headers=headers,
            timeout=httpx.Timeout(self.policy.timeout, connect=min(10.0, self.policy.timeout)))

    @classmethod
    def from_settings(cls, settings: Settings, *, backoff_base: float = DEFAULT_BACKOFF_BASE,
                      backoff_cap: float = DEFAULT_BACKOFF_CAP) -> Automatic1111Generator:
        key = settings.generator_api_key.get_secret_value() if settings.generator_api_key else None
        return cls(base_url=settings.generator_url or DEFAULT_URL, api_key=key or None,
                   model=settings.generator_model,
                   policy=RetryPolicy.from_settings(settings, backoff_base=backoff_base,
                                                    backoff_cap=backoff_cap))

    def build_payload(self, request: GenerationRequest) -> dict[str, Any]:
        """The txt2img request body."""
        payload: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or "",
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "cfg_scale": request.guidance,
            "sampler_name": request.sampler,
            "seed": -1 if request.seed is None else request.seed,
            "batch_size": 1,
            "n_iter": 1,
        }
        if request.model and request.model != DEFAULT_MODEL:
            payload["override_settings"] = {"sd_model_checkpoint": request.model}
        return payload

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        payload = self.build_payload(request)

        async def attempt() -> GeneratedImage:
            response = await self._client.post(f"{self.base_url}/sdapi/v1/txt2img", json=payload)
            raise_for_status(response, backend=self.name)
            return _parse(response_json(response, backend=self.name), request)

        return await self.policy.run(attempt, backend=self.name, operation="txt2img")

    async def aclose(self) -> None:
        await self._client.aclose()


def _parse(body: Any, request: GenerationRequest) -> GeneratedImage:
    images = body.get("images") if isinstance(body, dict) else None
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        raise GenerationFailed("automatic1111 answered without an image", code=BAD_RESPONSE)
    return image_from_base64(images[0], backend="automatic1111",
                             seed=_seed_from_info(body.get("info"), request.seed))


def _seed_from_info(info: Any, fallback: int | None) -> int | None:
    """`info` is a JSON *string* holding `seed` (the one used, also when -1 was sent)."""
    try:
        parsed = json.loads(info) if isinstance(info, str) else info
    except ValueError:
        return fallback
    seed = parsed.get("seed") if isinstance(parsed, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else fallback
