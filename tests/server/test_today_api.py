"""Today's control-plane contract on the wire: what the local server answers each SDK
release (start commands in the form it reads, `vm`, idle sandboxes), the egress entry
contract, background jobs in batches, checkpoints' lineage, and a clear 501 for what
this server does not offer."""

from __future__ import annotations

import time

import httpx
import pytest

from fleetctl.server.routes.control import UNSUPPORTED
from tests.conftest import Create, Running, needs_sandboxes, wait_for

pytestmark = needs_sandboxes
TODAY = {"User-Agent": "prime-sandboxes/0.5.1 python/3.11.7"}
GUIDE = {"User-Agent": "prime-sandboxes/0.2.31 python/3.11.7"}


@pytest.mark.parametrize(
    ("feature", "path", "method"),
    [
        (feature, path, method)
        for feature, routes in UNSUPPORTED.items()
        for path, methods in routes
        for method in methods
    ],
)
def test_what_this_server_does_not_offer_answers_501_saying_so(
    api: httpx.Client, feature: str, path: str, method: str
) -> None:
    url = path.format(sandbox_id="sbx-any", name="v", network_id="n", session_id="s",
                      build_id="b")  # fmt: skip
    response = api.request(method, url, json={} if method in ("POST", "PUT", "PATCH") else None)
    assert response.status_code == 501
    body = response.json()
    assert (body["code"], body["message"]) == ("unimplemented", body["detail"])
    assert feature in body["message"]


def test_a_create_with_volumes_is_refused_with_501(api: httpx.Client) -> None:
    body = {"name": "v", "docker_image": "python:3.11-slim",
            "volumes": [{"name": "v", "mount_path": "/data", "read_only": False}]}  # fmt: skip
    response = api.post("/sandbox", json=body)
    assert (response.status_code, response.json()["code"]) == (501, "unimplemented")


def test_the_start_command_is_answered_in_the_form_each_release_reads(
    api: httpx.Client, sandboxes: Create
) -> None:
    shell = sandboxes(start_command="echo hi; exec sleep 300")
    argv = sandboxes(start_command={"executable": "/bin/sleep", "args": ["300"]})
    idle = sandboxes()
    assert shell["startCommand"] == "echo hi; exec sleep 300"  # an unknown client: as given
    read = {
        name: api.get(f"/sandbox/{record['id']}", headers=TODAY).json()["startCommand"]
        for name, record in (("shell", shell), ("argv", argv), ("idle", idle))
    }
    assert read == {
        "shell": {"executable": "/bin/sh", "args": ["-c", "echo hi; exec sleep 300"]},
        "argv": {"executable": "/bin/sleep", "args": ["300"]},
        "idle": None,
    }
    guide = api.get(f"/sandbox/{argv['id']}", headers=GUIDE).json()["startCommand"]
    assert guide == "/bin/sleep 300"
    listed = api.get("/sandbox", params={"per_page": 500}, headers=GUIDE).json()["sandboxes"]
    assert all(isinstance(s["startCommand"], str | None) for s in listed)
    assert wait_for(api, idle["id"], "RUNNING")["status"] == "RUNNING", "idle stays up"


def test_vm_is_recorded_echoed_and_told_to_older_clients_through_auth(
    api: httpx.Client, sandboxes: Create
) -> None:
    vm = sandboxes(vm=True)
    plain = sandboxes()
    assert (vm["vm"], plain["vm"]) == (True, False)
    assert api.post(f"/sandbox/{vm['id']}/auth").json()["is_vm"] is True
    assert api.post(f"/sandbox/{plain['id']}/auth").json()["is_vm"] is False


