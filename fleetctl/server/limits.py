"""Rate limits and fault injection for the local sandbox server.

Two pure ASGI middlewares, each configured by one server flag.

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

``--faults 'error=0.1,reset=0.05,latency=50ms..2s,kill_sandbox=0.01,seed=7,scope=all'``
    (`parse_faults`, `FaultMiddleware`) Chaos for exercising clients. Per eligible
    request: a delay drawn from ``latency``; with probability ``kill_sandbox``, the
    server's callback kills a random sandbox; then with probability ``error`` a 500,
    502 or 503, or with probability ``reset`` a connection dropped mid-response. Both
    happen *before* the request reaches the app, so a faulted request did no work and
    a retry is safe. ``scope`` picks the eligible requests: ``control`` (/api/v1),
    ``data`` (/gw) or ``all``. One ``random.Random(seed)`` decides everything, so the
    same request sequence replays the same faults.

Neither middleware touches /api/v1/health or paths outside /api/v1 and /gw (docs,
OpenAPI): readiness probes and docs keep working, and probes, whose number depends on
timing, do not shift the fault sequence.

Install `FaultMiddleware` outside `RateLimitMiddleware` (with Starlette's
``add_middleware``, add it last) so every request draws from the fault sequence
whether or not it is throttled, keeping replays independent of the clock.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

RateClass = Literal["create", "exec", "list", "delete", "default"]
FaultScope = Literal["all", "control", "data"]
Plane = Literal["control", "data"]

RATE_CLASSES: tuple[RateClass, ...] = get_args(RateClass)
FAULT_SCOPES: tuple[FaultScope, ...] = get_args(FaultScope)
#: Statuses an injected error answers with, all of which a client should retry.
ERROR_STATUSES = (500, 502, 503)

CONTROL_PREFIX = "/api/v1"
DATA_PREFIX = "/gw"
HEALTH_PATH = "/api/v1/health"
SANDBOX_PATH = "/api/v1/sandbox"

_RATE_CLASS_BY_NAME: dict[str, RateClass] = {name: name for name in RATE_CLASSES}
_FAULT_SCOPE_BY_NAME: dict[str, FaultScope] = {name: name for name in FAULT_SCOPES}
_TOKEN_TOLERANCE = 1e-9
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s)")


# --- rate limits -----------------------------------------------------------------------


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
    for key, value in _pairs(text, problems):
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
    if method == "DELETE" and _under(path, SANDBOX_PATH):
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
        if scope["type"] != "http" or _plane(scope["path"]) is None:
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
        key = (cls, _api_key(scope))
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


def _api_key(scope: Scope) -> str:
    """The bearer token of the request, or "" for requests without one."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


# --- faults ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Fault probabilities and settings, as given to ``--faults``; the default injects none.

    `error` and `reset` are exclusive outcomes of one draw, so `error + reset` must not
    exceed 1; `parse_faults` checks this and every range, the constructor does not.
    `latency` is a (low, high) range in seconds; (0, 0) means no delay.
    """

    error: float = 0.0
    reset: float = 0.0
    latency: tuple[float, float] = (0.0, 0.0)
    kill_sandbox: float = 0.0
    seed: int = 0
    scope: FaultScope = "all"


def parse_faults(text: str) -> FaultConfig:
    """Parse a ``--faults`` value such as ``'error=0.1,latency=50ms..2s,seed=7'``.

    Keys: error, reset, kill_sandbox (probabilities in [0, 1]); latency (``50ms..2s``
    or a single ``100ms``; units ms and s); seed (int); scope (all, control, data).
    Returns `FaultConfig()` for an empty or blank string. Raises ValueError with a
    one-line message naming every bad item.
    """
    problems: list[str] = []
    probabilities = {"error": 0.0, "reset": 0.0, "kill_sandbox": 0.0}
    latency = (0.0, 0.0)
    seed = 0
    scope: FaultScope = "all"
    for key, value in _pairs(text, problems):
        if key in probabilities:
            probability = _parse_probability(value)
            if probability is None:
                problems.append(f"bad probability {value!r} for {key} (expected 0..1)")
            else:
                probabilities[key] = probability
        elif key == "latency":
            parsed = _parse_latency(value)
            if parsed is None:
                problems.append(
                    f"bad latency {value!r} (expected LOW..HIGH or one value, units ms or s,"
                    " LOW <= HIGH)"
                )
            else:
                latency = parsed
        elif key == "seed":
            try:
                seed = int(value)
            except ValueError:
                problems.append(f"bad seed {value!r} (expected an integer)")
        elif key == "scope":
            parsed_scope = _FAULT_SCOPE_BY_NAME.get(value)
            if parsed_scope is None:
                problems.append(f"bad scope {value!r} (expected one of {', '.join(FAULT_SCOPES)})")
            else:
                scope = parsed_scope
        else:
            problems.append(
                f"unknown key {key!r} (expected error, reset, latency, kill_sandbox, seed or scope)"
            )
    if probabilities["error"] + probabilities["reset"] > 1:
        problems.append("error + reset must not exceed 1")
    if problems:
        raise ValueError("invalid faults: " + "; ".join(problems))
    return FaultConfig(
        error=probabilities["error"],
        reset=probabilities["reset"],
        latency=latency,
        kill_sandbox=probabilities["kill_sandbox"],
        seed=seed,
        scope=scope,
    )


def _parse_probability(text: str) -> float | None:
    try:
        probability = float(text)
    except ValueError:
        return None
    return probability if 0 <= probability <= 1 else None


def _parse_latency(text: str) -> tuple[float, float] | None:
    low_text, sep, high_text = text.partition("..")
    low = _parse_duration(low_text)
    high = _parse_duration(high_text) if sep else low
    if low is None or high is None or low > high:
        return None
    return low, high


def _parse_duration(text: str) -> float | None:
    """Seconds in ``'50ms'`` or ``'2s'``, or None if `text` is neither."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        return None
    number, unit = match.groups()
    return float(number) / 1000 if unit == "ms" else float(number)


