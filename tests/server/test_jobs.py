"""Background jobs the server keeps: `POST /sandbox/{id}/background-jobs` starts a job id
once, ever; its record (and exit code) is the server's, out of the job's reach."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx

from fleetctl.sandboxes import APIClient, SandboxClient
from tests.conftest import (
    Running,
    Server,
    own_server,
    start_server,
    stop_server,
    tidy_client,
    wait_for,
)

CANARY = "sk-CANARY-jobs-5d81c2"


def batch(api: httpx.Client, sandbox_id: str, job_id: str) -> dict[str, Any]:
    body = {"jobs": [{"sandbox_id": sandbox_id, "job_id": job_id}]}
    return dict(api.post("/sandbox/background-jobs/status:batchGet", json=body).json())


def finished(api: httpx.Client, sandbox_id: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while not (found := batch(api, sandbox_id, job_id)["statuses"][0])["completed"]:
        assert time.monotonic() < deadline, found
        time.sleep(0.05)
    return dict(found)


def test_a_job_id_starts_once_and_its_record_outlives_what_the_job_wipes(
    api: httpx.Client, running: Running, server: Server
) -> None:
    record, gw = running()
    path = f"/sandbox/{record['id']}/background-jobs"
    body = {"job_id": "wipe", "command": "echo x >> /root/starts; rm -rf /tmp/*; exit 3",
            "env": {"SECRET": CANARY}}  # fmt: skip
    first = api.post(path, json=body).json()
    assert first == {"sandbox_id": record["id"], "job_id": "wipe", "started": True}
    assert api.post(path, json=body).json()["started"] is False
    assert finished(api, record["id"], "wipe")["exit_code"] == 3
    assert api.post(path, json=body).json()["started"] is False  # done: still once
    listed = api.get(path).json()
    assert listed["jobs"] == [{"sandbox_id": record["id"], "job_id": "wipe", "completed": True,
                               "exit_code": 3}]  # fmt: skip
    assert gw.exec("cat /root/starts").json()["stdout"] == "x\n"
    assert gw.exec("ls /tmp").json()["stdout"] == "job_wipe.exit\n"  # its own logs went
    stored = b"".join(p.read_bytes() for p in server.data_dir.glob("state.db*"))
    assert CANARY.encode() not in stored
    assert CANARY not in str(listed) + str(batch(api, record["id"], "wipe"))


def test_a_sandbox_deleted_under_its_running_job_ends_it_and_the_server_serves_on(
    api: httpx.Client, running: Running
) -> None:
    record, _ = running()
    path = f"/sandbox/{record['id']}/background-jobs"
    assert api.post(path, json={"job_id": "long", "command": "sleep 300"}).json()["started"]
    assert api.delete(f"/sandbox/{record['id']}").status_code == 200
    answer = batch(api, record["id"], "long")
    assert [e["code"] for e in answer["errors"]] == ["NOT_RUNNING"]
    other, gw = running()
    assert gw.exec("echo up").json()["stdout"] == "up\n"
    assert (
        api.post(f"/sandbox/{other['id']}/background-jobs", json={"job_id": "x"}).status_code == 422
    )


def test_jobs_a_killed_server_ran_are_found_again_finished_or_lost() -> None:
    """Their runner went with the server; the jobs ran on. The next server reads which
    still run (by the mark in their environment), then records their codes: from the
    exit file, or lost (-1) for one that ended without one."""
    gate = "touch /root/up-gated; until [ -e /root/go ]; do sleep 0.05; done; exit 4"
    with own_server() as (first, process):
        with first.client() as api:
            sandbox_id = api.post("/sandbox", json={"name": "j", "docker_image":
                                                    "python:3.11-slim"}).json()["id"]  # fmt: skip
            wait_for(api, sandbox_id, "RUNNING")
            path = f"/sandbox/{sandbox_id}/background-jobs"
            for job_id, command in (("gated", gate), ("lost", "touch /root/up-lost; sleep 300")):
                assert api.post(path, json={"job_id": job_id, "command": command}).json()["started"]
        with SandboxClient(APIClient(api_key=first.token, base_url=first.url)) as sdk:
            deadline = time.monotonic() + 30  # both run (a job started is not yet running)
            while sdk.execute_command(sandbox_id, "ls /root").stdout.split() != [
                "up-gated",
                "up-lost",
            ]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        second, restarted = start_server(first.data_dir)
        try:
            with second.client() as api, tidy_client(second) as sdk:
                assert listed(api, path) == {"gated": None, "lost": None}  # both run on
                kill_lost = ("for p in /proc/[0-9]*; do grep -qs FLEETCTL_JOB_ID=lost "
                             "$p/environ && kill -9 ${p#/proc/}; done; touch /root/go")  # fmt: skip
                assert sdk.execute_command(sandbox_id, kill_lost).exit_code == 0
                deadline = time.monotonic() + 30
                while None in (found := listed(api, path)).values():
                    assert time.monotonic() < deadline, found
                    time.sleep(0.05)
                assert found == {"gated": 4, "lost": -1}
                assert batch(api, sandbox_id, "lost")["statuses"][0]["exit_code"] == -1
                again = api.post(path, json={"job_id": "lost", "command": "sleep 300"})
                assert again.json()["started"] is False  # once, lost or not
        finally:
            stop_server(restarted)


def listed(api: httpx.Client, path: str) -> dict[str, int | None]:
    """The sandbox's jobs as the server lists them: exit code, None while running."""
    jobs = api.get(path).json()["jobs"]
    assert all(job["completed"] == (job["exit_code"] is not None) for job in jobs), jobs
    return {job["job_id"]: job["exit_code"] for job in jobs}
