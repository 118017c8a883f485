"""Benchmark: fan-out of sandboxes through our SDK and the official one (not run by the suite).

    python tests/bench/sdk_fanout.py [--n 100] [--rate 20]

Starts one server with ``--rate-limit create=<rate>/s`` and, against it, runs the same
fan-out twice: first with `fleetctl.sandboxes.AsyncSandboxClient`, then with the
official `prime_sandboxes.AsyncSandboxClient` (pointed at the server by
PRIME_API_BASE_URL / PRIME_API_KEY, HOME in a temp dir for its gateway token cache).
Each run creates n sandboxes with `asyncio.gather`, waits for them with
`bulk_wait_for_creation`, runs `echo ok` in each (gathered) and bulk-deletes them by
label. A sandbox counts as a failure if any of its steps raised (or the command did not
print ``ok``); a step is skipped for a sandbox that already failed.

Both runs do equal work, every sandbox through every step. Ours waits out a 429 by
itself; the official client raises `prime_sandboxes.APIError` ("HTTP 429: …") on a
throttled create, so here, for the official client only, each create is WRAPPED in a
retry: on a 429, and on nothing else, it sleeps 1/rate s (±50 % jitter) and sends the
create again with the same idempotency key, until a deadline of 30 s + 3·n/rate from
the start of the run (then the 429 counts as the sandbox's failure). No other retries
are added around either SDK. Requests are counted on the wire (`tests/bench/wire.py`)
by the server's rate class. Whatever is left behind is swept by label afterwards,
outside the timing. Prints figures for both and, last, one line:

    ours_s=… official_s=… ours_failures=… official_failures=… ratio=… official_429_retries=…

    ours_s, official_s    wall time of the four steps, per SDK
    *_failures            sandboxes that did not get through every step
    ratio                 ours_s / official_s: wall times of equal work when both
                          failures are 0 (said so above the line when they are not)
    official_429_retries  creates the wrapper sent again after a 429

Targets: ours_failures=0, official_failures=0, ratio ≤ 1. When n > rate the creates
alone take at least max(0, n - burst) / rate seconds for either SDK, burst = max(1, rate)
(the server's bucket holds one second of tokens and starts full). Both runs use the same
API key, hence the same server bucket: there is a pause between them.

n stays at 100 or below for the official 0.2.31 client: its `bulk_wait_for_creation`
counts RUNNING sandboxes only on the list's first page once it has seen them all, so
with more than 100 it never sees them all running and times out (measured here: 200
sandboxes all RUNNING, the wait gave up after 118 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import httpx
import prime_sandboxes

from fleetctl.sandboxes import AsyncAPIClient, AsyncSandboxClient, CreateSandboxRequest
from fleetctl.server.ratelimit import classify
from tests.bench.wire import wire_counter
from tests.conftest import start_server, stop_server

IMAGE = "python:3.11-slim"
STEPS = ("create", "wait", "exec", "delete")
#: Pause between the runs, in times the bucket's refill time max(1, 1 / rate) s: the
#: server's bucket holds one second of tokens (at least one) per API key.
REFILL_S = 1.5
#: The wrapper's deadline for one official create: this + 3 n / rate s from the run's start.
RETRY_BASE_S = 30.0


@dataclass
class Result:
    """What one SDK's fan-out did: timings, per-sandbox failures, requests on the wire."""

    name: str
    n: int
    wall_s: float = 0.0
    step_s: dict[str, float] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # sandbox index → first failed step
    errors: dict[str, str] = field(default_factory=dict)  # step → first error seen
    wire: Counter[str] = field(default_factory=Counter)
    sdk_stats: dict[str, int] | None = None
    retried_429: int | None = None  # creates the bench's wrapper sent again (official only)

    def fail(self, index: int, step: str, error: object) -> None:
        self.failed.setdefault(index, step)
        self.errors.setdefault(step, f"{type(error).__name__}: {error}"[:200])

    def live(self, ids: dict[int, str]) -> dict[int, str]:
        return {i: sandbox_id for i, sandbox_id in ids.items() if i not in self.failed}


@contextlib.contextmanager
def environment(values: dict[str, str], unset: Sequence[str] = ()) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in (*values, *unset)}
    os.environ.update(values)
    for key in unset:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rate_class(request: httpx.Request) -> str:
    return classify(request.method, request.url.path)


def is_429(exc: BaseException) -> bool:
    """Whether the official client raised for an HTTP 429 answer (and for nothing else).

    Its `APIError` keeps the `httpx.HTTPStatusError` as cause or context; the message
    ("HTTP 429: …") is the fallback.
    """
    if not isinstance(exc, prime_sandboxes.APIError):
        return False
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short; bounded against a cycle
        if seen is None:
            break
        if isinstance(seen, httpx.HTTPStatusError):
            return seen.response.status_code == 429
        seen = seen.__cause__ or seen.__context__
    return str(exc).startswith("HTTP 429")