@dataclass(slots=True)
class FaultStats:
    """How many eligible requests `FaultMiddleware` saw and what it injected into them.

    Updated in place as requests arrive; ``dataclasses.asdict`` gives a JSON-ready dict.
    """

    requests: int = 0
    error: int = 0
    reset: int = 0
    latency: int = 0
    kill_sandbox: int = 0


@dataclass(frozen=True, slots=True)
class _Decision:
    """Everything `FaultMiddleware` does to one request, decided up front."""

    latency: float
    kill_seed: int | None  # seeds the Random handed to the kill callback; None: no kill
    fault: Literal["error", "reset"] | None
    status: int  # the status of an injected error; meaningless for other faults


class InjectedReset(Exception):
    """Raised by `FaultMiddleware` mid-response so the server drops the connection.

    Servers log it as an application error; it is not a bug.
    """


class FaultMiddleware:
    """Inject errors, connection resets, latency and sandbox kills into API requests.

    `kill_random_sandbox` is called with a `random.Random` for choosing the victim; it
    must cope with there being nothing to kill, since its errors reach the client as
    500s. Without it, ``kill_sandbox`` faults are neither performed nor counted.
    `sleep` is the only real wait; tests pass a recorder. Faults are counted in `stats`.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: FaultConfig,
        kill_random_sandbox: Callable[[random.Random], Awaitable[None]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.app = app
        self.config = config
        self.stats = FaultStats()
        self._kill_random_sandbox = kill_random_sandbox
        self._sleep = sleep
        self._rng = random.Random(config.seed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plane = _plane(scope["path"]) if scope["type"] == "http" else None
        if plane is None or self.config.scope not in ("all", plane):
            await self.app(scope, receive, send)
            return
        # Decide before the first await: requests then draw from the sequence in the
        # order they arrive, which is what makes a run replayable.
        decision = self._decide()
        self.stats.requests += 1
        if decision.latency > 0:
            self.stats.latency += 1
            await self._sleep(decision.latency)
        if decision.kill_seed is not None and self._kill_random_sandbox is not None:
            self.stats.kill_sandbox += 1
            await self._kill_random_sandbox(random.Random(decision.kill_seed))
        if decision.fault == "error":
            self.stats.error += 1
            response = JSONResponse(
                {"detail": f"injected fault: HTTP {decision.status}; the request was not handled"},
                status_code=decision.status,
            )
            await response(scope, receive, send)
        elif decision.fault == "reset":
            self.stats.reset += 1
            await _reset(send)
        else:
            await self.app(scope, receive, send)

    def _decide(self) -> _Decision:
        config = self.config
        rng = self._rng
        # The same draws in the same order for every request, whatever is configured,
        # so changing one probability does not reshuffle when the other faults strike.
        latency_draw = rng.random()
        kill_draw = rng.random()
        kill_seed = rng.getrandbits(64)
        fault_draw = rng.random()
        status_draw = rng.random()
        low, high = config.latency
        fault: Literal["error", "reset"] | None = None
        if fault_draw < config.error:
            fault = "error"
        elif fault_draw < config.error + config.reset:
            fault = "reset"
        return _Decision(
            latency=low + latency_draw * (high - low),
            kill_seed=kill_seed if kill_draw < config.kill_sandbox else None,
            fault=fault,
            status=ERROR_STATUSES[int(status_draw * len(ERROR_STATUSES))],
        )


async def _reset(send: Send) -> None:
    """Start a response, send half its body, then raise so the server cuts the connection.

    The Content-Length promises the whole body, so the client sees an incomplete
    response (httpx: RemoteProtocolError) rather than a short but valid one.
    """
    body = b'{"detail": "injected fault: connection reset"}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
    raise InjectedReset("injected fault: connection reset")


# --- shared ----------------------------------------------------------------------------


def _pairs(text: str, problems: list[str]) -> Iterator[tuple[str, str]]:
    """Yield the pairs in ``'k=v,k=v'``, noting malformed and repeated items in `problems`.

    Lazy, so the caller's problems and these stay in the order the items were written.
    """
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not (sep and key):
            problems.append(f"{item!r} is not KEY=VALUE")
        elif key in seen:
            problems.append(f"{key!r} is given more than once")
        else:
            seen.add(key)
            yield key, value


def _plane(path: str) -> Plane | None:
    """Which API plane `path` belongs to; None for health and non-API paths."""
    if path.rstrip("/") == HEALTH_PATH:
        return None
    if _under(path, CONTROL_PREFIX):
        return "control"
    if _under(path, DATA_PREFIX):
        return "data"
    return None


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")
