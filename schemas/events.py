"""Pydantic v2 models of every event on the wire.

Each stream entry has one field, `data`, holding `model.model_dump_json()`. The JSON Schema files
in `schemas/json/` are generated from these models (`python -m schemas.generate`) and a test fails
when they drift.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StringConstraints,
    field_validator,
    model_serializer,
)

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
STREAM_NAME_PATTERN = r"^[A-Za-z0-9._:{}-]{1,200}$"
SCOPE_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
MAX_PROMPT_CHARS = 4000

RequestId = Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)]
Status = Literal["ok", "rejected", "failed"]
CacheStatus = Literal["exact", "semantic", "miss", "coalesced", "bypass"]


class Params(BaseModel):
    """Every field that changes the picture. Unset fields take the generator's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, min_length=1, max_length=200)
    width: int | None = Field(None, ge=64, le=4096, multiple_of=8)
    height: int | None = Field(None, ge=64, le=4096, multiple_of=8)
    steps: int | None = Field(None, ge=1, le=500)
    guidance: float | None = Field(None, ge=0.0, le=50.0)
    sampler: str | None = Field(None, min_length=1, max_length=100)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    optimize: bool = True
    cache: Literal["use", "refresh", "bypass"] = "use"


class Request(BaseModel):
    """An entry of `promptcache:requests`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: RequestId
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    params: Params = Field(default_factory=Params)
    options: Options = Field(default_factory=Options)
    reply_to: Annotated[str, StringConstraints(pattern=STREAM_NAME_PATTERN)] | None = None
    # the cache namespace (a tenant): an entry made in one scope is never served to another;
    # absent = the shared scope
    scope: Annotated[str, StringConstraints(pattern=SCOPE_PATTERN)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty after trimming")
        return value


class GenerationJob(BaseModel):
    """An entry of `promptcache:generate` (internal): a request the cache could not answer,
    handed from a worker's fast path to the generation stage of whichever worker has a free slot."""

    model_config = ConfigDict(frozen=True)

    request: Request
    origin_id: str  # the request's entry id in promptcache:requests: latency runs from its time


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
    message: str


class Result(BaseModel):
    """An entry of `promptcache:results` (or the request's `reply_to`).

    Optional fields are left out when unset, except `error`, which is always present (null on ok).
    """

    model_config = ConfigDict(frozen=True)

    request_id: str
    status: Status
    cache: CacheStatus | None = None
    similarity: float | None = None
    matched_prompt: str | None = None
    entry_id: str | None = None
    image_url: str | None = None
    thumbnail_url: str | None = None
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    prompt_used: str | None = None
    dropped: list[str] | None = None  # what the optimizer left out to fit the 77-token window
    optimizer_version: str | None = None
    latency_ms: float | None = None
    error: ErrorInfo | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        data = handler(self)
        if info.mode == "json" or info.mode == "python":
            data = {k: v for k, v in data.items() if v is not None or k == "error"}
        return data


class DeadLetter(BaseModel):
    """An entry of `promptcache:dead-letter`: what could not be answered with a result."""

    model_config = ConfigDict(frozen=True)

    stream: str
    message_id: str
    entry: dict[str, str]
    error: ErrorInfo
    delivery_count: int
    consumer: str
    request_id: str | None = None
    dead_lettered_at: float


class Answer(BaseModel):
    """One answered request inside a `requests_answered` change event: a worker publishes one
    such event per batch of results instead of an `entry_hit` and a `request_answered` event
    per request. It means the same as that pair: a result row for the hourly statistics and,
    for a hit (`exact`, `semantic`, `coalesced`) of `entry_id`, a hit of that entry."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    status: Status
    tier: CacheStatus | None = None
    entry_id: str | None = None  # the entry served (a hit) or made (a miss)
    latency_ms: float
    reason: str | None = None  # the error code when status is not ok
    generation_ms: float | None = None  # a hit: the generation time its entry cost (saved)
    scope: str | None = None  # the request's scope; None: the shared scope
    similarity: float | None = None  # a semantic hit


class ChangeEvent(BaseModel):
    """An entry of `promptcache:changes`: what happened to the cache, for persisters and janitors."""

    model_config = ConfigDict(frozen=True)

    type: Literal["entry_stored", "entry_hit", "entry_evicted", "request_answered",
                  "requests_answered", "entry_embedded"]
    entry_id: str
    at: float
    cache_key: str | None = None
    tier: CacheStatus | None = None
    request_id: str | None = None
    prompt: str | None = None
    canonical_prompt: str | None = None
    negative_prompt: str | None = None
    params: dict[str, Any] | None = None
    optimizer_version: str | None = None
    generator: str | None = None
    blob_sha256: str | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    image_bytes: int | None = None
    thumbnail_bytes: int | None = None
    generation_ms: float | None = None
    latency_ms: float | None = None
    reason: str | None = None  # eviction reason, or the error code of a request_answered
    status: Status | None = None  # request_answered: the result's status
    similarity: float | None = None  # entry_hit of the semantic tier
    # entry_stored: the canonical prompt's embedding (base64 of little-endian float32), for the
    # durable copy of the semantic index; its model and params partition
    embedding: str | None = None
    embedding_model: str | None = None
    partition: str | None = None
    answers: list[Answer] | None = None  # requests_answered: a batch of results (entry_id "")
    scope: str | None = None  # entry_stored: the scope the entry belongs to (None: shared)