async def timed(result: Result, step: str, work: Awaitable[None]) -> None:
    started = time.perf_counter()
    await work
    result.step_s[step] = time.perf_counter() - started


async def fan_out(
    result: Result,
    create: Callable[[int], Awaitable[str]],
    bulk_wait: Callable[[list[str]], Awaitable[object]],
    execute: Callable[[str], Awaitable[str]],
    bulk_delete: Callable[[], Awaitable[list[str]]],
) -> None:
    """The four steps, the same for both SDKs; each callable wraps one SDK method."""
    ids: dict[int, str] = {}

    async def creates() -> None:
        outcomes = await asyncio.gather(
            *(create(i) for i in range(result.n)), return_exceptions=True
        )
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                result.fail(i, "create", outcome)
            else:
                ids[i] = outcome

    async def wait() -> None:
        live = result.live(ids)
        if not live:
            return
        try:
            await bulk_wait(list(live.values()))
        except Exception as exc:  # one call for all: it tells no sandbox apart
            for i in live:
                result.fail(i, "wait", exc)

    async def commands() -> None:
        live = result.live(ids)
        outputs = await asyncio.gather(
            *(execute(sandbox_id) for sandbox_id in live.values()), return_exceptions=True
        )
        for i, output in zip(live, outputs, strict=True):
            if isinstance(output, BaseException):
                result.fail(i, "exec", output)
            elif output.strip() != "ok":
                result.fail(i, "exec", f"unexpected output {output!r}")

    async def delete() -> None:
        try:
            not_deleted = set(await bulk_delete())
        except Exception as exc:
            not_deleted = set(ids.values())
            result.errors.setdefault("delete", f"{type(exc).__name__}: {exc}"[:200])
        for i, sandbox_id in ids.items():
            if sandbox_id in not_deleted:
                result.fail(i, "delete", f"{sandbox_id} not deleted")

    started = time.perf_counter()
    for step, work in zip(STEPS, (creates, wait, commands, delete), strict=True):
        await timed(result, step, work())
    result.wall_s = time.perf_counter() - started


async def run_ours(url: str, token: str, n: int) -> Result:
    result = Result("ours", n)
    label = ["bench-ours"]
    client = AsyncSandboxClient(AsyncAPIClient(api_key=token, base_url=url))

    async def create(i: int) -> str:
        request = CreateSandboxRequest(
            name=f"ours-{i}", docker_image=IMAGE, memory_gb=0.25, labels=label
        )
        return (await client.create(request)).id

    async def execute(sandbox_id: str) -> str:
        return (await client.execute_command(sandbox_id, "echo ok")).stdout

    async def bulk_delete() -> list[str]:
        response = await client.bulk_delete(labels=label)
        return [item.get("sandbox_id", "") for item in response.failed]

    try:
        with wire_counter(result.wire, rate_class):
            await fan_out(result, create, client.bulk_wait_for_creation, execute, bulk_delete)
        result.sdk_stats = dict(client.api.stats)
    finally:
        await client.aclose()
    return result


async def run_official(url: str, token: str, n: int, rate: float, home: Path) -> Result:
    result = Result("official", n, retried_429=0)
    label = ["bench-official"]
    env = {"PRIME_API_BASE_URL": url, "PRIME_API_KEY": token, "HOME": str(home)}
    unset = ("PRIME_BASE_URL", "PRIME_TEAM_ID", "PRIME_USER_ID")
    jitter = random.Random(n)
    deadline = time.monotonic() + RETRY_BASE_S + 3 * n / rate
    with environment(env, unset):
        client = prime_sandboxes.AsyncSandboxClient()

        async def create(i: int) -> str:
            """The official create, WRAPPED in a retry on 429 (it raises on one)."""
            request = prime_sandboxes.CreateSandboxRequest(
                name=f"official-{i}",
                docker_image=IMAGE,
                memory_gb=0.25,
                labels=label,
                idempotency_key=os.urandom(16).hex(),  # the same for each retry of this create
            )
            while True:
                try:
                    return str((await client.create(request)).id)
                except prime_sandboxes.APIError as exc:
                    if not is_429(exc) or time.monotonic() >= deadline:
                        raise
                result.retried_429 = (result.retried_429 or 0) + 1
                await asyncio.sleep(jitter.uniform(0.5, 1.5) / rate)

        async def execute(sandbox_id: str) -> str:
            return str((await client.execute_command(sandbox_id, "echo ok")).stdout)

        async def bulk_delete() -> list[str]:
            response = await client.bulk_delete(labels=label)
            return [item.get("sandbox_id", "") for item in response.failed]

        try:
            with wire_counter(result.wire, rate_class):
                await fan_out(result, create, client.bulk_wait_for_creation, execute, bulk_delete)
        finally:
            await client.aclose()
    return result


