"""Benchmark of the local runtime through the API (not run by the test suite).

    python tests/bench/local_runtime.py [--sandboxes 50] [--commands 200]

Starts a server in a temporary data dir (`tests.conftest.start_server`), creates the
sandboxes one by one (create → RUNNING latency, status polled every 2 ms), runs small
commands through the data plane of the first one (warm: its exec helper already runs),
the first command of up to 20 others (cold: each starts its sandbox's helper), and
compares them with a bare `subprocess.run` measured in the same run. The create figure
depends on the root filesystem the sandboxes got: the `imageSource` of each sandbox (GET
/api/v1/sandbox/{id}), an image's own rootfs or the host's, is printed and named in
the last line.

Idle memory per sandbox is what a sandbox costs the host while it idles, in two parts:

    cgroup   the sandbox's own memory cgroup: `memory.current` (cgroup v2) or
             `memory.usage_in_bytes` (v1), at the paths the server keeps in its
             `state.db` (table `sandboxes`, `runtime` JSON key `cgroup_paths`),
             averaged over the sandboxes that ran no command yet (all but the first,
             measured before the cold commands)
    server   the server process's RSS after creating the sandboxes minus its RSS
             before, divided by the number of sandboxes

The script exits with a message, instead of printing 0, when a sandbox has no cgroup
path or memory file, or the server's process cannot be read. Prints figures and, last,
one line:

    create_p50_ms=… exec_p50_ms=… exec_p99_ms=… exec_cold_p50_ms=… bare_p50_ms=…
    exec_vs_bare_ratio=… idle_mb_per_sandbox=… rootfs=host|image

Targets on a 2-core machine (issue 13): create p50 ≤ 20 ms from the host rootfs, exec
p50 ≤ 3 ms and ≤ 4 times bare, ≤ 5 MB per idle sandbox.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import httpx

from tests.conftest import Server, start_server, stop_server

LABEL = "bench"
#: `imageSource` prefixes of the server, by the name the last line gives them.
ROOTFS = {"host": "host root filesystem", "image": "image rootfs"}
CREATE_TIMEOUT_S = 60


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid`; SystemExit when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise SystemExit(f"cannot read the server's process {pid}: {exc}") from exc
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no VmRSS in /proc/{pid}/status: is the server's pid {pid} a process?")


def cgroup_memory_bytes(data_dir: Path, sandbox_id: str) -> int:
    """Memory charged to the sandbox's memory cgroup, from the paths in `state.db`."""
    with sqlite3.connect(data_dir / "state.db") as db:
        row = db.execute("SELECT runtime FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    runtime = json.loads(row[0]) if row and row[0] else {}
    paths = [Path(p) for p in runtime.get("cgroup_paths") or ()]
    if not paths:
        raise SystemExit(
            f"sandbox {sandbox_id} has no cgroup path in {data_dir / 'state.db'} "
            f"(runtime {runtime}): its memory cannot be measured"
        )
    for path in paths:
        for name in ("memory.current", "memory.usage_in_bytes"):  # v2, v1
            if (path / name).is_file():
                return int((path / name).read_text())
    raise SystemExit(
        f"sandbox {sandbox_id}: no memory.current or memory.usage_in_bytes in any of its "
        f"cgroups {[str(p) for p in paths]}"
    )


def rootfs_kind(source: str | None, sandbox_id: str) -> str:
    for kind, prefix in ROOTFS.items():
        if source and source.startswith(prefix):
            return kind
    raise SystemExit(f"sandbox {sandbox_id} has an unknown imageSource {source!r}")


def create_running(api: httpx.Client, name: str, **fields: object) -> tuple[str, float]:
    """Create one sandbox (with `fields` added) and poll until RUNNING: (id, milliseconds)."""
    started = time.perf_counter()
    response = api.post(
        "/sandbox",
        json={
            "name": name,
            "docker_image": "python:3.11-slim",
            "memory_gb": 0.25,
            "labels": [LABEL],
            **fields,
        },
    )
    if response.status_code != 200:
        raise SystemExit(f"create {name}: HTTP {response.status_code} {response.text}")
    sandbox_id = str(response.json()["id"])
    while True:
        answer = api.post("/sandbox/status:batchGet", json={"sandbox_ids": [sandbox_id]})
        status = answer.json()["statuses"][0]["status"]
        if status == "RUNNING":
            return sandbox_id, (time.perf_counter() - started) * 1000
        if status in ("ERROR", "TERMINATED", "TIMEOUT"):
            raise SystemExit(
                f"sandbox {sandbox_id} is {status}: {api.get(f'/sandbox/{sandbox_id}').text}"
            )
        if time.perf_counter() - started > CREATE_TIMEOUT_S:
            raise SystemExit(f"sandbox {sandbox_id} still {status} after {CREATE_TIMEOUT_S} s")
        time.sleep(0.002)


def p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)]


@dataclass
class Figures:
    """What one run measured (milliseconds, bytes)."""

    create_ms: list[float] = field(default_factory=list)
    exec_ms: list[float] = field(default_factory=list)
    cold_ms: list[float] = field(default_factory=list)
    bare_ms: list[float] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # sandbox id → imageSource
    server_before: int = 0
    server_after: int = 0
    cgroup: list[int] = field(default_factory=list)  # per idle sandbox


