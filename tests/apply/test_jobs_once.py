"""A spec job runs once per sandbox lifetime, whatever it does to the sandbox's files and
wherever `apply` is killed: the server keeps the launch and the exit code, keyed by
sandbox and job id, where the job cannot reach them."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetctl.cli import main
from tests.conftest import Server, needs_sandboxes

pytestmark = needs_sandboxes
#: Counts its starts where the job does not wipe (/root), then wipes what it can of the
#: rest a job usually writes, its own logs in /tmp included.
WIPER = "echo started >> /root/starts; rm -rf /tmp/* /tmp/.[!.]* /workspace/*; exit 3"


@pytest.fixture
def spec(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FLEETCTL_API_URL", server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
    path = tmp_path / "fleet.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: fleetctl/v1
        kind: Fleet
        name: t-once
        labels: [t-once-fleet]
        defaults: {{image: python:3.11-slim, memory_gb: 0.25, network_access: false}}
        sandboxes:
          - name: wiper
            jobs: [{{name: wipe, command: "{WIPER}"}}]
        """))  # fmt: skip
    yield path
    main(["destroy", str(path), "--yes"])


def starts(api: httpx.Client) -> tuple[str, int]:
    """The fleet's one sandbox: its id and how often its job started, once that ended."""
    (sandbox,) = api.get("/sandbox", params={"labels": ["t-once-fleet"]}).json()["sandboxes"]
    deadline = time.monotonic() + 60
    while True:
        jobs = api.get(f"/sandbox/{sandbox['id']}/background-jobs").json()["jobs"]
        if jobs and all(j["completed"] for j in jobs):
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.05)
    assert [(j["job_id"], j["exit_code"]) for j in jobs] == [("fleetctl-wipe", 3)]
    auth = api.post(f"/sandbox/{sandbox['id']}/auth").json()
    with httpx.Client(headers={"Authorization": f"Bearer {auth['token']}"}) as gw:
        shown = gw.post(f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}/exec",
                        json={"command": "cat /root/starts"}).json()  # fmt: skip
    return sandbox["id"], str(shown["stdout"]).count("started")


def test_a_job_that_wipes_its_traces_is_not_started_again_by_later_applies(
    spec: Path, api: httpx.Client
) -> None:
    assert main(["apply", str(spec), "--yes"]) == 0
    first, count = starts(api)
    assert count == 1
    for _ in range(2):
        assert main(["apply", str(spec), "--yes"]) == 0
    assert starts(api) == (first, 1)


def test_apply_killed_at_seeded_points_never_starts_the_job_twice(
    spec: Path, api: httpx.Client, server: Server
) -> None:
    env = {**os.environ, "FLEETCTL_API_URL": server.url, "FLEETCTL_API_KEY": server.token}
    argv = [sys.executable, "-m", "fleetctl", "apply", str(spec), "--yes"]
    started = time.monotonic()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    whole = time.monotonic() - started  # one apply, to spread the kill points over
    main(["destroy", str(spec), "--yes"])
    draw = random.Random(13)
    for _ in range(6):
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            process.wait(timeout=draw.uniform(0.2, whole))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        assert starts(api)[1] == 1
        assert main(["destroy", str(spec), "--yes"]) == 0
