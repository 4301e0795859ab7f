"""One frozen Settings object, read from the environment once (in cli.py) and passed down.

`REDIS_URL`, `CACHE_REDIS_URL` and `DATABASE_URL` are read as the platform sets them; everything
else is `PROMPTCACHE_*`. The README's configuration table lists every field.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, ByteSize, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from promptcache.keys import Keys
from promptcache.signing import UrlSigner
from promptcache.topology import keys_for

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> object:
    """Accept `30d`, `12h`, `90s`, `500ms`, plain seconds, or ISO 8601 (`P30D`)."""
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[(m.group(2) or "s").lower()])
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
GeneratorKind = Literal["procedural", "runpod", "openai", "automatic1111"]


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "promptcache"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROMPTCACHE_", frozen=True, extra="ignore", populate_by_name=True
    )

    # servers
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    cache_redis_url: str | None = Field(
        None, validation_alias=AliasChoices("CACHE_REDIS_URL", "cache_redis_url")
    )
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "database_url")
    )
    prefix: str = "promptcache"
    # Redis/Valkey Cluster: auto = ask the server; the request path split into `shards` hash
    # slots (promptcache/topology.py, promptcache/keys.py)
    cluster: Literal["auto", "on", "off"] = "auto"
    shards: int = Field(1, ge=1, le=1024)
    data_dir: Path = Field(default_factory=_default_data_dir)
    migrations_dir: Path = Path(__file__).resolve().parent.parent / "migrations"
    # where images live: "file" = data_dir/images and data_dir/thumbnails; "s3://bucket/prefix"
    # = an S3-compatible bucket, with the standard AWS_* variables (AWS_ENDPOINT_URL, ...)
    blobs: str = Field("file", pattern=r"^(file|s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?)$")
    # s3 only: the base under which the bucket's objects are publicly readable (a CDN in front
    # of it, or the public-read bucket itself); image_url/thumbnail_url are then this base + the
    # object key, straight to the bucket, not via `promptcache web`. Unset: PUBLIC_URL (web).
    # Refused with PROMPTCACHE_BLOBS=file or with URL signing (consumers/wiring.blob_store);
    # empty = unset.
    blobs_public_url: str | None = Field(None, pattern=r"^(https?://[^\s?#]+)?$")

    embedded_redis_port: int = Field(8751, ge=0, le=65535)  # `up` without REDIS_URL; 0 = any free

    # web
    web_host: str = "127.0.0.1"
    web_port: int = 8750
    public_url: str | None = None  # base of image_url/thumbnail_url; default http://web_host:web_port
    # `Authorization: Bearer <token>` for state-changing web endpoints (flag); unset: they are off
    admin_token: SecretStr | None = None
    # signed image URLs (promptcache/signing.py): unset, image URLs are plain and never expire
    url_signing_key: SecretStr | None = None
    url_ttl: Duration = timedelta(days=1)  # how long a signed URL stays valid
    url_signing_key_previous: SecretStr | None = None  # still accepted during a rotation...
    url_signing_previous_until: datetime | None = None  # ...until then (ISO 8601); unset: always

    # worker
    batch_size: int = Field(100, ge=1, le=1000)  # entries per read: one lookup, one publish
    max_in_flight: int = Field(256, ge=1)
    generation_concurrency: int = Field(4, ge=1)
    block: Duration = timedelta(seconds=1)  # XREADGROUP BLOCK; must stay under the 5 s socket timeout
    claim_idle: Duration = timedelta(seconds=60)  # XAUTOCLAIM min-idle; leases renewed at a third
    max_deliveries: int = Field(5, ge=1)
    done_ttl: Duration = timedelta(days=7)  # how long a request_id is remembered as answered
    health_interval: Duration = timedelta(seconds=10)
    # publish a batch only once the streams server has it in its append-only file (WAITAOF)
    durable_results: bool = False

    # cache
    ttl: Duration = timedelta(days=30)
    storage_limit: ByteSize = ByteSize(10 * 1000**3)
    # per scope (tenant), on top of storage_limit: a scope past it loses its own LRU entries
    scope_storage_limit: ByteSize | None = None
    thumbnail_size: int = 256
    cache_timeout: Duration = timedelta(milliseconds=50)  # cache store: fail fast, then bypass
    # images written without a registration (cache store down or slow): each worker deletes
    # its own after this, and keeps at most this share of storage_limit of them at a time
    bypass_keep: Duration = timedelta(minutes=10)
    bypass_share: float = Field(0.02, gt=0, le=0.5)
    # cross-worker single flight: a dead holder's lock is taken over within this
    flight_lock_ttl: Duration = timedelta(seconds=30)

    # semantic tier (PROMPTCACHE_EMBEDDINGS=off: exact tier only)
    embeddings: Literal["local", "openai", "off"] = "local"
    embeddings_url: str | None = None  # openai: an OpenAI-compatible base URL ending in /v1
    embeddings_model: str | None = None  # openai: the model name (default text-embedding-3-small)
    embeddings_api_key: SecretStr | None = None
    embeddings_dim: int | None = Field(None, ge=1)  # openai: checked against every reply
    embedding_threads: int = Field(1, ge=1, le=64)  # local: threads per worker process
    # local: onnx-int8 (feed-forward weights in int8, ~1.8x faster than onnx), onnx (float, the
    # same vectors as torch), torch
    embedding_runtime: Literal["onnx-int8", "onnx", "torch"] = "onnx-int8"
    semantic_threshold: float = Field(0.75, ge=0.0, le=1.0)  # cosine, before the verifier
    semantic_verifier: bool = True  # off: the threshold alone decides (not recommended)
    semantic_top_k: int = Field(5, ge=1, le=100)
    semantic_max_entries: int = Field(200_000, ge=0)  # per worker's in-memory index

    # quality gate on every generated image, before it is cached (promptcache/quality.py)
    quality_gate: bool = True  # off: images are cached unchecked
    # near-uniform below this largest per-channel standard deviation (0-255) of a 24 px copy
    quality_min_std: float = Field(5.0, ge=0.0, le=128.0)
    # BRISQUE (lower is better) above this is rejected; unset: not computed (needs the ab extra)
    quality_brisque_max: float | None = None

    # janitor
    janitor_interval: Duration = timedelta(seconds=30)
    janitor_lock_ttl: Duration = timedelta(seconds=60)
    results_retention: Duration = timedelta(days=1)
    changes_retention: Duration = timedelta(hours=1)  # change events kept after every group read them
    consumer_idle: Duration = timedelta(hours=1)  # idle consumers with nothing pending go
    orphan_grace: Duration = timedelta(hours=1)  # unregistered files younger than this stay
    orphan_interval: Duration = timedelta(hours=1)

    # content policy (sexual content involving minors is always refused)
    policy_explicit: Literal["refuse", "allow"] = "refuse"
    policy_gore: Literal["refuse", "allow"] = "refuse"
    policy_hate: Literal["refuse", "allow"] = "refuse"
    policy_real_person: Literal["refuse", "allow"] = "refuse"

    # generator
    generator: GeneratorKind = "procedural"
    generator_latency_ms: int = Field(2000, ge=0)
    generator_url: str | None = None
    generator_api_key: SecretStr | None = None
    generator_model: str | None = None
    generator_timeout: Duration = timedelta(seconds=300)
    generator_max_retries: int = Field(4, ge=0)
    generator_poll_interval: Duration = timedelta(seconds=1)
    runpod_endpoint_id: str | None = None
    # calls to the backend at once per process (whatever asks), and the circuit breaker
    generator_max_concurrency: int = Field(4, ge=1)
    generator_breaker_failures: int = Field(5, ge=1)  # consecutive failures: open
    generator_breaker_failure_rate: float = Field(0.5, gt=0, le=1)  # or this share of the window
    generator_breaker_window: int = Field(20, ge=1)  # last N calls (rate needs half of them)
    generator_breaker_cooldown: Duration = timedelta(seconds=30)  # open this long, then a probe

    # logs
    log_level: str = "INFO"
    # auto: console lines for people when stderr is a terminal, JSON lines otherwise
    log_format: Literal["auto", "json", "console"] = "auto"

    @property
    def effective_cache_redis_url(self) -> str | None:
        return self.cache_redis_url or self.redis_url

    def keys(self) -> Keys:
        """Every Redis name for this deployment (asks the server whether it is a cluster when
        PROMPTCACHE_CLUSTER=auto; the answer is remembered per URL)."""
        return keys_for(self.prefix, redis_url=self.redis_url,
                        cache_redis_url=self.cache_redis_url, shards=self.shards,
                        mode=self.cluster)

    def url_signer(self) -> UrlSigner | None:
        if self.url_signing_key is None:
            return None
        previous = self.url_signing_key_previous
        until = self.url_signing_previous_until
        return UrlSigner(self.url_signing_key.get_secret_value(),
                         ttl_s=self.url_ttl.total_seconds(),
                         previous=previous.get_secret_value() if previous else None,
                         previous_until=until.timestamp() if until else None)

    @property
    def effective_public_url(self) -> str:
        return (self.public_url or f"http://{self.web_host}:{self.web_port}").rstrip("/")

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def thumbnails_dir(self) -> Path:
        return self.data_dir / "thumbnails"
