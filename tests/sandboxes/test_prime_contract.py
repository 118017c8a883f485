"""fleetctl.sandboxes in the `prime` context against today's cloud API, replayed: every
request it sends has the shape prime-sandboxes 0.5.1 sends, and every answer 0.5.1 takes
(recorded in prime-0.5.1.json, which tests/official/ checks against 0.5.1's own models)
reads right. A drift in our client shows here without a cloud account.

The cloud is an `httpx.MockTransport`: the one place it stands in for a real server,
because no real one of today's cloud can run here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.json_format import ParseDict

from fleetctl.proto import command_session_pb2 as pb
from fleetctl.sandboxes import (
    APIClient,
    AsyncAPIClient,
    AsyncSandboxClient,
    BackgroundJob,
    CreateSandboxRequest,
    SandboxClient,
)
from tests.sandboxes.support import Flavor, Sdk, Threaded

SHAPES: dict[str, Any] = json.loads((Path(__file__).parent / "prime-0.5.1.json").read_text())
CLOUD = "http://api.prime.test"
GATEWAY = SHAPES["auth"]["gateway_url"]
API_KEY = "prime-key-canary"


def envelope(message: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(message)) + message


class TodaysCloud:
    """Answers as today's cloud does, recording each request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        method, path = request.method, request.url.path
        if request.url.host == "gateway.prime.test":
            return self._gateway(path)
        routes: dict[tuple[str, str], Any] = {
            ("POST", "/api/v1/sandbox"): {**SHAPES["sandbox"], "status": "PENDING",
                                          "gatewayAuth": SHAPES["auth"]},
            ("GET", "/api/v1/sandbox"): SHAPES["sandbox_list"],
            ("GET", "/api/v1/sandbox/sbx-today"): SHAPES["sandbox"],
            ("DELETE", "/api/v1/sandbox/sbx-today"): {},
            ("DELETE", "/api/v1/sandbox"): SHAPES["bulk_delete"],
            ("GET", "/api/v1/sandbox/sbx-today/logs"): SHAPES["logs"],
            ("POST", "/api/v1/sandbox/sbx-today/auth"): SHAPES["auth"],
            ("POST", "/api/v1/sandbox/status:batchGet"): SHAPES["status_batch"],
            ("POST", "/api/v1/sandbox/background-jobs/status:batchGet"): SHAPES["job_batch"],
            ("POST", "/api/v1/sandbox/sbx-today/checkpoints"): {**SHAPES["checkpoint"],
                                                               "state": "PENDING"},
            ("GET", "/api/v1/sandbox/checkpoints/cp-1"): SHAPES["checkpoint"],
            ("GET", "/api/v1/sandbox/sbx-today/checkpoints"): {
                "checkpoints": [SHAPES["checkpoint"]]},
            ("POST", "/api/v1/sandbox/checkpoints:batchGet"): {
                "checkpoints": [SHAPES["checkpoint"]], "errors": SHAPES["checkpoint_batch_errors"]},
            ("DELETE", "/api/v1/sandbox/sbx-today/checkpoints"): SHAPES["checkpoints_deleted"],
        }  # fmt: skip
        if (method, path) not in routes:
            return httpx.Response(404, json={"detail": "Not Found"})
        return httpx.Response(200, json=routes[method, path])

    def _gateway(self, path: str) -> httpx.Response:
        base = f"/{SHAPES['auth']['user_ns']}/{SHAPES['auth']['job_id']}"
        if path == f"{base}/command_session.CommandSession/Start":
            events = [ParseDict(e, pb.CommandSessionEvent()) for e in SHAPES["exec_events"]]
            body = b"".join(envelope(pb.StartResponse(event=e).SerializeToString()) for e in events)
            stream = {"content-type": "application/connect+proto"}
            return httpx.Response(200, content=body + envelope(b"{}", 0x02), headers=stream)
        if path == f"{base}/read-file":
            return httpx.Response(200, json=SHAPES["read_file"])
        if path == f"{base}/upload":
            return httpx.Response(200, json=SHAPES["upload"])
        return httpx.Response(404, json={"detail": "Not Found"})

    def bodies(self, suffix: str) -> list[Any]:
        return [json.loads(r.content) for r in self.requests if r.url.path.endswith(suffix)]

    def last(self, suffix: str) -> httpx.Request:
        return [r for r in self.requests if r.url.path.endswith(suffix)][-1]


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> TodaysCloud:
    monkeypatch.delenv("FLEETCTL_API_URL", raising=False)
    monkeypatch.setenv("FLEETCTL_CONTEXT", "prime")
    monkeypatch.setenv("PRIME_API_KEY", API_KEY)
    monkeypatch.setenv("PRIME_BASE_URL", CLOUD)
    return TodaysCloud()


@pytest.fixture
def prime(cloud: TodaysCloud, flavor: Flavor) -> Iterator[Sdk]:
    transport = httpx.MockTransport(cloud)
    if flavor == "sync":
        yield Threaded(SandboxClient(APIClient(transport=transport)))
    else:
        yield AsyncSandboxClient(AsyncAPIClient(transport=transport))


