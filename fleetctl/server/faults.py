"""Fault injection for the local sandbox server: a pure ASGI middleware, configured by one flag.

``--faults 'error=0.1,reset=0.05,after=0.05,latency=50ms..2s,kill_sandbox=0.01,seed=7'``
    Chaos for exercising clients. Per eligible request: a delay drawn from ``latency``;
    with probability ``kill_sandbox``, the server's callback kills a random sandbox;
    then with probability ``error`` a 500, 502 or 503, or with probability ``reset`` a
    connection dropped mid-response. Both happen *before* the request reaches the app,
    so a faulted request did no work and a retry is safe. Otherwise, with probability
    ``after``, the request *is* handled and then its response is lost: half the time
    the connection is cut mid-response (as ``reset`` does), half the time a 200 arrives
    whose JSON body is garbage (a response that is not JSON, a download, is cut).
    That is what a flaky network does to a request the server committed, and the only
    way a retried create meets its own idempotency key.

    ``scope`` picks the eligible requests: ``control`` (/api/v1), ``data`` (/gw) or
    ``all``. One ``random.Random(seed)`` decides error, reset, latency and kills, and a
    second stream of the same seed decides ``after``, so the same request sequence
    replays the same faults, and adding ``after`` leaves the others where they were.

Faults are counted per API key (`FaultMiddleware.stats`, by `asgi.key_id`): a test
harness polling with a key of its own does not count as the client under test.
Health and paths outside the API planes are never faulted, so probes, whose number
depends on timing, do not shift the fault sequence.

Install `FaultMiddleware` outside `RateLimitMiddleware` (with Starlette's
``add_middleware``, add it last) so every request draws from the fault sequence
whether or not it is throttled, keeping replays independent of the clock.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Literal, NoReturn, get_args

import anyio
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetctl.server.asgi import bearer, key_id, pairs, plane

FaultScope = Literal["all", "control", "data"]
FAULT_SCOPES: tuple[FaultScope, ...] = get_args(FaultScope)
_FAULT_SCOPE_BY_NAME: dict[str, FaultScope] = {name: name for name in FAULT_SCOPES}
#: Statuses an injected error answers with, all of which a client should retry.
ERROR_STATUSES = (500, 502, 503)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s)")
GARBLED_BODY = b"\x00injected fault: this response was garbled after the request was handled"


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Fault probabilities and settings, as given to ``--faults``; the default injects none.

    `error` and `reset` are exclusive outcomes of one draw, so `error + reset` must not
    exceed 1; `parse_faults` checks this and every range, the constructor does not.
    `after` applies to requests neither errored nor reset. `latency` is a (low, high)
    range in seconds; (0, 0) means no delay.
    """

    error: float = 0.0
    reset: float = 0.0
    after: float = 0.0
    latency: tuple[float, float] = (0.0, 0.0)
    kill_sandbox: float = 0.0
    seed: int = 0
    scope: FaultScope = "all"


def parse_faults(text: str) -> FaultConfig:
    """Parse a ``--faults`` value such as ``'error=0.1,latency=50ms..2s,seed=7'``.

    Keys: error, reset, after, kill_sandbox (probabilities in [0, 1]); latency (``50ms..2s``
    or a single ``100ms``; units ms and s); seed (int); scope (all, control, data).
    Returns `FaultConfig()` for an empty or blank string. Raises ValueError with a
    one-line message naming every bad item.
    """
    problems: list[str] = []
    probabilities = {"error": 0.0, "reset": 0.0, "after": 0.0, "kill_sandbox": 0.0}
    latency = (0.0, 0.0)
    seed = 0
    scope: FaultScope = "all"
    for key, value in pairs(text, problems):
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
                f"unknown key {key!r} (expected error, reset, after, latency, kill_sandbox, "
                "seed or scope)"
            )
    if probabilities["error"] + probabilities["reset"] > 1:
        problems.append("error + reset must not exceed 1")
    if problems:
        raise ValueError("invalid faults: " + "; ".join(problems))
    return FaultConfig(
        error=probabilities["error"],
        reset=probabilities["reset"],
        after=probabilities["after"],
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
    """How many eligible requests of one API key `FaultMiddleware` saw, and what it
    injected into them. ``dataclasses.asdict`` gives a JSON-ready dict."""

    requests: int = 0
    error: int = 0
    reset: int = 0
    after: int = 0
    latency: int = 0
    kill_sandbox: int = 0

    def add(self, other: FaultStats) -> None:
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True, slots=True)
class _Decision:
    """Everything `FaultMiddleware` does to one request, decided up front."""

    latency: float
    kill_seed: int | None  # seeds the Random handed to the kill callback; None: no kill
    fault: Literal["error", "reset"] | None
    status: int  # the status of an injected error; meaningless for other faults
    after: Literal["drop", "garble"] | None = None  # what happens to the handled response


