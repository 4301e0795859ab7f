"""What every HTTP image backend shares: one retry policy and one way to read an image.

The policy (`RetryPolicy.run`) calls a request-making coroutine factory until it returns, with

* retries on 429 (waiting what `Retry-After` / `retry-after-ms` asks, capped), on
  500/502/503/504 and on connection, read and per-request timeout errors;
* exponential backoff with full jitter between them (`uniform(0, min(cap, base * 2**n))`);
* at most `max_retries` retries, all inside one overall deadline (`generator_timeout`).

It ends in `GeneratorTimeout` when the deadline passes (or the next wait would cross it),
`GeneratorUnavailable` when the retries are used up, and lets `GenerationRejected` (any other
4xx) through at once. A factory signals "try again" by raising `Transient`; `raise_for_status`
turns an `httpx.Response` into that or into a rejection, and httpx's transport errors are
recognised directly. No message or log line carries a URL's credentials or the API key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import io
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import structlog
from PIL import Image

from promptcache.errors import (
    GenerationFailed,
    GenerationRejected,
    GeneratorTimeout,
    GeneratorUnavailable,
)
from promptcache.generators.base import GeneratedImage

if TYPE_CHECKING:
    from promptcache.config import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_BACKOFF_BASE = 0.5
DEFAULT_BACKOFF_CAP = 20.0
DEFAULT_RETRY_AFTER_CAP = 60.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BAD_RESPONSE = "generator_bad_response"
_SNIPPET = 300  # characters of an error body quoted in a message

# httpx errors worth another try; UnsupportedProtocol, ProxyError etc. are configuration mistakes.
TRANSIENT_HTTPX_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (4 characters or more) replaced by `***`."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """What must never be quoted: the API key and, for `user:password` keys (basic auth), the
    password and the base64 form an echoed `Authorization` header would show."""
    if settings.generator_api_key is None:
        return ()
    key = settings.generator_api_key.get_secret_value()
    basic = base64.b64encode(key.encode()).decode() if ":" in key else ""
    return tuple(s for s in (key, key.partition(":")[2], basic) if s)


class Transient(Exception):
    """Raised by a request factory for a failure that another attempt may cure."""

    def __init__(self, reason: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or HTTP-date); None if unusable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:  # an HTTP-date is always GMT
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def retry_after_from_headers(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms` (OpenAI) wins over `Retry-After`; header names are case-insensitive."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if (ms := lowered.get("retry-after-ms")) is not None:
        try:
            value = float(ms) / 1000
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    return parse_retry_after(lowered.get("retry-after"))


def error_detail(response: httpx.Response) -> str:
    """A short, human-readable reason from an error body (JSON `error`/`detail`/`message`)."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:_SNIPPET].strip() or response.reason_phrase
    for key in ("error", "detail", "message"):
        if isinstance(body, dict) and body.get(key):
            inner = body[key]
            if isinstance(inner, dict):
                inner = inner.get("message") or inner
            return str(inner)[:_SNIPPET]
    return str(body)[:_SNIPPET]


def raise_for_status(response: httpx.Response, *, backend: str) -> None:
    """Return on 2xx; raise `Transient` for 429/5xx-listed, `GenerationRejected` for other 4xx."""
    status = response.status_code
    if 200 <= status < 300:
        return
    detail = error_detail(response)
    if status in RETRY_STATUSES:
        retry_after = retry_after_from_headers(response.headers) if status == 429 else None
        raise Transient(f"HTTP {status}: {detail}", status=status, retry_after=retry_after)
    if 400 <= status < 500:
        raise GenerationRejected(f"{backend} rejected the request (HTTP {status}): {detail}")
    raise GenerationFailed(f"{backend} answered HTTP {status}: {detail}")


def response_json(response: httpx.Response, *, backend: str) -> Any:
    """The JSON body, or `GenerationFailed(code="generator_bad_response")`."""
    try:
        return response.json()
    except ValueError as exc:
        raise GenerationFailed(f"{backend} answered with a body that is not JSON",
                               code=BAD_RESPONSE) from exc


