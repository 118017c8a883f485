"""Rate limits for the local sandbox server: a pure ASGI middleware, configured by one flag.

``--rate-limit 'create=10/s,default=200/s'`` (`parse_rate_limits`, `RateLimitMiddleware`)
    Token buckets per endpoint class and API key. Classes (see `classify`):

        create   POST   /api/v1/sandbox
        list     GET    /api/v1/sandbox
        delete   DELETE /api/v1/sandbox...
        exec     POST   /gw/{user_ns}/{job_id}/exec
        default  every other request under /api/v1 or /gw

    Rates are ``N/s`` or ``N/m``. A class without its own rate borrows ``default``'s
    (in a bucket of its own); with no ``default`` it is unlimited. A bucket holds one
    second's worth of tokens, at least one. The API key is the bearer token; requests
    without one share a bucket. An empty bucket answers 429 with ``Retry-After``
    (whole seconds, rounded up) and ``retry-after-ms`` (milliseconds, rounded up).

Health and paths outside the API planes are never limited (`fleetctl.server.asgi`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetctl.server.asgi import SANDBOX_PATH, bearer, pairs, plane, under

RateClass = Literal["create", "exec", "list", "delete", "default"]
RATE_CLASSES: tuple[RateClass, ...] = get_args(RateClass)
_RATE_CLASS_BY_NAME: dict[str, RateClass] = {name: name for name in RATE_CLASSES}
_TOKEN_TOLERANCE = 1e-9


@dataclass(frozen=True, slots=True)
class Rate:
    """A request rate: `count` requests per second (``s``) or per minute (``m``)."""

    count: float
    unit: Literal["s", "m"]

    @property
    def per_second(self) -> float:
        """The rate in requests per second."""
        return self.count if self.unit == "s" else self.count / 60

    def __str__(self) -> str:
        return f"{self.count:g}/{self.unit}"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Rates by endpoint class, as given to ``--rate-limit``; no rates means no limits."""

    rates: Mapping[RateClass, Rate] = field(default_factory=dict)

    def rate_for(self, cls: RateClass) -> Rate | None:
        """The rate that applies to `cls`: its own, else ``default``'s, else None (unlimited)."""
        return self.rates.get(cls, self.rates.get("default"))


def parse_rate_limits(text: str) -> RateLimits:
    """Parse a ``--rate-limit`` value such as ``'create=10/s,default=200/s'``.

    Returns empty `RateLimits` for an empty or blank string. Raises ValueError with a
    one-line message naming every bad item (unknown class, bad rate, repeated class).
    """
    problems: list[str] = []
    rates: dict[RateClass, Rate] = {}
    for key, value in pairs(text, problems):
        cls = _RATE_CLASS_BY_NAME.get(key)
        rate = _parse_rate(value)
        if cls is None:
            problems.append(f"unknown class {key!r} (expected one of {', '.join(RATE_CLASSES)})")
        elif rate is None:
            problems.append(f"bad rate {value!r} for {key} (expected N/s or N/m with N > 0)")
        else:
            rates[cls] = rate
    if problems:
        raise ValueError("invalid rate limits: " + "; ".join(problems))
    return RateLimits(rates)


def _parse_rate(text: str) -> Rate | None:
    count_text, _, unit = text.partition("/")
    try:
        count = float(count_text)
    except ValueError:
        return None
    if not (math.isfinite(count) and count > 0):
        return None
    if unit == "s":
        return Rate(count, "s")
    if unit == "m":
        return Rate(count, "m")
    return None


def classify(method: str, path: str) -> RateClass:
    """The rate class of a request: create, exec, list, delete or default.

    `method` is upper case, as in the ASGI scope. Says nothing about whether the path
    is limited at all: health and non-API paths never are (see the module docstring).
    """
    if path.rstrip("/") == SANDBOX_PATH and method in ("POST", "GET"):
        return "create" if method == "POST" else "list"
    if method == "DELETE" and under(path, SANDBOX_PATH):
        return "delete"
    parts = path.strip("/").split("/")
    if method == "POST" and len(parts) == 4 and parts[0] == "gw" and parts[3] == "exec":
        return "exec"
    return "default"


@dataclass(slots=True)
class _Bucket:
    """Tokens available to one (class, API key); refilled lazily on each request."""

    per_second: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take a token if one is there: returns 0.0, else the seconds until one will be."""
        elapsed = now - self.updated
        self.tokens = min(self.capacity, self.tokens + elapsed * self.per_second)
        self.updated = now
        # Within float noise of a whole token counts as one: a client that waited exactly
        # the promised retry-after-ms must not be refused over a rounding error.
        if self.tokens >= 1 - _TOKEN_TOLERANCE:
            self.tokens = max(0.0, self.tokens - 1)
            return 0.0
        return (1 - self.tokens) / self.per_second


class RateLimitMiddleware:
    """Answer 429 to API requests beyond their class's rate, per API key.

    `clock` must be monotonic, in seconds; tests pass a fake one. Buckets are kept for
    every API key ever seen, which is fine for a local server with a handful of keys.
    The wrapped app is not called for a throttled request.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: RateLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.limits = limits
        self._clock = clock
        self._buckets: dict[tuple[RateClass, str], _Bucket] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or plane(scope["path"]) is None:
            await self.app(scope, receive, send)
            return
        cls = classify(scope["method"], scope["path"])
        rate = self.limits.rate_for(cls)
        if rate is None:
            await self.app(scope, receive, send)
            return
        # No await between reading and updating the bucket, so concurrent requests on
        # the event loop cannot both take the last token; no lock needed.
        now = self._clock()
        key = (cls, bearer(scope))
        bucket = self._buckets.get(key)
        if bucket is None:
            capacity = max(1.0, rate.per_second)
            bucket = self._buckets[key] = _Bucket(rate.per_second, capacity, capacity, now)
        wait = bucket.take(now)
        if wait == 0.0:
            await self.app(scope, receive, send)
            return
        # Round up: a client that waits exactly this long must find a token.
        wait_ms = max(1, math.ceil(wait * 1000))
        response = JSONResponse(
            {"detail": f"rate limit exceeded for {cls} ({rate}); retry after {wait_ms / 1000:g}s"},
            status_code=429,
            headers={"Retry-After": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(wait_ms)},
        )
        await response(scope, receive, send)
