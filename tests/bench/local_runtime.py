"""Benchmark of the local runtime through the API (not run by the test suite).

    python tests/bench/local_runtime.py [--sandboxes 50] [--commands 200]

Starts a server in a temporary data dir, creates the sandboxes one by one
(create → RUNNING latency), runs small commands through the data plane, and
compares them with a bare `subprocess.run` measured in the same run. Prints
figures and, last, one line:

    create_p50_ms=… exec_p50_ms=… exec_vs_bare_ratio=… idle_rss_mb_per_sandbox=…

Targets on a 2-core machine: create p50 ≤ 50 ms, exec p50 ≤ 15 ms, ≤ 10 MB per idle sandbox.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def start(data_dir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetctl", "server", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            url = json.loads((data_dir / "server.json").read_text())["url"]
            if httpx.get(f"{url}/api/v1/health").status_code == 200:
                return process, url, (data_dir / "token").read_text().strip()
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            time.sleep(0.02)
    process.kill()
    raise SystemExit("server did not start")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sandbox_pids(data_dir: Path, sandbox_id: str) -> set[int]:
    """Every process in the sandbox's cgroups (bwrap, its init, the main process)."""
    with sqlite3.connect(data_dir / "state.db") as db:
        row = db.execute("SELECT runtime FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    pids: set[int] = set()
    for path in json.loads(row[0])["cgroup_paths"] if row else []:
        procs = Path(path) / "cgroup.procs"
        if procs.exists():
            pids |= {int(p) for p in procs.read_text().split()}
    return pids


def p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=50)
    parser.add_argument("--commands", type=int, default=200)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fleetctl-bench-", dir="/tmp"))
    base.chmod(0o711)
    process, url, token = start(base / "data")
    try:
        with httpx.Client(
            base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as api:
            create_ms, ids = [], []
            for i in range(args.sandboxes):
                started = time.perf_counter()
                sandbox_id = api.post(
                    "/sandbox",
                    json={
                        "name": f"bench-{i}",
                        "docker_image": "python:3.11-slim",
                        "memory_gb": 0.25,
                        "labels": ["bench"],
                    },
                ).json()["id"]
                while (
                    api.post("/sandbox/status:batchGet", json={"sandbox_ids": [sandbox_id]}).json()[
                        "sandboxes"
                    ][0]["status"]
                    != "RUNNING"
                ):
                    time.sleep(0.002)
                create_ms.append((time.perf_counter() - started) * 1000)
                ids.append(sandbox_id)
            auth = api.post(f"/sandbox/{ids[0]}/auth").json()
            gateway = f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}/exec"
            exec_ms = []
            with httpx.Client(headers={"Authorization": f"Bearer {auth['token']}"}) as gw:
                for _ in range(args.commands):
                    started = time.perf_counter()
                    assert gw.post(gateway, json={"command": "true"}).json()["exit_code"] == 0
                    exec_ms.append((time.perf_counter() - started) * 1000)
            bare_ms = []
            for _ in range(args.commands):
                started = time.perf_counter()
                subprocess.run(["true"], check=True)
                bare_ms.append((time.perf_counter() - started) * 1000)
            idle = ids[1:] or ids
            rss = sum(rss_kb(pid) for i in idle for pid in sandbox_pids(base / "data", i))
            rss_mb = rss / 1024 / len(idle)
            api.request("DELETE", "/sandbox", json={"labels": ["bench"]})
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)
    create_p50, exec_p50, bare_p50 = (statistics.median(x) for x in (create_ms, exec_ms, bare_ms))
    print(f"sandboxes={args.sandboxes} commands={args.commands}")
    print(f"create→RUNNING ms: p50 {create_p50:.1f}, p90 {p90(create_ms):.1f}")
    print(f"exec round trip ms: p50 {exec_p50:.1f}, p90 {p90(exec_ms):.1f}")
    print(f"bare subprocess.run ms: p50 {bare_p50:.2f}")
    print(
        f"create_p50_ms={create_p50:.1f} exec_p50_ms={exec_p50:.1f} "
        f"exec_vs_bare_ratio={exec_p50 / bare_p50:.1f} idle_rss_mb_per_sandbox={rss_mb:.1f}"
    )


if __name__ == "__main__":
    main()