async def sweep(url: str, token: str, labels: Sequence[str]) -> dict[str, int]:
    """Delete whatever either run left behind, by label, with plain httpx (untimed)."""
    left: dict[str, int] = {}
    async with httpx.AsyncClient(
        base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as api:
        for label in labels:
            for _ in range(60):  # bulk delete is itself rate limited (delete class) only if set
                response = await api.request("DELETE", "/sandbox", json={"labels": [label]})
                if response.status_code != 429:
                    break
                await asyncio.sleep(float(response.headers.get("retry-after-ms", "100")) / 1000)
            response.raise_for_status()
            left[label] = len(response.json()["succeeded"])
    return left


def report(result: Result) -> None:
    per_step = Counter(result.failed.values())
    steps = " ".join(f"{s} {result.step_s.get(s, 0.0):.2f}" for s in STEPS)
    print(f"[{result.name}] wall {result.wall_s:.2f} s ({steps})")
    print(
        f"[{result.name}] failures {len(result.failed)}/{result.n}"
        + (f" ({', '.join(f'{s}: {c}' for s, c in per_step.items())})" if per_step else "")
    )
    for step, error in result.errors.items():
        print(f"[{result.name}]   first {step} error: {error}")
    wire = result.wire
    classes = ", ".join(
        f"{cls} {wire[cls]}" + (f" ({wire[f'{cls}_429']} × 429)" if wire[f"{cls}_429"] else "")
        for cls in ("create", "list", "exec", "delete", "default")
        if wire[cls]
    )
    print(
        f"[{result.name}] HTTP requests {wire['requests']} ({classes}); 429s {wire['429']}, "
        f"5xx {wire['5xx']}, transport errors {wire['transport_errors']}"
    )
    if result.retried_429 is not None:
        print(
            f"[{result.name}] creates WRAPPED by this bench in a retry on 429 (the SDK raises "
            f"on one): {result.retried_429} sent again"
        )
    done = result.n - len(result.failed)
    if done:
        each_ms = result.wall_s / done * 1000
        print(f"[{result.name}] {done} sandboxes through all steps: {each_ms:.0f} ms each")
    if result.sdk_stats is not None:
        stats = result.sdk_stats
        print(
            f"[{result.name}] client.api.stats: requests {stats['requests']}, "
            f"retries {stats['retries']}, throttled {stats['throttled']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="sandboxes per SDK (default 100)")
    parser.add_argument("--rate", type=float, default=20, help="server create limit per second")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    base = Path(tempfile.mkdtemp(prefix="fleetctl-fanout-", dir="/tmp"))
    base.chmod(0o711)
    home = Path(tempfile.mkdtemp(prefix="fleetctl-fanout-home-", dir="/tmp"))
    process: subprocess.Popen[bytes] | None = None
    try:
        info, process = start_server(base / "data", "--rate-limit", f"create={args.rate:g}/s")
        url, token = info.url, info.token
        try:
            ours = asyncio.run(run_ours(url, token, args.n))
            # same API key: let the create bucket refill for official
            time.sleep(REFILL_S * max(1.0, 1.0 / args.rate))
            official = asyncio.run(run_official(url, token, args.n, args.rate, home))
        finally:
            leftovers = asyncio.run(sweep(url, token, ["bench-ours", "bench-official"]))
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    print(
        f"n={args.n} per SDK, server --rate-limit create={args.rate:g}/s, {os.cpu_count()} CPUs, "
        f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    report(ours)
    report(official)
    print(f"left behind and swept after the runs: {leftovers}")
    burst = max(1.0, args.rate)  # the server's bucket: one second of tokens, full at start
    floor = max(0.0, args.n - burst) / args.rate  # a full bucket, then `rate` a second
    print(
        f"floor of the create step for {args.n} creates at {args.rate:g}/s "
        f"(burst {burst:g}): {floor:.2f} s, for either SDK"
    )
    if ours.failed or official.failed:
        print(
            f"NOT equal work: {len(ours.failed)} (ours) and {len(official.failed)} (official) "
            "sandboxes failed a step, so the ratio compares different amounts of work"
        )
    else:
        print(f"equal work: both SDKs took all {args.n} sandboxes through every step")
    ratio = ours.wall_s / official.wall_s
    print(
        f"ours_s={ours.wall_s:.2f} official_s={official.wall_s:.2f} "
        f"ours_failures={len(ours.failed)} official_failures={len(official.failed)} "
        f"ratio={ratio:.2f} official_429_retries={official.retried_429}"
    )


if __name__ == "__main__":
    main()
