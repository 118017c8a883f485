"""Benchmark: fan-out of sandboxes through our SDK and the official one (not run by the suite).

    python tests/bench/sdk_fanout.py [--n 200] [--rate 20]

Starts one server with ``--rate-limit create=<rate>/s`` and, against it, runs the same
fan-out twice: first with `fleetctl.sandboxes.AsyncSandboxClient`, then with the
official `prime_sandboxes.AsyncSandboxClient` (pointed at the server by
PRIME_API_BASE_URL / PRIME_API_KEY, HOME in a temp dir for its gateway token cache).
Each run creates n sandboxes with `asyncio.gather`, waits for them with
`bulk_wait_for_creation`, runs `echo ok` in each (gathered) and bulk-deletes them by
label. A sandbox counts as a failure if any of its steps raised (or the command did not
print ``ok``); a step is skipped for a sandbox that already failed. No retries are added
around either SDK. Whatever is left behind is swept by label afterwards, outside the
timing. Prints figures for both and, last, one line:

    ours_s=… official_s=… ours_failures=… official_failures=… ratio=…

with ratio = ours_s / official_s. Target: ours_failures=0 and ratio ≤ 1. Read it
with the lines above it: when n > rate, the creates alone take at least
(n - rate) / rate seconds for a client that makes them all, while the official SDK
fails its throttled creates at once and goes on with fewer sandboxes; "ms each"
(wall per sandbox that went through every step) compares equal work. Both runs use
the same API key, hence the same server bucket: there is a pause between them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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
from tests.conftest import start_server, stop_server

IMAGE = "python:3.11-slim"
STEPS = ("create", "wait", "exec", "delete")
#: Pause between the runs: the server's bucket holds one second of tokens per API key.
REFILL_S = 1.5


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

    def fail(self, index: int, step: str, error: object) -> None:
        self.failed.setdefault(index, step)
        self.errors.setdefault(step, f"{type(error).__name__}: {error}"[:200])

    def live(self, ids: dict[int, str]) -> dict[int, str]:
        return {i: sandbox_id for i, sandbox_id in ids.items() if i not in self.failed}


@contextlib.contextmanager
def wire_counter(counter: Counter[str]) -> Iterator[None]:
    """Count every HTTP request either SDK sends, by the server's rate class and status.

    Patches `httpx.AsyncHTTPTransport` (both SDKs use it underneath) rather than passing
    a transport, which would change the clients' connection limits.
    """
    original = httpx.AsyncHTTPTransport.handle_async_request

    async def counted(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        cls = classify(request.method, request.url.path)
        counter["requests"] += 1
        counter[cls] += 1
        try:
            response = await original(self, request)
        except httpx.TransportError:
            counter["transport_errors"] += 1
            raise
        if response.status_code == 429:
            counter["429"] += 1
            counter[f"{cls}_429"] += 1
        return response

    setattr(httpx.AsyncHTTPTransport, "handle_async_request", counted)  # noqa: B010
    try:
        yield
    finally:
        setattr(httpx.AsyncHTTPTransport, "handle_async_request", original)  # noqa: B010


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
        with wire_counter(result.wire):
            await fan_out(result, create, client.bulk_wait_for_creation, execute, bulk_delete)
        result.sdk_stats = dict(client.api.stats)
    finally:
        await client.aclose()
    return result


async def run_official(url: str, token: str, n: int, home: Path) -> Result:
    result = Result("official", n)
    label = ["bench-official"]
    env = {"PRIME_API_BASE_URL": url, "PRIME_API_KEY": token, "HOME": str(home)}
    unset = ("PRIME_BASE_URL", "PRIME_TEAM_ID", "PRIME_USER_ID")
    with environment(env, unset):
        client = prime_sandboxes.AsyncSandboxClient()

        async def create(i: int) -> str:
            request = prime_sandboxes.CreateSandboxRequest(
                name=f"official-{i}", docker_image=IMAGE, memory_gb=0.25, labels=label
            )
            return (await client.create(request)).id

        async def execute(sandbox_id: str) -> str:
            return (await client.execute_command(sandbox_id, "echo ok")).stdout

        async def bulk_delete() -> list[str]:
            response = await client.bulk_delete(labels=label)
            return [item.get("sandbox_id", "") for item in response.failed]

        try:
            with wire_counter(result.wire):
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
        f"[{result.name}] HTTP requests {wire['requests']} ({classes}); "
        f"429s {wire['429']}, transport errors {wire['transport_errors']}"
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
    parser.add_argument("--n", type=int, default=200, help="sandboxes per SDK (default 200)")
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
            time.sleep(REFILL_S)  # same API key: let the create bucket refill for official
            official = asyncio.run(run_official(url, token, args.n, home))
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
    floor = max(0.0, args.n - args.rate) / args.rate  # a full bucket, then `rate` a second
    print(f"floor of the create step for {args.n} creates at {args.rate:g}/s: {floor:.2f} s")
    ratio = ours.wall_s / official.wall_s
    print(
        f"ours_s={ours.wall_s:.2f} official_s={official.wall_s:.2f} "
        f"ours_failures={len(ours.failed)} official_failures={len(official.failed)} "
        f"ratio={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
