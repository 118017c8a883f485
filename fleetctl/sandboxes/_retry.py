"""Retry policy of the SDK's transport, one place for both the sync and async clients.

Idempotent calls are retried on connect errors, resets and 500/502/503/504 with
exponential backoff and full jitter; a create is retried only because it always
carries an idempotency key. A 429 waits for Retry-After (or backs off) and does
not count as a failed attempt; everything stops at the total `timeout`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import httpx

#: Statuses retried for idempotent calls and keyed creates. 500 is included: a
#: create carries its idempotency key, so retrying it can never make a second sandbox.
RETRY_STATUSES = frozenset({500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Named like stamina's settings: attempts, timeout, wait_initial, wait_max, wait_jitter."""

    attempts: int = 6
    timeout: float = 300.0
    wait_initial: float = 0.1
    wait_max: float = 5.0
    wait_jitter: float = 1.0

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(wait_max, wait_initial * 2**failures)]."""
        cap = min(self.wait_max, self.wait_initial * 2**failures)
        return rng.uniform(0, cap * self.wait_jitter)


@dataclass(slots=True)
class RetryState:
    """Decides, after each outcome of one logical call, whether and how long to wait."""

    policy: RetryPolicy
    retryable: bool
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    throttled: int = 0
    started: float = field(default_factory=time.monotonic)

    def after_response(self, response: httpx.Response) -> float | None:
        """Seconds to wait before trying again, or None to hand the response back."""
        if response.status_code == 429:
            self.throttled += 1
            return self._within_deadline(_retry_after(response) or self._next_backoff())
        if response.status_code in RETRY_STATUSES and self.retryable:
            return self._failure()
        return None

    def after_error(self, error: httpx.TransportError) -> float | None:
        """Seconds to wait after a transport error, or None to give up and raise it."""
        if isinstance(error, httpx.TimeoutException) and not isinstance(
            error, httpx.ConnectTimeout | httpx.PoolTimeout
        ):
            return None  # the request may have been processed; a read timeout is final
        if not self.retryable and not isinstance(error, httpx.ConnectError):
            return None
        return self._failure()

    def _failure(self) -> float | None:
        self.failures += 1
        if self.failures >= self.policy.attempts:
            return None
        return self._within_deadline(self._next_backoff())

    def _next_backoff(self) -> float:
        return self.policy.backoff(self.failures, self.rng)

    def _within_deadline(self, wait: float) -> float | None:
        if time.monotonic() + wait - self.started > self.policy.timeout:
            return None
        return wait


def _retry_after(response: httpx.Response) -> float | None:
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None