class InjectedReset(Exception):
    """Raised by `FaultMiddleware` mid-response so the server drops the connection.

    Servers log it as an application error; it is not a bug.
    """


class FaultMiddleware:
    """Inject errors, connection resets, lost responses, latency and sandbox kills into
    API requests.

    `kill_random_sandbox` is called with a `random.Random` for choosing the victim; it
    must cope with there being nothing to kill, since its errors reach the client as
    500s. Without it, ``kill_sandbox`` faults are neither performed nor counted.
    `sleep` is the only real wait; tests pass a recorder. Faults are counted per API key
    in `stats`; `total()` adds them up.
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
        self.stats: dict[str, FaultStats] = {}
        self._kill_random_sandbox = kill_random_sandbox
        self._sleep = sleep
        self._rng = random.Random(config.seed)
        self._after_rng = random.Random(f"after:{config.seed}")

    def total(self) -> FaultStats:
        total = FaultStats()
        for stats in self.stats.values():
            total.add(stats)
        return total

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        where = plane(scope["path"]) if scope["type"] == "http" else None
        if where is None or self.config.scope not in ("all", where):
            await self.app(scope, receive, send)
            return
        # Decide before the first await: requests then draw from the sequence in the
        # order they arrive, which is what makes a run replayable.
        decision = self._decide()
        stats = self.stats.setdefault(key_id(bearer(scope)), FaultStats())
        stats.requests += 1
        if decision.latency > 0:
            stats.latency += 1
            await self._sleep(decision.latency)
        if decision.kill_seed is not None and self._kill_random_sandbox is not None:
            stats.kill_sandbox += 1
            await self._kill_random_sandbox(random.Random(decision.kill_seed))
        if decision.fault == "error":
            stats.error += 1
            response = JSONResponse(
                {"detail": f"injected fault: HTTP {decision.status}; the request was not handled"},
                status_code=decision.status,
            )
            await response(scope, receive, send)
        elif decision.fault == "reset":
            stats.reset += 1
            await _reset(send)
        elif decision.after is not None:
            stats.after += 1
            answered = _Answer()
            await self.app(scope, receive, answered)
            if decision.after == "drop" or not answered.json:  # only JSON is garbled
                await _reset(send)  # uvicorn would turn a bare raise into a 500
            await Response(GARBLED_BODY, media_type="application/json")(scope, receive, send)
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
        after_draw, garble_draw = self._after_rng.random(), self._after_rng.random()
        low, high = config.latency
        fault: Literal["error", "reset"] | None = None
        if fault_draw < config.error:
            fault = "error"
        elif fault_draw < config.error + config.reset:
            fault = "reset"
        after: Literal["drop", "garble"] | None = None
        if fault is None and after_draw < config.after:
            after = "garble" if garble_draw < 0.5 else "drop"
        return _Decision(
            latency=low + latency_draw * (high - low),
            kill_seed=kill_seed if kill_draw < config.kill_sandbox else None,
            fault=fault,
            status=ERROR_STATUSES[int(status_draw * len(ERROR_STATUSES))],
            after=after,
        )


class _Answer:
    """A `send` that loses what the app answers (the request was still handled), noting
    only whether the answer was JSON."""

    def __init__(self) -> None:
        self.json = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self.json = b"json" in headers.get(b"content-type", b"")


async def _reset(send: Send) -> NoReturn:
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
