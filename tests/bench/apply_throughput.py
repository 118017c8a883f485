"""Benchmark: `apply` of one n-replica group against a rate-limited server (not run by the suite).

    python tests/bench/apply_throughput.py [--n 300] [--rate 25] [--parallelism 32]

Writes a spec with one group of n replicas (python:3.11-slim, memory_gb 0.25, no files,
jobs or exposures) to a temp dir and starts a server with ``--rate-limit
create=<rate>/s``. First it measures one sandbox's start time (create → RUNNING, status
polled every few ms, through the SDK), then lets the create bucket refill and runs the
apply in-process on the CLI's code path (`load` → `fleetctl.plan.prepare.prepare` →
`make_plan` → `execute`, with an `AsyncSandboxClient` on the server and the CLI's
default `Options`). Every HTTP request of the apply is counted on the wire (patched
`httpx.AsyncHTTPTransport`, `tests/bench/wire.py`) by kind and status, beside the SDK's
own `client.api.stats`. Afterwards it checks that n sandboxes of the fleet are RUNNING,
destroys the fleet (bulk delete by its fleet label) and stops the server. Prints figures
and, last, one line:

    wall_s=… lower_bound_s=… ratio=… api_calls=… min_calls=… calls_ratio=… failures=…

    wall_s        load → prepare → plan (list) → apply, as `fleetctl apply` spends it
    lower_bound_s max(0, n - burst) / rate + one sandbox's start time, burst = max(1, rate):
                  the server's create bucket holds one second of tokens and starts full
                  (it is refilled after the probe), so the first `burst` creates need
                  no wait and the other n - burst come at `rate` a second; the last
                  sandbox then takes one start time to be RUNNING
    api_calls     HTTP requests the apply sent (429s and retries included)
    min_calls     n creates + ceil(n / 100) batch status polls + 1 list
    failures      keys the executor failed, or sandboxes missing from RUNNING after it

Targets on a 2-core machine: ratio ≤ 1.25, calls_ratio ≤ 1.5, failures = 0.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import anyio

from fleetctl.apply.executor import Options, Result, execute
from fleetctl.plan.identity import fleet_label
from fleetctl.plan.model import Action
from fleetctl.plan.planner import Limits
from fleetctl.plan.prepare import prepare
from fleetctl.plan.refresh import make_plan, owned
from fleetctl.sandboxes import AsyncAPIClient, AsyncSandboxClient, CreateSandboxRequest
from fleetctl.spec import load
from tests.bench.wire import wire_counter
from tests.conftest import start_server, stop_server

FLEET = "bench-apply"
IMAGE = "python:3.11-slim"
PROBE_LABEL = "bench-apply-probe"
#: The server's create bucket holds one second of tokens (at least one), refilled in
#: max(1, 1 / rate) s: wait this many times that after the probe, so the apply finds it full.
REFILL_S = 1.5
STATUS_PATH = "/api/v1/sandbox/status:batchGet"
SANDBOX_PATH = "/api/v1/sandbox"
KINDS = ("create", "status", "list", "delete", "auth", "expose", "exec", "other")


def spec_text(n: int) -> str:
    return (
        "apiVersion: fleetctl/v1\n"
        "kind: Fleet\n"
        f"name: {FLEET}\n"
        "sandboxes:\n"
        "  - name: worker\n"
        f"    replicas: {n}\n"
        f"    image: {IMAGE}\n"
        "    memory_gb: 0.25\n"
    )


def kind(method: str, path: str) -> str:
    if path == SANDBOX_PATH:
        return {"POST": "create", "GET": "list", "DELETE": "delete"}.get(method, "other")
    if path == STATUS_PATH:
        return "status"
    if path.startswith("/gw/"):
        return "exec"
    for suffix in ("auth", "expose"):
        if path.endswith(f"/{suffix}"):
            return suffix
    if method == "DELETE":
        return "delete"
    return "other"


@dataclass
class Run:
    """What the apply did: phase marks (seconds from its start), events, requests."""

    n: int
    marks: dict[str, float] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    wire: Counter[str] = field(default_factory=Counter)
    stats: dict[str, int] = field(default_factory=dict)
    result: Result | None = None
    plan_summary: str = ""
    running_after: int = 0
    replan_s: float = 0.0
    replan_summary: str = ""
    replan_wire: Counter[str] = field(default_factory=Counter)


def client_for(url: str, token: str) -> AsyncSandboxClient:
    return AsyncSandboxClient(AsyncAPIClient(api_key=token, base_url=url))


async def probe_start(url: str, token: str) -> float:
    """Seconds from create to RUNNING of one sandbox, polled every 5 ms."""
    async with client_for(url, token) as client:
        request = CreateSandboxRequest(
            name="probe", docker_image=IMAGE, memory_gb=0.25, labels=[PROBE_LABEL]
        )
        started = time.perf_counter()
        sandbox = await client.create(request)
        deadline = started + 60
        while (status := (await client.get(sandbox.id)).status) != "RUNNING":
            if status in ("ERROR", "TERMINATED", "TIMEOUT") or time.perf_counter() > deadline:
                raise SystemExit(f"probe sandbox {sandbox.id} is {status}")
            await anyio.sleep(0.005)
        elapsed = time.perf_counter() - started
        await client.bulk_delete(labels=[PROBE_LABEL])
    return elapsed


async def run_apply(url: str, token: str, spec: Path, n: int, parallelism: int) -> Run:
    """The CLI's `apply SPEC --yes` path, in-process, timed and counted."""
    run = Run(n)
    started = time.perf_counter()

    def emit(event: dict[str, Any]) -> None:
        now = time.perf_counter() - started
        name = str(event["event"])
        run.events[name] += 1
        run.first.setdefault(name, now)
        run.last[name] = now

    async with client_for(url, token) as client:
        with wire_counter(run.wire, kind):
            fleets = load([str(spec)])
            prepared = prepare(fleets, client.api.endpoint.api_key)
            run.marks["prepared"] = time.perf_counter() - started
            the_plan = await make_plan(client, prepared, Limits())
            run.marks["planned"] = time.perf_counter() - started
            run.plan_summary = the_plan.summary()
            run.result = await execute(the_plan, client, prepared, Options(parallelism), emit)
            run.marks["applied"] = time.perf_counter() - started
        run.stats = dict(client.api.stats)
        live = await owned(client, [FLEET])
        run.running_after = sum(1 for s in live if s.status == "RUNNING")
        # What `apply` costs next time, when nothing changed: it stops after the plan.
        with wire_counter(run.replan_wire, kind):
            started = time.perf_counter()
            again = await make_plan(client, prepare(load([str(spec)]), token), Limits())
            run.replan_s = time.perf_counter() - started
        run.replan_summary = again.summary()
    return run