def measure(info: Server, sandboxes: int, commands: int) -> Figures:
    figures = Figures()
    with info.client() as api:
        figures.server_before = rss_bytes(info.pid)
        ids: list[str] = []
        for i in range(sandboxes):
            sandbox_id, elapsed_ms = create_running(api, f"bench-{i}")
            figures.create_ms.append(elapsed_ms)
            ids.append(sandbox_id)
        figures.server_after = rss_bytes(info.pid)
        for sandbox_id in ids:
            source = api.get(f"/sandbox/{sandbox_id}").json().get("imageSource")
            rootfs_kind(source, sandbox_id)  # fails on a source it cannot name
            figures.sources[sandbox_id] = str(source)
        idle = ids[1:] or ids  # the first one runs the commands
        figures.cgroup = [cgroup_memory_bytes(info.data_dir, i) for i in idle]
        with exec_client(api, ids[0]) as run:
            run()  # its helper starts
            figures.exec_ms = [run() for _ in range(commands)]
        for sandbox_id in ids[1:21]:
            with exec_client(api, sandbox_id) as run:
                figures.cold_ms.append(run())
        for _ in range(commands):
            started = time.perf_counter()
            subprocess.run(["true"], check=True)
            figures.bare_ms.append((time.perf_counter() - started) * 1000)
        deleted = api.request("DELETE", "/sandbox", json={"labels": [LABEL]})
        if deleted.status_code != 200:
            print(f"bulk delete: HTTP {deleted.status_code} {deleted.text}", file=sys.stderr)
    return figures


@contextlib.contextmanager
def exec_client(api: httpx.Client, sandbox_id: str) -> Iterator[Callable[[], float]]:
    """A function that runs `true` in the sandbox through its gateway: milliseconds."""
    auth = api.post(f"/sandbox/{sandbox_id}/auth").json()
    gateway = f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}/exec"
    with httpx.Client(headers={"Authorization": f"Bearer {auth['token']}"}) as gw:

        def run() -> float:
            started = time.perf_counter()
            assert gw.post(gateway, json={"command": "true"}).json()["exit_code"] == 0
            return (time.perf_counter() - started) * 1000

        yield run


def report(figures: Figures, sandboxes: int, commands: int) -> None:
    create_ms, exec_ms, bare_ms = figures.create_ms, figures.exec_ms, figures.bare_ms
    create_p50, exec_p50, bare_p50 = (statistics.median(x) for x in (create_ms, exec_ms, bare_ms))
    mb = 2**20
    cgroup = figures.cgroup
    cgroup_mb = statistics.fmean(cgroup) / mb
    server_mb = (figures.server_after - figures.server_before) / len(create_ms) / mb
    idle_mb = cgroup_mb + server_mb
    print(f"sandboxes={sandboxes} commands={commands}")
    print(f"create→RUNNING ms: p50 {create_p50:.1f}, p90 {p90(create_ms):.1f}")
    sources = Counter(figures.sources.values())
    for source, count in sorted(sources.items()):
        print(f"root filesystem of the created sandboxes ({count}): {source}")
    exec_p99, cold_p50 = (
        sorted(exec_ms)[int(len(exec_ms) * 0.99)],
        statistics.median(figures.cold_ms),
    )
    print(
        f"exec round trip ms, warm: p50 {exec_p50:.1f}, p90 {p90(exec_ms):.1f}, p99 {exec_p99:.1f}"
    )
    print(f"exec round trip ms, a sandbox's first (its helper starts): p50 {cold_p50:.1f}")
    print(f"bare subprocess.run ms: p50 {bare_p50:.2f}")
    print(
        f"idle memory per sandbox: {idle_mb:.1f} MB = its memory cgroup {cgroup_mb:.1f} MB "
        f"(mean of {len(cgroup)} idle, min {min(cgroup) / mb:.1f}, max {max(cgroup) / mb:.1f}) "
        f"+ server RSS growth {server_mb:.1f} MB (server RSS {figures.server_before / mb:.1f} "
        f"MB before, {figures.server_after / mb:.1f} MB after {len(create_ms)} sandboxes)"
    )
    kinds = sorted({rootfs_kind(source, "") for source in sources})
    print(
        f"create_p50_ms={create_p50:.1f} exec_p50_ms={exec_p50:.1f} exec_p99_ms={exec_p99:.1f} "
        f"exec_cold_p50_ms={cold_p50:.1f} bare_p50_ms={bare_p50:.2f} "
        f"exec_vs_bare_ratio={exec_p50 / bare_p50:.1f} idle_mb_per_sandbox={idle_mb:.1f} "
        f"rootfs={'+'.join(kinds)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=50)
    parser.add_argument("--commands", type=int, default=200)
    args = parser.parse_args()
    if args.sandboxes < 1 or args.commands < 1:
        parser.error("--sandboxes and --commands must be at least 1")
    base = Path(tempfile.mkdtemp(prefix="fleetctl-bench-", dir="/tmp"))
    base.chmod(0o711)
    process: subprocess.Popen[bytes] | None = None
    try:
        info, process = start_server(base / "data")
        figures = measure(info, args.sandboxes, args.commands)
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(base, ignore_errors=True)
    report(figures, args.sandboxes, args.commands)


if __name__ == "__main__":
    main()
