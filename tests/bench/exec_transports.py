"""Benchmark: one command's round trip over Connect and over REST, on one sandbox.

    python tests/bench/exec_transports.py [--commands 300]

Starts a server in a temporary data dir, creates one sandbox and runs `true` in it
through `fleetctl.sandboxes.SandboxClient.execute_command` with two clients side by
side: one that speaks the Connect command session (`CommandSession/Start`, a server
stream: the SDK's default), and one told that the gateway does not offer it, so it
sends the REST `POST …/exec` (what the SDK falls back to against an older gateway). The
commands alternate between the two, after 20 of each to warm up, so that both see the
same machine at the same moments. Each round trip is timed from the call to its
returned response (gateway token cached: one HTTP request each). Prints both
distributions and, last, one line:

    connect_p50_ms=… connect_p99_ms=… rest_p50_ms=… rest_p99_ms=… connect_vs_rest_p50=…

Target: Connect not slower than REST (connect_vs_rest_p50 ≤ 1).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import httpx

from fleetctl.sandboxes import APIClient, CreateSandboxRequest, SandboxClient
from tests.conftest import start_server, stop_server

WARMUP = 20


def quantile(samples: list[float], q: float) -> float:
    """The q-quantile of `samples` (inclusive method), in milliseconds."""
    return statistics.quantiles(samples, n=100, method="inclusive")[round(q * 100) - 1] * 1000


def round_trip(client: SandboxClient, sandbox_id: str) -> float:
    started = time.perf_counter()
    response = client.execute_command(sandbox_id, "true")
    elapsed = time.perf_counter() - started
    if response.exit_code != 0:
        raise SystemExit(f"`true` exited {response.exit_code}: {response.stderr[:200]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=300, help="timed commands per transport")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fleetctl-exec-", dir="/tmp"))
    base.chmod(0o711)
    info, process = start_server(base / "data")
    try:
        connect = SandboxClient(APIClient(api_key=info.token, base_url=info.url))
        rest = SandboxClient(APIClient(api_key=info.token, base_url=info.url))
        sandbox = connect.create(CreateSandboxRequest(name="exec-bench", docker_image="busybox"))
        connect.wait_for_creation(sandbox.id)
        # The REST client is told the gateway has no command session, as if it had
        # answered `unimplemented`: from then on it sends POST …/exec.
        auth = httpx.post(
            f"{info.url}/api/v1/sandbox/{sandbox.id}/auth",
            headers={"Authorization": f"Bearer {info.token}"},
        ).raise_for_status()
        rest._ops.connect_offered[auth.json()["gateway_url"].rstrip("/")] = False
        samples: dict[str, list[float]] = {"connect": [], "rest": []}
        clients = {"connect": connect, "rest": rest}
        for _ in range(WARMUP):
            for client in clients.values():
                round_trip(client, sandbox.id)
        for _ in range(args.commands):
            for name, client in clients.items():
                samples[name].append(round_trip(client, sandbox.id))
        connect.delete(sandbox.id)
    finally:
        stop_server(process)
        shutil.rmtree(base, ignore_errors=True)
    figures = {
        name: (quantile(times, 0.5), quantile(times, 0.99), min(times) * 1000)
        for name, times in samples.items()
    }
    for name, (p50, p99, fastest) in figures.items():
        print(f"{name:8} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  min {fastest:6.2f} ms "
              f"({args.commands} commands)")  # fmt: skip
    (c50, c99, _), (r50, r99, _) = figures["connect"], figures["rest"]
    print(
        f"connect_p50_ms={c50:.2f} connect_p99_ms={c99:.2f} rest_p50_ms={r50:.2f} "
        f"rest_p99_ms={r99:.2f} connect_vs_rest_p50={c50 / r50:.2f}"
    )


if __name__ == "__main__":
    main()