async def destroy(url: str, token: str) -> tuple[int, int]:
    """Bulk delete the fleet by its label: (deleted, failed)."""
    async with client_for(url, token) as client:
        result = await client.bulk_delete(labels=[fleet_label(FLEET)])
    return len(result.succeeded), len(result.failed)


def report(run: Run, start_s: float, rate: float, parallelism: int) -> None:
    assert run.result is not None
    result, wire, marks = run.result, run.wire, run.marks
    print(f"n={run.n} server --rate-limit create={rate:g}/s, parallelism {parallelism}, "
          f"{os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"one sandbox create→RUNNING: {start_s * 1000:.0f} ms")
    print(f"plan: {run.plan_summary}")
    print(
        f"phases (s from start): load+prepare {marks['prepared']:.2f}, plan (list) "
        f"{marks['planned']:.2f}, first created {run.first.get('created', 0):.2f}, "
        f"last created {run.last.get('created', 0):.2f}, last ready "
        f"{run.last.get('ready', 0):.2f}, apply done {marks['applied']:.2f} "
        f"(executor elapsed {result.elapsed:.2f})"
    )
    creating = run.last.get("created", 0) - marks["planned"]
    if creating > 0:
        print(
            f"create phase {creating:.2f} s: {run.events['created'] / creating:.1f} creates/s "
            f"(server rate {rate:g}/s; a full bucket of {max(1.0, rate):g} then {rate:g}/s "
            f"needs {max(0.0, run.n - max(1.0, rate)) / rate:.2f} s)"
        )
    print(f"events: {dict(run.events)}")
    print(
        f"executor: {len(result.done)} done, {len(result.failed)} failed; "
        f"{run.running_after} RUNNING after the run"
    )
    for key, error in list(result.failed.items())[:3]:
        print(f"  failed {key}: {error[:200]}")
    by_kind = ", ".join(
        f"{k} {wire[k]}" + (f" ({wire[f'{k}_429']} × 429)" if wire[f"{k}_429"] else "")
        for k in KINDS
        if wire[k]
    )
    print(
        f"HTTP requests {wire['requests']} ({by_kind}); 429s {wire['429']}, "
        f"5xx {wire['5xx']}, transport errors {wire['transport_errors']}"
    )
    for name, count in wire.items():
        if name.startswith("transport "):
            print(f"  {name.removeprefix('transport ')}: {count}")
    if wire["create"]:
        print(f"HTTP requests per create: {wire['create'] / max(1, run.events['created']):.2f}")
    again = run.replan_wire
    again_kinds = ", ".join(f"{k} {again[k]}" for k in KINDS if again[k])
    print(
        f"re-apply with nothing to change: {run.replan_summary} in {run.replan_s:.2f} s, "
        f"{again['requests']} HTTP requests ({again_kinds})"
    )
    stats = run.stats
    print(
        f"client.api.stats: requests {stats['requests']} (logical calls), retries "
        f"{stats['retries']}, throttled {stats['throttled']} → "
        f"{stats['requests'] + stats['retries'] + stats['throttled']} on the wire"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="replicas (default 300)")
    parser.add_argument("--rate", type=float, default=25, help="server create limit per second")
    parser.add_argument("--parallelism", type=int, default=Options().parallelism)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fleetctl-apply-", dir="/tmp"))
    base.chmod(0o711)
    spec = base / "spec" / "fleet.yaml"
    spec.parent.mkdir()
    spec.write_text(spec_text(args.n))
    process: subprocess.Popen[bytes] | None = None
    destroyed: tuple[int, int] = (0, 0)
    try:
        info, process = start_server(base / "data", "--rate-limit", f"create={args.rate:g}/s")
        url, token = info.url, info.token
        try:
            start_s = anyio.run(probe_start, url, token)
            time.sleep(REFILL_S * max(1.0, 1.0 / args.rate))
            run = anyio.run(run_apply, url, token, spec, args.n, args.parallelism)
        finally:
            destroyed = anyio.run(destroy, url, token)
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(base, ignore_errors=True)
    report(run, start_s, args.rate, args.parallelism)
    deleted, not_deleted = destroyed
    print(f"destroyed {deleted} sandboxes by label {fleet_label(FLEET)}, {not_deleted} failed")
    assert run.result is not None
    wall_s = run.marks["applied"]
    burst = max(1.0, args.rate)  # the create bucket: one second of tokens, full at start
    lower_bound_s = max(0.0, args.n - burst) / args.rate + start_s
    api_calls = run.wire["requests"]
    min_calls = args.n + math.ceil(args.n / 100) + 1
    creates = sum(1 for a in run.result.done.values() if a == Action.create.value)
    failures = max(len(run.result.failed), args.n - run.running_after, args.n - creates)
    print(
        f"wall_s={wall_s:.2f} lower_bound_s={lower_bound_s:.2f} "
        f"ratio={wall_s / lower_bound_s:.2f} api_calls={api_calls} min_calls={min_calls} "
        f"calls_ratio={api_calls / min_calls:.2f} failures={failures}"
    )


if __name__ == "__main__":
    main()