@pytest.mark.parametrize(
    ("lists", "status", "says"),
    [
        ({"network_allowlist": ["example.com:22"]}, 422, "only ports 80 and 443"),
        ({"network_denylist": ["2001:db8::/32"]}, 422, "IPv6 is not supported"),
        ({"network_allowlist": [], "network_denylist": []}, 422, "mutually exclusive"),
        ({"network_allowlist": ["*.example.com:443", "10.0.0.0/8"]}, 200, "*.example.com:443"),
    ],
)
def test_egress_lists_are_checked_by_the_entry_contract(
    api: httpx.Client, lists: dict[str, list[str]], status: int, says: str
) -> None:
    """Valid lists are taken (tests/network/ checks that they hold), others refused."""
    response = api.post("/sandbox", json={"name": "e", "docker_image": "python:3.11-slim", **lists})
    assert response.status_code == status
    assert says in response.text
    if status == 200:
        api.delete(f"/sandbox/{response.json()['id']}")


def test_background_jobs_in_a_batch_read_each_jobs_exit_file(
    running: Running, api: httpx.Client
) -> None:
    first, gw = running()
    gone, _ = running()
    gw.exec("echo 7 > /tmp/job_done01.exit")
    api.delete(f"/sandbox/{gone['id']}")
    jobs = [{"sandbox_id": first["id"], "job_id": "done01"},
            {"sandbox_id": first["id"], "job_id": "running1"},
            {"sandbox_id": gone["id"], "job_id": "x1"},
            {"sandbox_id": "sbx-none", "job_id": "x2"}]  # fmt: skip
    body = api.post("/sandbox/background-jobs/status:batchGet", json={"jobs": jobs}).json()
    assert sorted(body["statuses"], key=lambda s: s["job_id"]) == [
        {"sandbox_id": first["id"], "job_id": "done01", "completed": True, "exit_code": 7},
        {"sandbox_id": first["id"], "job_id": "running1", "completed": False, "exit_code": None},
    ]
    assert {(e["sandbox_id"], e["code"]) for e in body["errors"]} == {
        (gone["id"], "NOT_RUNNING"), ("sbx-none", "NOT_FOUND"),
    }  # fmt: skip
    bad = api.post("/sandbox/background-jobs/status:batchGet",
                   json={"jobs": [{"sandbox_id": first["id"], "job_id": "../etc"}]})  # fmt: skip
    assert bad.status_code == 422


def test_a_checkpoint_of_a_restored_sandbox_stands_on_its_parent(
    running: Running, api: httpx.Client, sandboxes: Create
) -> None:
    source, gw = running()
    gw.exec("echo one > /workspace/one")
    parent = durable(api, api.post(f"/sandbox/{source['id']}/checkpoints").json()["id"])
    child_sandbox = sandboxes(checkpoint_id=parent["id"], docker_image=None)
    assert (child_sandbox["dockerImage"], child_sandbox["checkpointId"]) == (
        "python:3.11-slim", parent["id"],
    )  # fmt: skip
    wait_for(api, child_sandbox["id"], "RUNNING")
    child = durable(api, api.post(f"/sandbox/{child_sandbox['id']}/checkpoints").json()["id"])
    assert (child["parent_id"], child["depth"]) == (parent["id"], 1)
    refused = api.delete(f"/sandbox/checkpoints/{parent['id']}")
    assert refused.status_code == 409, "a checkpoint under another may not go"
    unknown = api.post("/sandbox", json={"name": "r", "checkpoint_id": "ckpt-none"})
    assert unknown.status_code == 404
    both = api.post("/sandbox", json={"name": "r", "checkpoint_id": parent["id"],
                                      "docker_image": "python:3.11-slim"})  # fmt: skip
    assert both.status_code == 422
    stopped = api.post(f"/sandbox/{source['id']}/checkpoints")
    assert stopped.status_code == 200
    api.delete(f"/sandbox/{source['id']}")
    assert api.post(f"/sandbox/{source['id']}/checkpoints").status_code == 409


def durable(api: httpx.Client, checkpoint_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while (checkpoint := api.get(f"/sandbox/checkpoints/{checkpoint_id}").json())["state"] != (
        "DURABLE"
    ):
        assert checkpoint["state"] == "PENDING", checkpoint
        assert time.monotonic() < deadline, "the checkpoint was not DURABLE in 30 s"
        time.sleep(0.02)
    return dict(checkpoint)
