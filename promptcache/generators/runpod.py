"""RunPod serverless (queue-based endpoints) running a Stable Diffusion worker.

Wire format (docs.runpod.io, "operation reference"):

* `POST {base}/runsync` with `{"input": {...}}` and `Authorization: Bearer <key>`; it waits up to
  ~90 s and answers `{"id", "status", "output"?, "error"?}`.
* Still `IN_QUEUE` / `IN_PROGRESS`: `GET {base}/status/{id}` every `generator_poll_interval`
  until `COMPLETED`, `FAILED`, `CANCELLED` or `TIMED_OUT`, or our deadline, at which we send a
  best-effort `POST {base}/cancel/{id}` and raise `GeneratorTimeout` (polling that fails for
  another reason, or is cancelled, cancels the job too).

The `input` follows the diffusers-based SD workers (runpod-workers/worker-sdxl and its kin):
`prompt`, `negative_prompt`, `width`, `height`, `num_inference_steps`, `guidance_scale`,
`scheduler`, `seed`, `num_images: 1`, plus `model` when one other than the placeholder default is
asked for. Outputs differ between workers, so several shapes are accepted (see `_find_image`).

Note: a retried `runsync` after a read error may start a second job on RunPod (POST is not
idempotent); it only costs GPU time. Image URLs in the output (e.g. S3) are fetched *without* the
RunPod key. The worker truncates prompts at CLIP's 77 tokens, so `truncates_prompt = True`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import structlog

from promptcache.config import Settings
from promptcache.errors import ConfigError, GenerationFailed, GeneratorTimeout
from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.http import (
    BAD_RESPONSE,
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    RetryPolicy,
    image_from_base64,
    image_from_bytes,
    raise_for_status,
    response_json,
)

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "sd-runpod"  # placeholder: "whatever the endpoint has loaded"; `model` not sent
PENDING = frozenset({"IN_QUEUE", "IN_PROGRESS"})
_CANCEL_TIMEOUT = 5.0


class RunPodGenerator:
    """One RunPod serverless endpoint; one `httpx.AsyncClient` per instance."""

    name = "runpod"
    truncates_prompt = True

    def __init__(self, *, base_url: str, api_key: str, model: str | None = None,
                 policy: RetryPolicy | None = None, poll_interval: float = 1.0,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.default_model = model or DEFAULT_MODEL
        self.policy = policy or RetryPolicy()
        self.poll_interval = poll_interval
        self._auth = {"Authorization": f"Bearer {api_key}"}  # sent to RunPod only, never to URLs
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(self.policy.timeout, connect=min(10.0, self.policy.timeout)))

    @classmethod
    def from_settings(cls, settings: Settings, *, backoff_base: float = DEFAULT_BACKOFF_BASE,
                      backoff_cap: float = DEFAULT_BACKOFF_CAP) -> RunPodGenerator:
        if settings.generator_api_key is None or not settings.generator_api_key.get_secret_value():
            raise ConfigError("PROMPTCACHE_GENERATOR=runpod needs PROMPTCACHE_GENERATOR_API_KEY "
                              "(a RunPod API key)")
        if settings.generator_url:
            base = settings.generator_url
        elif settings.runpod_endpoint_id:
            base = f"https://api.runpod.ai/v2/{settings.runpod_endpoint_id}"
        else:
            raise ConfigError("PROMPTCACHE_GENERATOR=runpod needs PROMPTCACHE_RUNPOD_ENDPOINT_ID "
                              "(or PROMPTCACHE_GENERATOR_URL set to the endpoint's base URL)")
        return cls(base_url=base, api_key=settings.generator_api_key.get_secret_value(),
                   model=settings.generator_model,
                   policy=RetryPolicy.from_settings(settings, backoff_base=backoff_base,
                                                    backoff_cap=backoff_cap),
                   poll_interval=settings.generator_poll_interval.total_seconds())

    def build_input(self, request: GenerationRequest) -> dict[str, Any]:
        """The job's `input` object."""
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            "scheduler": request.sampler,
            "seed": request.seed,
            "num_images": 1,
        }
        if request.negative_prompt:
            body["negative_prompt"] = request.negative_prompt
        if request.model and request.model != DEFAULT_MODEL:
            body["model"] = request.model
        return body

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        deadline = self.policy.new_deadline()
        loop = asyncio.get_running_loop()
        job = await self._call("POST", "/runsync", "runsync", deadline,
                               json={"input": self.build_input(request)})
        job_id = job.get("id")
        try:
            while (status := str(job.get("status", ""))) not in ("COMPLETED", "FAILED",
                                                                 "CANCELLED", "TIMED_OUT"):
                if not isinstance(job_id, str) or not job_id:
                    raise GenerationFailed(f"runpod answered status {status!r} without a job id",
                                           code=BAD_RESPONSE)
                if status not in PENDING:
                    log.warning("runpod_unknown_status", job_id=job_id, status=status)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise GeneratorTimeout(f"runpod job {job_id} still {status} at the "
                                           f"{self.policy.timeout:g}s deadline")
                await asyncio.sleep(min(self.poll_interval, remaining))
                job = await self._call("GET", f"/status/{job_id}", "status", deadline)
        except (GenerationFailed, asyncio.CancelledError):
            # the job may still be queued or running on RunPod: stop paying for it
            if isinstance(job_id, str) and job_id:
                await self._cancel(job_id)
            raise
        return await self._finish(job, request, deadline)

    async def _finish(self, job: dict[str, Any], request: GenerationRequest,
                      deadline: float) -> GeneratedImage:
        status, job_id = job.get("status"), job.get("id")
        if status == "FAILED":
            raise GenerationFailed(f"runpod job {job_id} failed: {str(job.get('error'))[:500]}")
        if status == "CANCELLED":
            raise GenerationFailed(f"runpod job {job_id} was cancelled")
        if status == "TIMED_OUT":
            raise GeneratorTimeout(f"runpod job {job_id} hit the endpoint's execution timeout")
        output = job.get("output")
        if isinstance(output, dict) and output.get("error") and not _find_image(output):
            raise GenerationFailed(f"runpod worker reported: {str(output['error'])[:500]}")
        seed = output.get("seed") if isinstance(output, dict) else None
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else request.seed
        found = _find_image(output)
        if found is None:
            raise GenerationFailed(f"runpod job {job_id} completed without an image in its "
                                   "output", code=BAD_RESPONSE)
        if found.startswith(("http://", "https://")):
            return await self._download(found, seed, deadline)
        return image_from_base64(found, backend=self.name, seed=seed)

    async def _call(self, method: str, path: str, operation: str, deadline: float,
                    **kwargs: Any) -> dict[str, Any]:
        async def attempt() -> dict[str, Any]:
            response = await self._client.request(method, f"{self.base_url}{path}",
                                                  headers=self._auth, **kwargs)
            raise_for_status(response, backend=self.name)
            return _job(response_json(response, backend=self.name))

        return await self.policy.run(attempt, backend=self.name, operation=operation,
                                     deadline=deadline)

    async def _download(self, url: str, seed: int | None, deadline: float) -> GeneratedImage:
        async def attempt() -> GeneratedImage:
            response = await self._client.get(url)  # no RunPod credentials to a third party
            raise_for_status(response, backend=self.name)
            return image_from_bytes(response.content, backend=self.name, seed=seed)

        return await self.policy.run(attempt, backend=self.name, operation="download",
                                     deadline=deadline)

    async def _cancel(self, job_id: str) -> None:
        try:
            response = await self._client.post(f"{self.base_url}/cancel/{job_id}",
                                               headers=self._auth, timeout=_CANCEL_TIMEOUT)
            log.info("runpod_job_cancelled", job_id=job_id, status=response.status_code)
        except httpx.HTTPError as exc:
            log.warning("runpod_cancel_failed", job_id=job_id, error=type(exc).__name__)

    async def aclose(self) -> None:
        await self._client.aclose()


def _job(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GenerationFailed("runpod answered JSON that is not an object", code=BAD_RESPONSE)
    return body


def _find_image(output: Any) -> str | None:
    """The first image in a worker's output: base64, data URL or http(s) URL.

    Accepted: a base64 string; a list of those or of dicts; a dict with `image`, `images`,
    `image_url`, `url` or (worker-comfyui) `data` — e.g. `{"images": [{"image": ...}]}`,
    `{"image_url": "data:image/png;base64,..."}` or `{"images": [{"type": "base64", "data": ...}]}`.
    """
    if isinstance(output, str):
        return output or None
    if isinstance(output, list):
        return next((found for item in output if (found := _find_image(item))), None)
    if isinstance(output, dict):
        for key in ("image", "images", "image_url", "url", "data"):
            if (found := _find_image(output.get(key))) is not None:
                return found
    return None
