"""Retry policy of the SDK's transport, one place for both the sync and async clients.

Idempotent calls are retried on connect errors, resets, 500/502/503/504, and a
2xx whose JSON body does not parse (a response garbled on the way), with
exponential backoff and full jitter; a create is retried only because it always
carries an idempotency key. A 429 waits for Retry-After (or backs off) and does
not count as a failed attempt; everything stops at the total `timeout`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
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
    #: The response body is read whole (not streamed to a file), so it can be checked.
    read: bool = True
    failures: int = 0
    throttled: int = 0
    started: float = field(default_factory=time.monotonic)

    def after_response(self, response: httpx.Response) -> float | None:
        """Seconds to wait before trying again, or None to hand the response back."""
        if response.status_code == 429:
            self.throttled += 1
            return self._within_deadline(retry_after(response) or self._next_backoff())
        if response.status_code in RETRY_STATUSES and self.retryable:
            return self._failure()
        if self.read and self.retryable and response.is_success and garbled(response):
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


def garbled(response: httpx.Response) -> bool:
    """A JSON response whose body does not parse."""
    if "json" not in response.headers.get("content-type", "") or not response.content:
        return False
    try:
        json.loads(response.content)
    except ValueError:
        return True
    return False


def retry_after(response: httpx.Response) -> float | None:
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


@dataclass(slots=True)
class _Lane:
    rate: float | None = None  # requests/s once throttled; None: not paced yet
    next_at: float = 0.0
    adjusted_at: float = float("-inf")
    successes: list[float] = field(default_factory=list)


class Pacer:
    """Adaptive pacing shared by every request of one client, per endpoint class.

    Until the first 429 nothing is paced (the server's burst is used). A 429 sets
    the rate from the last second's successes (a token bucket holds one second of
    tokens) and every later send of that class takes the next free slot, so many
    waiting calls do not all come back at the same instant and meet another 429.
    A 429 more than a second after the last adjustment slows down by 15%; each
    second of successes speeds up a little.
    """

    SLOWDOWN = 0.85
    SPEEDUP_PER_SECOND = 0.5

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lanes: dict[str, _Lane] = {}

    def reserve(self, lane_name: str) -> float:
        """Seconds to wait before sending; claims the slot (no await in between)."""
        lane = self._lanes.setdefault(lane_name, _Lane())
        if lane.rate is None:
            return 0.0
        now = self._clock()
        at = max(now, lane.next_at)
        lane.next_at = at + 1.0 / lane.rate
        return at - now

    def throttled(self, lane_name: str, retry_after: float | None) -> None:
        lane = self._lanes.setdefault(lane_name, _Lane())
        now = self._clock()
        recent = [t for t in lane.successes if now - t <= 1.0]
        # 429s of requests sent before the last adjustment say nothing new about it
        if now - lane.adjusted_at > 1.0:
            if lane.rate is None:
                # a drained token bucket's Retry-After is about 1/rate; the last
                # second's successes are about its size (the burst)
                hinted = 1.0 / retry_after if retry_after else 0.0
                lane.rate = max(1.0, float(len(recent)), hinted)
            else:
                lane.rate = max(0.5, lane.rate * self.SLOWDOWN)
            lane.adjusted_at = now
        assert lane.rate is not None
        lane.next_at = max(lane.next_at, now + (retry_after or 1.0 / lane.rate))

    def succeeded(self, lane_name: str) -> None:
        lane = self._lanes.setdefault(lane_name, _Lane())
        now = self._clock()
        if lane.rate is not None and lane.successes:
            lane.rate += self.SPEEDUP_PER_SECOND * min(1.0, now - lane.successes[-1])
        lane.successes = [t for t in lane.successes if now - t <= 1.0] + [now]


def lane(method: str, path: str) -> str:
    """The endpoint class a request is paced in (as servers rate-limit them)."""
    if method == "POST" and path.rstrip("/").endswith("/sandbox"):
        return "create"
    return "exec" if path.endswith("/exec") else "default"
