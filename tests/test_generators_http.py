"""The three HTTP generators against real local HTTP servers that speak their wire formats."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from promptcache.config import Settings
from promptcache.errors import (
    ConfigError,
    GenerationFailed,
    GenerationRejected,
    GeneratorTimeout,
    GeneratorUnavailable,
)
from promptcache.generators.automatic1111 import Automatic1111Generator
from promptcache.generators.base import GenerationRequest, Generator
from promptcache.generators.http import (
    RetryPolicy,
    image_from_base64,
    parse_retry_after,
    retry_after_from_headers,
)
from promptcache.generators.openai_images import OpenAIImagesGenerator, nearest_size
from promptcache.generators.runpod import RunPodGenerator
from promptcache.prompts import NormalizedParams
from tests.http_fakes import FakeServer, Recorded, Reply, png_b64, png_bytes

SECRET = "sk-test-SECRET-7f3a9c"
GARBAGE_B64 = base64.b64encode(b"this is not an image at all").decode()
FAST = {"backoff_base": 0.01, "backoff_cap": 0.02}


def make_request(**changes: Any) -> GenerationRequest:
    """The request the tests send; `changes` may name the prompts or any of the params."""
    params = NormalizedParams(model="", width=64, height=48, steps=23, guidance=6.5,
                              sampler="Euler a", seed=1234)
    text = {k: changes.pop(k) for k in ("prompt", "negative_prompt") if k in changes}
    return GenerationRequest(**{"prompt": "a red fox in snow", "negative_prompt": "blurry",
                                **text}, params=replace(params, **changes))


# --- one table row per backend, for the behaviour they all share --------------------------------

@dataclass(frozen=True)
class Backend:
    kind: str
    method: str
    path: str
    url_suffix: str
    key: str
    auth_header: str
    ok: Callable[[str], Any]  # base64 image -> success JSON
    build: Callable[..., Generator]

    def settings(self, url: str, *, key: str | None = None, timeout: float = 5.0,
                 retries: int = 2, **extra: Any) -> Settings:
        return Settings(generator=self.kind, generator_url=url + self.url_suffix,
                        generator_api_key=key if key is not None else self.key,
                        runpod_endpoint_id="e", generator_timeout=timedelta(seconds=timeout),
                        generator_max_retries=retries,
                        generator_poll_interval=timedelta(milliseconds=20), _env_file=None,
                        **extra)

    def generator(self, url: str, **kwargs: Any) -> Generator:
        return self.build(self.settings(url, **kwargs), **FAST)

    def checked(self, ok: Any) -> Callable[[Recorded], Reply]:
        """A responder that wants our auth header, answering 401 without it (as the APIs do)."""
        def respond(req: Recorded) -> Reply:
            if req.headers.get("authorization") != self.auth_header:
                return Reply(401, json={"error": {"message": "Incorrect API key provided",
                                                  "type": "invalid_request_error",
                                                  "code": "invalid_api_key"}})
            return ok if isinstance(ok, Reply) else Reply(json=ok)
        return respond


BACKENDS = {
    "runpod": Backend(
        "runpod", "POST", "/runsync", "", SECRET, f"Bearer {SECRET}",
        lambda b64: {"id": "job-1", "status": "COMPLETED", "output": [{"image": b64}]},
        RunPodGenerator.from_settings),
    "automatic1111": Backend(
        "automatic1111", "POST", "/sdapi/v1/txt2img", "", f"webui:{SECRET}",
        "Basic " + base64.b64encode(f"webui:{SECRET}".encode()).decode(),
        lambda b64: {"images": [b64], "parameters": {}, "info": '{"seed": 1234}'},
        Automatic1111Generator.from_settings),
    "openai": Backend(
        "openai", "POST", "/v1/images/generations", "/v1", SECRET, f"Bearer {SECRET}",
        lambda b64: {"created": 1764000000, "data": [{"b64_json": b64}], "size": "1024x1024"},
        OpenAIImagesGenerator.from_settings),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


@contextlib.asynccontextmanager
async def opened(generator: Generator) -> AsyncIterator[Generator]:
    try:
        yield generator
    finally:
        await generator.aclose()


async def test_success_decodes_image_and_sends_auth(backend: Backend, server: FakeServer) -> None:
    server.on(backend.method, backend.path, backend.checked(backend.ok(png_b64(64, 48))))
    async with opened(backend.generator(server.url)) as gen:
        image = await gen.generate(make_request(model=gen.default_model))
    assert (image.width, image.height, image.content_type) == (64, 48, "image/png")
    assert image.data.startswith(b"\x89PNG")
    [call] = server.calls(backend.method, backend.path)
    assert call.headers["authorization"] == backend.auth_header


@pytest.mark.parametrize("key", ["wrong", ""])
async def test_bad_or_missing_key_is_rejected_once(backend: Backend, server: FakeServer, key: str) -> None:
    if key == "" and backend.kind != "automatic1111":
        with pytest.raises(ConfigError, match="API_KEY"):
            backend.generator(server.url, key="")
        return
    server.on(backend.method, backend.path, backend.checked(backend.ok(png_b64())))
    async with opened(backend.generator(server.url, key=key)) as gen:
        with pytest.raises(GenerationRejected, match="401") as info:
            await gen.generate(make_request(model=gen.default_model))
    assert info.value.code == "generator_rejected"
    assert len(server.calls(backend.method, backend.path)) == 1


async def test_429_waits_for_retry_after_then_succeeds(backend: Backend, server: FakeServer) -> None:
    server.on(backend.method, backend.path,
              Reply(429, json={"error": {"message": "slow down", "code": "rate_limit_exceeded"}},
                    headers={"Retry-After": "1"}),
              Reply(json=backend.ok(png_b64(32, 32))))
    async with opened(backend.generator(server.url)) as gen:
        with capture_logs() as logs:
            image = await gen.generate(make_request(model=gen.default_model))
    assert (image.width, image.height) == (32, 32)
    first, second = server.calls(backend.method, backend.path)
    assert second.at - first.at >= 0.9  # honoured Retry-After: 1
    retries = [entry for entry in logs if entry["event"] == "generator_retry"]
    assert [entry["status"] for entry in retries] == [429]
    assert SECRET not in repr(logs)


async def test_retry_after_past_the_deadline_fails_fast(backend: Backend, server: FakeServer) -> None:
    server.on(backend.method, backend.path,
              Reply(429, json={"error": "busy"}, headers={"Retry-After": "30"}))
    async with opened(backend.generator(server.url, timeout=3)) as gen:
        with capture_logs() as logs, pytest.raises(GeneratorTimeout, match="would pass"):
            await gen.generate(make_request(model=gen.default_model))
    # failed at once: no retry was scheduled (the retry log comes just before its sleep)
    assert [entry for entry in logs if entry["event"] == "generator_retry"] == []
    assert len(server.calls(backend.method, backend.path)) == 1


async def test_500_then_success(backend: Backend, server: FakeServer) -> None:
    server.on(backend.method, backend.path, Reply(500, json={"error": "boom"}),
              Reply(json=backend.ok(png_b64(20, 30))))
    async with opened(backend.generator(server.url)) as gen:
        image = await gen.generate(make_request(model=gen.default_model))
    assert (image.width, image.height) == (20, 30)
    assert len(server.calls(backend.method, backend.path)) == 2


async def test_persistent_503_gives_up_after_max_retries(backend: Backend, server: FakeServer) -> None:
    server.on(backend.method, backend.path, Reply(503, json={"error": "overloaded"}))
    async with opened(backend.generator(server.url, retries=3)) as gen:
        with pytest.raises(GeneratorUnavailable, match="4 attempts") as info:
            await gen.generate(make_request(model=gen.default_model))
    assert info.value.code == "generator_unavailable"
    assert info.value.__cause__ is not None  # chained
    assert len(server.calls(backend.method, backend.path)) == 4  # 1 try + 3 retries
    assert SECRET not in str(info.value)


async def test_connection_refused_is_retried_then_unavailable(backend: Backend) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with opened(backend.generator(f"http://127.0.0.1:{port}", retries=2)) as gen:
        with pytest.raises(GeneratorUnavailable, match="3 attempts"):
            await gen.generate(make_request(model=gen.default_model))


async def test_slow_server_times_out_within_the_deadline(backend: Backend, server: FakeServer) -> None:
    server.on(backend.method, backend.path, Reply(json=backend.ok(png_b64()), delay=10))
    async with opened(backend.generator(server.url, timeout=0.5)) as gen:
        started = time.monotonic()
        with pytest.raises(GeneratorTimeout) as info:  # the reply would take 10 s
            await gen.generate(make_request(model=gen.default_model))
        elapsed = time.monotonic() - started
    assert info.value.code == "generator_timeout"
    assert "no answer within the 0.5s deadline" in str(info.value)
    assert elapsed >= 0.4  # it did wait for the deadline
    assert len(server.calls(backend.method, backend.path)) == 1  # no retry past the deadline


async def test_garbage_image_is_a_bad_response(backend: Backend, server: FakeServer) -> None:
    server.on(backend.method, backend.path, Reply(json=backend.ok(GARBAGE_B64)))
    async with opened(backend.generator(server.url)) as gen:
        with pytest.raises(GenerationFailed) as info:
            await gen.generate(make_request(model=gen.default_model))
    assert info.value.code == "generator_bad_response"
    assert len(server.calls(backend.method, backend.path)) == 1  # not retried


async def test_non_json_body_is_a_bad_response(backend: Backend, server: FakeServer) -> None:
    server.on(backend.method, backend.path,
              Reply(body=b"<html>gateway</html>", headers={"Content-Type": "text/html"}))
    async with opened(backend.generator(server.url)) as gen:
        with pytest.raises(GenerationFailed) as info:
            await gen.generate(make_request(model=gen.default_model))
    assert info.value.code == "generator_bad_response"


# --- RunPod ---------------------------------------------------------------------------------------

RUNPOD = BACKENDS["runpod"]


async def test_runpod_sends_worker_input_fields(server: FakeServer) -> None:
    server.on("POST", "/runsync", Reply(json=RUNPOD.ok(png_b64())))
    async with opened(RUNPOD.generator(server.url)) as gen:
        assert gen.default_model == "sd-runpod" and gen.truncates_prompt is True
        await gen.generate(make_request(model=gen.default_model))
    body = server.calls("POST", "/runsync")[0].json()
    assert body == {"input": {"prompt": "a red fox in snow", "negative_prompt": "blurry",
                              "width": 64, "height": 48, "num_inference_steps": 23,
                              "guidance_scale": 6.5, "scheduler": "Euler a", "seed": 1234,
                              "num_images": 1}}


async def test_runpod_sends_configured_model(server: FakeServer) -> None:
    server.on("POST", "/runsync", Reply(json=RUNPOD.ok(png_b64())))
    async with opened(RUNPOD.generator(server.url, generator_model="sdxl-base")) as gen:
        assert gen.default_model == "sdxl-base"
        await gen.generate(make_request(model=gen.default_model))
    assert server.calls("POST", "/runsync")[0].json()["input"]["model"] == "sdxl-base"


@pytest.mark.parametrize("output", [
    pytest.param(lambda b64: {"image": b64}, id="dict-image"),
    pytest.param(lambda b64: {"images": [f"data:image/png;base64,{b64}"], "seed": 99},
                 id="worker-sdxl-images"),
    pytest.param(lambda b64: {"image_url": f"data:image/png;base64,{b64}"}, id="data-url"),
    pytest.param(lambda b64: b64, id="bare-string"),
    pytest.param(lambda b64: {"images": [{"filename": "a.png", "type": "base64", "data": b64}]},
                 id="worker-comfyui"),
])
async def test_runpod_output_shapes(server: FakeServer, output: Callable[[str], Any]) -> None:
    server.on("POST", "/runsync",
              Reply(json={"id": "j", "status": "COMPLETED", "output": output(png_b64(40, 50))}))
    async with opened(RUNPOD.generator(server.url)) as gen:
        image = await gen.generate(make_request())
    assert (image.width, image.height) == (40, 50)


async def test_runpod_fetches_image_url_without_credentials(server: FakeServer) -> None:
    server.on("POST", "/runsync", Reply(json={"id": "j", "status": "COMPLETED",
                                              "output": {"image_url": f"{server.url}/o/a.png"}}))
    server.on("GET", "/o/a.png", Reply(body=png_bytes(16, 24)))
    async with opened(RUNPOD.generator(server.url)) as gen:
        image = await gen.generate(make_request())
    assert (image.width, image.height) == (16, 24)
    [download] = server.calls("GET", "/o/a.png")
    assert "authorization" not in download.headers


async def test_runpod_polls_status_until_completed(server: FakeServer) -> None:
    server.on("POST", "/runsync", Reply(json={"id": "job-9", "status": "IN_QUEUE"}))
    server.on("GET", "/status/job-9", Reply(json={"id": "job-9", "status": "IN_PROGRESS"}),
              RUNPOD.checked({"id": "job-9", "status": "COMPLETED",
                              "output": {"image": png_b64(24, 24), "seed": 777}}))
    async with opened(RUNPOD.generator(server.url)) as gen:
        image = await gen.generate(make_request(seed=None))
    assert (image.width, image.height, image.seed) == (24, 24, 777)
    polls = server.calls("GET", "/status/job-9")
    assert len(polls) == 2
    assert all(p.headers["authorization"] == f"Bearer {SECRET}" for p in polls)
    assert polls[1].at - polls[0].at >= 0.015  # waited the poll interval


async def test_runpod_failed_job(server: FakeServer) -> None:
    server.on("POST", "/runsync", Reply(json={"id": "job-3", "status": "IN_PROGRESS"}))
    server.on("GET", "/status/job-3",
              Reply(json={"id": "job-3", "status": "FAILED", "error": "CUDA out of memory"}))
    async with opened(RUNPOD.generator(server.url)) as gen:
        with pytest.raises(GenerationFailed, match="CUDA out of memory") as info:
            await gen.generate(make_request())
    assert type(info.value) is GenerationFailed and info.value.code == "generator_failed"


async def test_runpod_deadline_while_polling_cancels_the_job(server: FakeServer) -> None:
    server.on("POST", "/runsync", Reply(json={"id": "job-5", "status": "IN_QUEUE"}))
    server.on("GET", "/status/job-5", Reply(json={"id": "job-5", "status": "IN_QUEUE"}))
    server.on("POST", "/cancel/job-5", Reply(json={"id": "job-5", "status": "CANCELLED"}))
    async with opened(RUNPOD.generator(server.url, timeout=0.4)) as gen:
        with pytest.raises(GeneratorTimeout, match="0.4s"):
            await gen.generate(make_request())
    assert len(server.calls("GET", "/status/job-5")) >= 3
    [cancel] = server.calls("POST", "/cancel/job-5")
    assert cancel.headers["authorization"] == f"Bearer {SECRET}"


def test_runpod_config() -> None:
    with pytest.raises(ConfigError, match="RUNPOD_ENDPOINT_ID"):
        RunPodGenerator.from_settings(Settings(generator="runpod", generator_api_key="k",
                                               _env_file=None))
    gen = RunPodGenerator.from_settings(Settings(generator="runpod", generator_api_key="k",
                                                 runpod_endpoint_id="abc123", _env_file=None))
    assert gen.base_url == "https://api.runpod.ai/v2/abc123"
    asyncio.run(gen.aclose())


# --- AUTOMATIC1111 --------------------------------------------------------------------------------

A1111 = BACKENDS["automatic1111"]


async def test_a1111_payload_and_seed_from_info(server: FakeServer) -> None:
    server.on("POST", "/sdapi/v1/txt2img",
              Reply(json={"images": [png_b64()], "parameters": {}, "info": '{"seed": 4242}'}))
    async with opened(A1111.generator(server.url)) as gen:
        assert gen.default_model == "a1111-default" and gen.truncates_prompt is False
        image = await gen.generate(make_request(model=gen.default_model, seed=None))
    assert image.seed == 4242
    assert server.calls("POST", "/sdapi/v1/txt2img")[0].json() == {
        "prompt": "a red fox in snow", "negative_prompt": "blurry", "width": 64, "height": 48,
        "steps": 23, "cfg_scale": 6.5, "sampler_name": "Euler a", "seed": -1,
        "batch_size": 1, "n_iter": 1}


async def test_a1111_model_override_and_no_auth(server: FakeServer) -> None:
    server.on("POST", "/sdapi/v1/txt2img", Reply(json=A1111.ok(png_b64())))
    async with opened(A1111.generator(server.url, key="", generator_model="dreamshaper_8")) as gen:
        assert gen.default_model == "dreamshaper_8"
        await gen.generate(make_request(model=gen.default_model))
    [call] = server.calls("POST", "/sdapi/v1/txt2img")
    assert call.json()["override_settings"] == {"sd_model_checkpoint": "dreamshaper_8"}
    assert call.json()["seed"] == 1234
    assert "authorization" not in call.headers


# --- OpenAI ---------------------------------------------------------------------------------------

OPENAI = BACKENDS["openai"]


async def test_openai_request_body(server: FakeServer) -> None:
    server.on("POST", "/v1/images/generations", Reply(json=OPENAI.ok(png_b64(48, 32))))
    async with opened(OPENAI.generator(server.url)) as gen:
        assert gen.truncates_prompt is False
        image = await gen.generate(make_request(model=gen.default_model, width=1920, height=1080))
    assert image.seed is None and (image.width, image.height) == (48, 32)  # size as decoded
    body = server.calls("POST", "/v1/images/generations")[0].json()
    assert body == {"model": gen.default_model, "prompt": "a red fox in snow",
                    "size": "1536x1024", "n": 1}


def test_openai_nearest_size() -> None:
    assert nearest_size(512, 512) == "1024x1024"
    assert nearest_size(1920, 1080) == "1536x1024"
    assert nearest_size(768, 1344) == "1024x1536"
    assert nearest_size(1100, 1000) == "1024x1024"


async def test_openai_moderation_blocked_is_not_retried(server: FakeServer) -> None:
    server.on("POST", "/v1/images/generations", Reply(400, json={"error": {
        "message": "Your request was rejected by the safety system.",
        "type": "image_generation_user_error", "param": None, "code": "moderation_blocked"}}))
    async with opened(OPENAI.generator(server.url, retries=3)) as gen:
        with pytest.raises(GenerationRejected, match="moderation") as info:
            await gen.generate(make_request(model=gen.default_model))
    assert info.value.code == "generator_rejected"
    assert str(info.value).startswith("openai refused the prompt (moderation_blocked")
    assert "safety system" in str(info.value)
    assert len(server.calls("POST", "/v1/images/generations")) == 1


async def test_openai_insufficient_quota_is_not_retried(server: FakeServer) -> None:
    server.on("POST", "/v1/images/generations", Reply(429, json={"error": {
        "message": "You exceeded your current quota.", "type": "insufficient_quota",
        "code": "insufficient_quota"}}))
    async with opened(OPENAI.generator(server.url, retries=3)) as gen:
        with pytest.raises(GeneratorUnavailable, match="quota"):
            await gen.generate(make_request(model=gen.default_model))
    assert len(server.calls("POST", "/v1/images/generations")) == 1


async def test_openai_retired_models(server: FakeServer) -> None:
    with pytest.raises(ConfigError, match="retired"):
        OPENAI.generator(server.url, generator_model="dall-e-3")
    async with opened(OPENAI.generator(server.url)) as gen:
        with pytest.raises(GenerationRejected, match="shut down"):
            await gen.generate(make_request(model="gpt-image-1"))
    assert server.requests == []


# --- the shared policy ----------------------------------------------------------------------------

def test_parse_retry_after() -> None:
    now = 1_800_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 12, tz=timezone.utc), usegmt=True)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(date, now=now) == pytest.approx(12.0)
    assert parse_retry_after(format_datetime(datetime.fromtimestamp(now - 5, tz=timezone.utc),
                                             usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert retry_after_from_headers({"Retry-After": "3", "retry-after-ms": "250"}) == 0.25


def test_backoff_is_full_jitter_capped() -> None:
    high = RetryPolicy(backoff_base=0.5, backoff_cap=20, rand=lambda: 0.999999)
    assert [round(high.backoff(n), 2) for n in (1, 2, 3, 7, 10)] == [0.5, 1.0, 2.0, 20.0, 20.0]
    assert RetryPolicy(rand=lambda: 0.0).backoff(5) == 0.0
    assert high.backoff(1, retry_after=3600) == 60.0  # Retry-After honoured, but capped


def test_image_from_base64_accepts_data_urls_and_rejects_garbage() -> None:
    image = image_from_base64("data:image/png;base64," + png_b64(5, 7), backend="t", seed=3)
    assert (image.width, image.height, image.seed) == (5, 7, 3)
    for bad in ("%%%not base64%%%", GARBAGE_B64, "",
                base64.b64encode(png_bytes()[:40]).decode(),  # not even a header
                base64.b64encode(png_bytes()[:-12]).decode()):  # header fine, IEND missing
        with pytest.raises(GenerationFailed) as info:
            image_from_base64(bad, backend="t")
        assert info.value.code == "generator_bad_response"
