"""Background jobs the server keeps: `POST /sandbox/{id}/background-jobs` starts a job id
once, ever; its record (and exit code) is the server's, out of the job's reach."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import Running, Server

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
