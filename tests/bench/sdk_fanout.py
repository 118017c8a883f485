"""Benchmark: fan-out of sandboxes through our SDK and the official one (not run by the suite).

    python tests/bench/sdk_fanout.py [--n 100] [--rate 20] [--official 0.5.1]

Starts one server with ``--rate-limit create=<rate>/s`` and, against it, runs the same
fan-out (`tests/bench/fanout.py`) twice: first with `fleetctl.sandboxes.AsyncSandboxClient`
in this interpreter, then with the official `prime_sandboxes.AsyncSandboxClient`,
unmodified, in a subprocess of its own release's venv (`.venvs/prime-sandboxes-<version>`,
made by `tests/official/venvs.py` if missing; `tests/bench/fanout_official.py`), pointed
at the server by PRIME_API_BASE_URL / PRIME_API_KEY, HOME in a temp dir for its gateway
token cache. Each run creates n sandboxes with `asyncio.gather`, waits for them with
`bulk_wait_for_creation`, runs `echo ok` in each (gathered) and bulk-deletes them by
label. A sandbox counts as a failure if any of its steps raised (or the command did not
print ``ok``); a step is skipped for a sandbox that already failed.

Both runs do equal work, every sandbox through every step. Ours waits out a 429 for as
long as the server's Retry-After says. The official client does not read Retry-After:
0.5.1 retries a throttled create itself after 10 s, then 30 s, and raises
`prime_sandboxes.APIError` ("HTTP 429: …") on the third 429; 0.2.x raises on the first.
So for the official client only, each create is WRAPPED in a retry on a raised 429 (see
fanout_official.py). No other retries are added around either SDK. REST
requests are recorded on the wire (`tests/bench/wire.py`) and counted by the server's
rate class; both SDKs run their exec over Connect, whose streams the official client
sends with pyqwest, not httpx, so its exec requests are not in its count. Whatever is
left behind is swept by label afterwards, outside the timing. Prints figures for both
and, last, one line:

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

With ``--official 0.2.31`` keep n at 100 or below: that release's
`bulk_wait_for_creation` counts RUNNING sandboxes only on the list's first page once it
has seen them all, so with more than 100 it never sees them all running and times out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import httpx

from fleetctl.sandboxes import AsyncAPIClient, AsyncSandboxClient, CreateSandboxRequest
from fleetctl.server.ratelimit import classify
from tests.bench.fanout import IMAGE, Result, fan_out, report
from tests.bench.wire import recording
from tests.conftest import start_server, stop_server
from tests.official import venvs

HERE = Path(__file__).resolve().parent
#: Pause between the runs, in times the bucket's refill time max(1, 1 / rate) s: the
#: server's bucket holds one second of tokens (at least one) per API key.
REFILL_S = 1.5
LABELS = ("bench-ours", "bench-official")


async def run_ours(url: str, token: str, n: int) -> Result:
    result = Result("ours", n)
    label = [LABELS[0]]
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
        with recording(result.sent):
            await fan_out(result, create, client.bulk_wait_for_creation, execute, bulk_delete)
        result.sdk_stats = dict(client.api.stats)
    finally:
        await client.aclose()
    return result


def run_official(url: str, token: str, n: int, rate: float, version: str, home: Path) -> Result:
    """The official client's fan-out, in its own venv; its Result comes back as JSON."""
    python = venvs.ensure(version)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PRIME_", "FLEETCTL_", "VIRTUAL_ENV", "PYTHON"))
    }
    env |= {"PRIME_API_BASE_URL": url, "PRIME_API_KEY": token, "HOME": str(home)}
    done = subprocess.run(
        [str(python), str(HERE / "fanout_official.py"), "--n", str(n), "--rate", f"{rate:g}"],
        env=env, stdout=subprocess.PIPE, text=True, check=False,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        sys.exit(f"the official client's run exited {done.returncode}: {done.stdout[-2000:]}")
    return Result.from_json(json.loads(lines[-1]))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="sandboxes per SDK (default 100)")
    parser.add_argument("--rate", type=float, default=20, help="server create limit per second")
    parser.add_argument(
        "--official", default="0.5.1", choices=venvs.VERSIONS, help="official release to run"
    )
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
            official = run_official(url, token, args.n, args.rate, args.official, home)
        finally:
            leftovers = asyncio.run(sweep(url, token, LABELS))
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    print(
        f"n={args.n} per SDK, server --rate-limit create={args.rate:g}/s, {os.cpu_count()} CPUs, "
        f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    report(ours, classify)
    report(official, classify)
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
