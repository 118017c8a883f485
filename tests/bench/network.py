"""Benchmark of sandbox networking (not run by the test suite).

    python tests/bench/network.py [--creates 30] [--fleet 200] [--mb 200]

Builds the tests' fake internet (tests/network/fakenet.py: 198.51.100.2 in a network
namespace of its own), starts a server, and measures in one run:

    create → RUNNING p50 with network_access true vs false, alternating (ratio ≤ 1.5)
    a fleet of networked sandboxes created at once: wall time until all are RUNNING per
    sandbox, and the server's RSS growth per sandbox (namespaces cost kernel memory,
    not processes: there is none per sandbox)
    a download of `--mb` MB from the fake internet inside a sandbox vs on the host, as
    throughput (ratio ≥ 0.8)

Last line:

    create_net_p50_ms=… create_nonet_p50_ms=… net_vs_nonet_ratio=… fleet_setup_ms_per_sandbox=…
    fleet_server_kb_per_sandbox=… download_mb_s=… host_download_mb_s=… download_ratio=…
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import httpx

from fleetctl.contract import MAX_BATCH
from fleetctl.sandboxes import APIClient, SandboxClient
from tests.bench.local_runtime import create_running, rss_bytes
from tests.conftest import Server, start_server, stop_server
from tests.network.fakenet import fake_hosts

DOWNLOAD = "import sys, time, urllib.request; t = time.perf_counter(); n = 0\n" \
    "with urllib.request.urlopen(sys.argv[1]) as r:\n" \
    "    while chunk := r.read(1 << 20): n += len(chunk)\n" \
    "print(n / (time.perf_counter() - t) / 1e6)"  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=30)
    parser.add_argument("--fleet", type=int, default=200)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    with fake_hosts() as hosts, tempfile.TemporaryDirectory(dir="/tmp") as base:
        Path(base).chmod(0o711)
        info, process = start_server(Path(base) / "data", "--sandbox-dns", hosts.internet)
        try:
            url = f"http://{hosts.internet}/bytes/{args.mb << 20}"
            with info.client() as api:
                figures = measure(info, api, (args.creates, args.fleet), url)
        finally:
            stop_server(process)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


def measure(info: Server, api: httpx.Client, sizes: tuple[int, int], url: str) -> dict[str, str]:
    creates, fleet = sizes
    times: dict[bool, list[float]] = {True: [], False: []}
    made: list[str] = []
    for index in range(creates * 2):
        network = index % 2 == 0
        sandbox_id, ms = create_running(api, f"c{index}", network_access=network)
        times[network].append(ms)
        made.append(sandbox_id)
    net, nonet = statistics.median(times[True]), statistics.median(times[False])
    print(f"create → RUNNING p50: network {net:.1f} ms, none {nonet:.1f} ms")
    with SandboxClient(APIClient(api_key=info.token, base_url=info.url)) as sdk:
        sandbox_mb_s, host_mb_s = downloads(sdk, made[0], url)
    api.request("DELETE", "/sandbox", json={"sandbox_ids": made})
    print(f"download: {sandbox_mb_s:.0f} MB/s in a sandbox, {host_mb_s:.0f} MB/s on the host")

    before = rss_bytes(info.pid)
    started = time.perf_counter()
    body = {"docker_image": "python:3.11-slim", "memory_gb": 0.25}
    ids = [api.post("/sandbox", json={"name": f"f{i}", **body}).json()["id"] for i in range(fleet)]
    pending = set(ids)
    while pending:
        batch = sorted(pending)[:MAX_BATCH]
        statuses = api.post("/sandbox/status:batchGet", json={"sandbox_ids": batch})
        for item in statuses.json()["statuses"]:
            if item["status"] == "RUNNING":
                pending.discard(item["sandbox_id"])
            elif item["status"] in ("ERROR", "TERMINATED", "TIMEOUT"):
                raise SystemExit(f"fleet sandbox {item['sandbox_id']} is {item['status']}")
        time.sleep(0.01)
    per_sandbox_ms = (time.perf_counter() - started) * 1000 / fleet
    server_kb = (rss_bytes(info.pid) - before) / 1024 / fleet
    api.request("DELETE", "/sandbox", json={"sandbox_ids": ids})
    print(f"{fleet} networked sandboxes: {per_sandbox_ms:.1f} ms each, server "
          f"{server_kb:.0f} KiB each")  # fmt: skip
    return {
        "create_net_p50_ms": f"{net:.1f}",
        "create_nonet_p50_ms": f"{nonet:.1f}",
        "net_vs_nonet_ratio": f"{net / nonet:.2f}",
        "fleet_setup_ms_per_sandbox": f"{per_sandbox_ms:.1f}",
        "fleet_server_kb_per_sandbox": f"{server_kb:.0f}",
        "download_mb_s": f"{sandbox_mb_s:.0f}",
        "host_download_mb_s": f"{host_mb_s:.0f}",
        "download_ratio": f"{sandbox_mb_s / host_mb_s:.2f}",
    }


def downloads(
    sdk: SandboxClient, sandbox_id: str, url: str, rounds: int = 3
) -> tuple[float, float]:
    """Median MB/s of `rounds` downloads in the sandbox and on the host, taken in turns (so
    that both see the same machine)."""
    inside: list[float] = []
    host: list[float] = []
    for _ in range(rounds):
        done = sdk.execute_command(sandbox_id, f"python3 -c '{DOWNLOAD}' {url}", timeout=300)
        if done.exit_code != 0:
            raise SystemExit(f"download in the sandbox failed: {done.stderr}")
        inside.append(float(done.stdout))
        on_host = subprocess.run([sys.executable, "-c", DOWNLOAD, url], capture_output=True,
                                 text=True, check=True)  # fmt: skip
        host.append(float(on_host.stdout))
    return statistics.median(inside), statistics.median(host)


if __name__ == "__main__":
    main()