class RetryPolicy:
    """Retries with full-jitter backoff inside one deadline; see the module docstring."""

    def __init__(
        self,
        *,
        max_retries: int = 4,
        timeout: float = 300.0,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        retry_after_cap: float = DEFAULT_RETRY_AFTER_CAP,
        rand: Callable[[], float] = random.random,
        secrets: Iterable[str] = (),
    ) -> None:
        self.secrets = tuple(secrets)
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self._rand = rand

    @classmethod
    def from_settings(cls, settings: Settings, *, backoff_base: float = DEFAULT_BACKOFF_BASE,
                      backoff_cap: float = DEFAULT_BACKOFF_CAP) -> RetryPolicy:
        return cls(max_retries=settings.generator_max_retries,
                   timeout=settings.generator_timeout.total_seconds(),
                   backoff_base=backoff_base, backoff_cap=backoff_cap,
                   retry_after_cap=max(DEFAULT_RETRY_AFTER_CAP, backoff_cap),
                   secrets=secrets_of(settings))

    def new_deadline(self) -> float:
        """An event-loop-clock deadline `timeout` seconds from now."""
        return asyncio.get_running_loop().time() + self.timeout

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Delay before retry number `retry` (1-based): Retry-After if given, else full jitter."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (retry - 1))
        return self._rand() * ceiling

    async def run(self, call: Callable[[], Awaitable[T]], *, backend: str, operation: str,
                  deadline: float | None = None) -> T:
        """Await `call()` until it succeeds, retrying transient failures; see the module doc."""
        loop = asyncio.get_running_loop()
        deadline = self.new_deadline() if deadline is None else deadline
        attempt = 0
        while True:
            attempt += 1
            if loop.time() >= deadline:
                raise GeneratorTimeout(f"{backend} {operation}: deadline of {self.timeout:g}s "
                                       f"passed before attempt {attempt}")
            try:
                async with asyncio.timeout_at(deadline):
                    return await call()
            except Transient as exc:
                failure: Exception = exc
                reason, status, retry_after = exc.reason, exc.status, exc.retry_after
            except TRANSIENT_HTTPX_ERRORS as exc:
                failure = exc
                reason, status, retry_after = f"{type(exc).__name__}: {exc}", None, None
            except TimeoutError as exc:
                if loop.time() >= deadline:
                    raise GeneratorTimeout(f"{backend} {operation}: no answer within the "
                                           f"{self.timeout:g}s deadline") from exc
                failure, reason, status, retry_after = exc, "timed out", None, None
            reason = scrub(reason, self.secrets)
            if attempt > self.max_retries:
                raise GeneratorUnavailable(f"{backend} {operation}: gave up after {attempt} "
                                           f"attempts; last error: {reason}") from failure
            delay = self.backoff(attempt, retry_after)
            if loop.time() + delay >= deadline:
                raise GeneratorTimeout(f"{backend} {operation}: next retry in {delay:.2f}s would "
                                       f"pass the {self.timeout:g}s deadline; last error: "
                                       f"{reason}") from failure
            log.warning("generator_retry", backend=backend, operation=operation, attempt=attempt,
                        max_retries=self.max_retries, delay_s=round(delay, 3), status=status,
                        reason=reason[:_SNIPPET])
            await asyncio.sleep(delay)


def strip_data_url(text: str) -> str:
    """`data:image/png;base64,XXXX` -> `XXXX`; anything else unchanged."""
    if text.startswith("data:"):
        _, sep, rest = text.partition(",")
        return rest if sep else ""
    return text


def image_from_bytes(data: bytes, *, backend: str, seed: int | None = None) -> GeneratedImage:
    """Check that `data` is a readable image and read its size and MIME type with Pillow."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            width, height = image.size
            image.verify()
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise GenerationFailed(f"{backend} returned data that is not a readable image "
                               f"({type(exc).__name__})", code=BAD_RESPONSE) from exc
    content_type = Image.MIME.get(fmt or "", "application/octet-stream")
    return GeneratedImage(data=data, content_type=content_type, width=width, height=height,
                          seed=seed)


def image_from_base64(text: str, *, backend: str, seed: int | None = None) -> GeneratedImage:
    """Decode base64 (or a base64 data URL) and read it as an image."""
    payload = "".join(strip_data_url(text.strip()).split())
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GenerationFailed(f"{backend} returned an image that is not valid base64",
                               code=BAD_RESPONSE) from exc
    if not data:
        raise GenerationFailed(f"{backend} returned an empty image", code=BAD_RESPONSE)
    return image_from_bytes(data, backend=backend, seed=seed)