@pytest.mark.anyio
async def test_a_create_sends_only_fields_of_todays_api_as_a_vm(
    prime: Sdk, cloud: TodaysCloud
) -> None:
    await prime.create(CreateSandboxRequest(
        name="today", docker_image="python:3.11-slim", start_command="sleep infinity",
        environment_vars={"A": "1"}, labels=["l"], network_access=False, idle_timeout_minutes=10,
    ))  # fmt: skip
    await prime.create(CreateSandboxRequest(name="restored", checkpoint_id="cp-1"))
    first, restored = cloud.bodies("/api/v1/sandbox")
    allowed = set(SHAPES["create_fields"]) | set(SHAPES["create_extra_fields"])
    for body in (first, restored):
        assert set(body) <= allowed, set(body) - allowed
        assert (body["vm"], len(body["idempotency_key"])) == (True, 32)
    assert first["start_command"] == {"executable": "/bin/sh", "args": ["-c", "sleep infinity"]}
    assert (first["network_allowlist"], first["idle_timeout_minutes"]) == ([], 10)
    assert {"docker_image", "disk_size_gb"}.isdisjoint(restored)
    request = cloud.last("/api/v1/sandbox")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.anyio
async def test_responses_of_todays_api_read_as_the_guide_promises(
    prime: Sdk, cloud: TodaysCloud
) -> None:
    sandbox = await prime.get("sbx-today")
    assert (sandbox.status, sandbox.vm, sandbox.idle_timeout_minutes) == ("RUNNING", True, 10)
    assert not isinstance(sandbox.start_command, str | None)
    assert (await prime.list()).sandboxes == []
    assert await prime.get_logs("sbx-today") == "hello\n"
    statuses = await prime.get_sandbox_statuses(["sbx-today", "sbx-gone"])
    assert [(s.sandbox_id, s.status) for s in statuses.statuses] == [("sbx-today", "RUNNING")]
    assert [(e.sandbox_id, e.code) for e in statuses.errors] == [("sbx-gone", "NOT_FOUND")]
    assert cloud.bodies("status:batchGet") == [{"sandbox_ids": ["sbx-today", "sbx-gone"]}]
    await prime.wait_for_creation("sbx-today")
    deleted = await prime.bulk_delete(labels=["l"])
    assert (deleted.succeeded, deleted.failed[0]["sandbox_id"]) == (["sbx-today"], "sbx-gone")


@pytest.mark.anyio
async def test_exec_is_a_connect_start_on_the_gateway_with_its_token(
    prime: Sdk, cloud: TodaysCloud
) -> None:
    result = await prime.execute_command("sbx-today", "echo hi", working_dir="/w", env={"K": "v"},
                                         timeout=42)  # fmt: skip
    assert (result.stdout, result.stderr, result.exit_code) == ("hi", "oops\n", 7)
    start = cloud.last("/command_session.CommandSession/Start")
    assert start.url.path == "/ns-1/sbx-today/command_session.CommandSession/Start"
    headers = start.headers
    assert (headers["content-type"], headers["connect-protocol-version"]) == (
        "application/connect+proto", "1",
    )  # fmt: skip
    assert (headers["connect-timeout-ms"], headers["authorization"]) == ("42000", "Bearer gw-token")
    flags, size = struct.unpack(">BI", start.content[:5])
    sent = pb.StartRequest.FromString(start.content[5 : 5 + size])
    assert (flags, sent.HasField("stdin"), sent.stdin, sent.HasField("pty")) == (
        0,
        True,
        False,
        False,
    )
    assert (list(sent.command.args)[-1], sent.command.cwd, dict(sent.command.envs)) == (
        "echo hi", "/w", {"K": "v"},
    )  # fmt: skip


@pytest.mark.anyio
async def test_files_jobs_and_checkpoints_take_todays_shapes(
    prime: Sdk, cloud: TodaysCloud, tmp_path: Path
) -> None:
    source = tmp_path / "up.txt"
    source.write_text("hello")
    uploaded = await prime.upload_file("sbx-today", "/workspace/up.txt", str(source))
    assert (uploaded.success, uploaded.size) == (True, 5)
    read = await prime.read_file("sbx-today", "/tmp/x")
    assert (read["content"], read["truncated"]) == ("0\n", False)  # windowless answers read too
    job = BackgroundJob.for_id("0123abcd", "sbx-today")
    [snapshot] = await prime.get_background_job_statuses([job])
    assert (snapshot.completed, snapshot.exit_code) == (True, 3)
    assert cloud.bodies("background-jobs/status:batchGet") == [
        {"jobs": [{"sandbox_id": "sbx-today", "job_id": "0123abcd"}]}
    ]
    pending = await prime.checkpoint("sbx-today")
    assert (pending.id, pending.state) == ("cp-1", "PENDING")
    durable = await prime.wait_for_checkpoint("cp-1")
    assert (durable.state, durable.occupied_bytes) == ("DURABLE", 2097152)
    assert [c.id for c in await prime.list_checkpoints("sbx-today")] == ["cp-1"]
    batch = await prime.get_checkpoints(["cp-1", "cp-none"])
    assert [e.code for e in batch.errors] == ["NOT_FOUND"]
    assert cloud.bodies("checkpoints:batchGet") == [{"checkpoint_ids": ["cp-1", "cp-none"]}]
    removed = await prime.delete_sandbox_checkpoints("sbx-today")
    assert [(e.checkpoint_id, e.code) for e in removed.errors] == [("cp-2", "CONFLICT")]
    assert all(API_KEY not in r.headers.get("authorization", "") for r in cloud.requests
               if r.url.host == "gateway.prime.test"), "the API key went to a gateway"  # fmt: skip
