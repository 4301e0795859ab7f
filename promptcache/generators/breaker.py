"""What stands between the pipeline and any generator: a circuit breaker and a concurrency cap.

* **Bounded concurrency.** At most `max_concurrency` calls to the backend at once in this process,
  whoever asks (a semaphore), so a burst cannot exceed what the backend's rate limit allows.
* **Circuit breaker.** Closed: calls go through, outcomes are counted. After `failures` failures
  in a row, or a `failure_rate` share of the last `window` calls (once at least half the window
  has been seen), it opens: every call fails at once with `generator_unavailable`, no backend
  call, for `cooldown`. Then it is half-open: one probe goes through; success closes it, failure
  opens it for another cooldown. A refusal (`generator_rejected`: a 4xx, moderation) is the
  backend working, so it counts as a success; a cancelled call counts as nothing.
* **No secrets out.** An error message that quotes the API key (an echoing proxy, an SDK
  message) has it replaced by `***` before it reaches a result or a log line.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal

import structlog

from promptcache.errors import GenerationFailed, GenerationRejected, GeneratorUnavailable
from promptcache.generators.base import GeneratedImage, GenerationRequest, Generator
from promptcache.generators.http import scrub

log = structlog.get_logger(__name__)

State = Literal["closed", "open", "half_open"]


class CircuitOpen(GeneratorUnavailable):
    """The breaker is open: failed at once, the backend was not called."""


class CircuitBreaker:
    """The state machine alone (no I/O), with an injectable clock for tests."""

    def __init__(self, *, failures: int = 5, failure_rate: float = 0.5, window: int = 20,
                 cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 name: str = "generator") -> None:
        self.failures = failures
        self.failure_rate = failure_rate
        self.window = window
        self.cooldown = cooldown
        self.clock = clock
        self.name = name
        self.state: State = "closed"
        self._consecutive = 0
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = failure
        self._opened_at = 0.0
        self._probe_out = False

    def _refuse(self) -> CircuitOpen:
        left = max(0.0, self._opened_at + self.cooldown - self.clock())
        return CircuitOpen(f"{self.name}: circuit breaker open after repeated failures; "
                           f"next probe in {left:.1f}s")

    def check(self) -> None:
        """Raise CircuitOpen if a call would be refused now (changes nothing)."""
        if self.state == "open" and self.clock() < self._opened_at + self.cooldown:
            raise self._refuse()
        if self.state == "half_open" and self._probe_out:
            raise self._refuse()

    def admit(self) -> None:
        """Let one call through or raise CircuitOpen; in half-open, only the probe passes."""
        self.check()
        if self.state == "open":
            self.state = "half_open"
            log.info("breaker_half_open", generator=self.name)
        if self.state == "half_open":
            self._probe_out = True

    def success(self) -> None:
        if self.state == "half_open":
            log.info("breaker_closed", generator=self.name)
            self._outcomes.clear()
        self.state = "closed"
        self._probe_out = False
        self._consecutive = 0
        self._outcomes.append(False)

    def failure(self) -> None:
        self._consecutive += 1
        self._outcomes.append(True)
        if self.state == "half_open":
            self._open("probe_failed")
        elif self.state == "closed":
            seen = len(self._outcomes)
            rate = sum(self._outcomes) / seen
            if self._consecutive >= self.failures:
                self._open("consecutive_failures")
            elif seen >= max(self.window // 2, 1) and rate >= self.failure_rate:
                self._open("failure_rate")

    def abandon(self) -> None:
        """A call ended without an outcome (cancelled): a probe may go again."""
        self._probe_out = False

    def _open(self, reason: str) -> None:
        self.state = "open"
        self._opened_at = self.clock()
        self._probe_out = False
        log.warning("breaker_opened", generator=self.name, reason=reason,
                    consecutive=self._consecutive, cooldown_s=self.cooldown)


class GuardedGenerator:
    """Any Generator behind a semaphore and a circuit breaker; see the module docstring."""

    def __init__(self, inner: Generator, *, breaker: CircuitBreaker | None = None,
                 max_concurrency: int = 4, secrets: Iterable[str] = ()) -> None:
        self.inner = inner
        self.name = inner.name
        self.default_model = inner.default_model
        self.truncates_prompt = inner.truncates_prompt
        self.breaker = breaker or CircuitBreaker(name=inner.name)
        self.max_concurrency = max_concurrency
        self.secrets = tuple(s for s in secrets if s)
        self._slots = asyncio.Semaphore(max_concurrency)
        self.active = 0  # calls to the backend right now (for tests and health)

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        self.breaker.check()  # open: fail fast without queueing for a slot
        async with self._slots:
            self.breaker.admit()
            self.active += 1
            try:
                image = await self.inner.generate(request)
            except GenerationFailed as exc:
                if isinstance(exc, GenerationRejected):
                    self.breaker.success()  # the backend works; it said no
                else:
                    self.breaker.failure()
                if self._leaks(exc):
                    raise type(exc)(scrub(exc.message, self.secrets), code=exc.code) from None
                raise
            except asyncio.CancelledError:
                self.breaker.abandon()
                raise
            except Exception:
                self.breaker.failure()
                raise
            finally:
                self.active -= 1
        self.breaker.success()
        return image

    def _leaks(self, exc: GenerationFailed) -> bool:
        return any(s in exc.message for s in self.secrets if len(s) >= 4)

    async def aclose(self) -> None:
        await self.inner.aclose()
