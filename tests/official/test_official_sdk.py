"""The official `prime-sandboxes` SDK, unmodified, against a real fleetctl server.

Runs inside the venv of one release (see conftest.py): every test that release can
run. Everything a test creates is bulk-deleted through the raw API afterwards, even
if the SDK failed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prime_sandboxes import (
    APIClient,
    APIError,
    AsyncSandboxClient,
    BackgroundJobStatus,
    CommandTimeoutError,
    CreateSandboxRequest,
    Sandbox,
    SandboxClient,
    SandboxFileNotFoundError,
    SandboxNotRunningError,
    UnauthorizedError,
)

from tests.official.release import RELEASE

T = TypeVar("T")


@pytest.fixture
def made(api: httpx.Client) -> Iterator[list[str]]:
    """Ids of sandboxes a test created; all deleted through the raw API afterwards."""
    ids: list[str] = []
    yield ids
    if ids:
        api.request("DELETE", "/sandbox", json={"sandbox_ids": ids})


def request(**fields: Any) -> CreateSandboxRequest:
    """A small sandbox request; keyword arguments override the defaults. A shell start
    command is sent in the form the release takes (0.2.39 on: an executable and args)."""
    command = fields.get("start_command")
    if isinstance(command, str) and RELEASE >= (0, 2, 39):
        from prime_sandboxes import StartCommand  # noqa: PLC0415 - not in 0.2.31

        fields["start_command"] = StartCommand(executable="/bin/sh", args=["-c", command])
    return CreateSandboxRequest(
        **{"name": "sdk", "docker_image": "python:3.11-slim", "memory_gb": 0.5, **fields}
    )


@dataclass
class Prime:
    """The sync SDK client, remembering every sandbox it creates."""

    client: SandboxClient
    made: list[str] = field(default_factory=list)

    def create(self, **fields: Any) -> Sandbox:
        sandbox = self.client.create(request(**fields))
        self.made.append(sandbox.id)
        return sandbox

    def running(self, **fields: Any) -> Sandbox:
        sandbox = self.create(**fields)
        self.client.wait_for_creation(sandbox.id)
        return sandbox

    def raw(self, path: str) -> str:
        """A control-plane GET through the SDK's own API client, as unparsed JSON text."""
        return json.dumps(self.client.client.request("GET", path))


@pytest.fixture
def prime(prime_home: Path, made: list[str]) -> Iterator[Prime]:
    api_client = APIClient()
    try:
        yield Prime(SandboxClient(api_client), made)
    finally:
        api_client.client.close()


def poll(check: Callable[[], T | None], timeout: float = 30) -> T:
    """Call `check` until it returns something other than None; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while (result := check()) is None:
        assert time.monotonic() < deadline, f"no result after {timeout}s"
        time.sleep(0.05)
    return result


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_create_passes_labels_env_and_secrets_and_never_reads_the_secret_back(
    prime: Prime, prime_home: Path
) -> None:
    canary = f"sk-CANARY-sdk-{uuid.uuid4().hex}"
    label = unique("t-sdk-create")
    created = prime.create(
        name="sdk-create",
        labels=[label, "x"],
        environment_vars={"A": "1"},
        secrets={"TOKEN": canary},
    )
    assert created.status in ("PENDING", "PROVISIONING", "RUNNING")
    assert (created.name, created.labels, created.memory_gb) == ("sdk-create", [label, "x"], 0.5)
    assert created.environment_vars == {"A": "1"}
    prime.client.wait_for_creation(created.id)
    result = prime.client.execute_command(created.id, "echo $TOKEN $A")
    assert (result.stdout, result.exit_code) == (f"{canary} 1\n", 0)
    reads = [
        created.model_dump_json(),
        prime.client.get(created.id).model_dump_json(),
        prime.client.list(labels=[label]).model_dump_json(),
        prime.client.get_logs(created.id),
        prime.raw(f"/sandbox/{created.id}"),
        prime.raw("/sandbox"),
        prime.raw(f"/sandbox/{created.id}/logs"),
        (prime_home / ".prime" / "sandbox_auth_cache.json").read_text(),
    ]
    assert not [text for text in reads if canary in text]


def test_wait_for_creation_returns_once_exec_works(prime: Prime) -> None:
    created = prime.create(name="sdk-wait")
    prime.client.wait_for_creation(created.id)
    assert prime.client.get(created.id).status == "RUNNING"
    assert prime.client.execute_command(created.id, "true", timeout=10).exit_code == 0


def test_wait_for_creation_raises_when_the_main_process_exits(prime: Prime) -> None:
    created = prime.create(name="sdk-exit", start_command="exit 3")
    with pytest.raises(SandboxNotRunningError) as caught:
        prime.client.wait_for_creation(created.id)
    assert (caught.value.sandbox_id, caught.value.status) == (created.id, "TERMINATED")
    assert prime.client.get(created.id).exit_code == 3


def test_bulk_wait_for_creation_reports_ready_sandboxes_and_raises_on_failed_ones(
    prime: Prime,
) -> None:
    ids = [prime.create(name=f"sdk-bw{i}").id for i in range(2)]
    assert prime.client.bulk_wait_for_creation(ids) == dict.fromkeys(ids, "RUNNING")
    failed = prime.create(name="sdk-bw-exit", start_command="exit 3")
    with pytest.raises(RuntimeError, match=f"Sandboxes failed: .*{failed.id}.*TERMINATED"):
        prime.client.bulk_wait_for_creation([ids[0], failed.id])


def test_list_with_repeated_labels_returns_sandboxes_having_all_of_them(prime: Prime) -> None:
    label = unique("t-sdk-list")
    ids = [prime.create(name=f"sdk-l{i}", labels=[label, f"n{i % 2}"]).id for i in range(3)]
    everything = prime.client.list(labels=[label])
    assert sorted(s.id for s in everything.sandboxes) == sorted(ids)
    assert everything.total == 3
    both = prime.client.list(labels=[label, "n0"])
    assert sorted(s.id for s in both.sandboxes) == sorted([ids[0], ids[2]])
    assert all(set(s.labels) >= {label, "n0"} for s in both.sandboxes)
    assert prime.client.list(labels=[label, "n0", "n1"]).sandboxes == []
    first = prime.client.list(labels=[label], per_page=2)
    assert (len(first.sandboxes), first.has_next, first.per_page) == (2, True, 2)


def test_execute_command_reports_output_exit_code_working_dir_and_env(
    prime: Prime, prime_home: Path
) -> None:
    sandbox = prime.running(name="sdk-exec", environment_vars={"BASE": "b"})
    result = prime.client.execute_command(
        sandbox.id,
        "pwd; echo $BASE $EXTRA; echo oops >&2; exit 7",
        working_dir="/tmp",
        env={"EXTRA": "e"},
    )
    assert (result.stdout, result.stderr, result.exit_code) == ("/tmp\nb e\n", "oops\n", 7)
    again = prime.client.execute_command(sandbox.id, "echo ${EXTRA:-unset}")
    assert (again.stdout, again.exit_code) == ("unset\n", 0)
    cache = json.loads((prime_home / ".prime" / "sandbox_auth_cache.json").read_text())
    assert sandbox.id in cache


def test_execute_command_runs_as_the_user_asked_for(prime: Prime) -> None:
    """The SDK sends `user` (docker exec -u semantics): names from the sandbox's own
    passwd, bare ids, root; a name it does not have is refused, never run as root."""
    sandbox = prime.running(name="sdk-user")
    ran = prime.client.execute_command(sandbox.id, "id -un; id -u; touch /workspace/x",
                                       user="nobody")  # fmt: skip
    assert ran.stdout == "nobody\n65534\n", ran
    assert ran.exit_code == 1  # /workspace is root's
    assert prime.client.execute_command(sandbox.id, "id -u; id -g", user="1234:99").stdout == (
        "1234\n99\n"
    )
    with pytest.raises(APIError, match=r"cannot run as user 'ghost'.*no matching entries"):
        prime.client.execute_command(sandbox.id, "id -un", user="ghost")
    assert prime.client.execute_command(sandbox.id, "id -un", user="root").stdout == "root\n"


def test_upload_then_download_round_trips_the_bytes(prime: Prime, tmp_path: Path) -> None:
    sandbox = prime.running(name="sdk-files")
    payload = os.urandom(1024 * 1024 + 17)
    local = tmp_path / "up.bin"
    local.write_bytes(payload)
    uploaded = prime.client.upload_file(sandbox.id, "/workspace/deep/dir/up.bin", str(local))
    assert (uploaded.success, uploaded.path, uploaded.size) == (
        True,
        "/workspace/deep/dir/up.bin",
        len(payload),
    )
    back = tmp_path / "back" / "down.bin"
    prime.client.download_file(sandbox.id, "/workspace/deep/dir/up.bin", str(back))
    assert back.read_bytes() == payload
    size = prime.client.execute_command(sandbox.id, "stat -c %s /workspace/deep/dir/up.bin")
    assert size.stdout == f"{len(payload)}\n"


def test_read_file_reads_the_whole_file_or_a_window_of_it(prime: Prime) -> None:
    sandbox = prime.running(name="sdk-read")
    prime.client.execute_command(sandbox.id, "printf 0123456789 > /workspace/digits")
    whole = prime.client.read_file(sandbox.id, "/workspace/digits")
    assert (whole.content, whole.size) == ("0123456789", 10)
    window = prime.client.read_file(sandbox.id, "/workspace/digits", offset=2, length=3)
    assert (window.content, window.offset, window.total_size, window.truncated) == (
        "234", 2, 10, True,
    )  # fmt: skip
    tail = prime.client.read_file(sandbox.id, "/workspace/digits", offset=-4, length=10)
    assert (tail.content, tail.offset) == ("6789", 6)


def test_get_logs_returns_the_main_process_output(prime: Prime) -> None:
    marker = unique("hello-from-sdk")
    sandbox = prime.running(name="sdk-logs", start_command=f"echo {marker}; exec sleep 600")

    def logged() -> str | None:
        logs = prime.client.get_logs(sandbox.id)
        return logs if marker in logs else None

    assert marker in poll(logged)


def test_background_job_completes_with_exit_code_and_output(prime: Prime) -> None:
    sandbox = prime.running(name="sdk-job")
    job = prime.client.start_background_job(
        sandbox.id,
        "sleep 1; pwd; echo $K; echo err >&2; exit 4",
        working_dir="/tmp",
        env={"K": "v 1"},
    )
    assert job.sandbox_id == sandbox.id
    assert not prime.client.get_background_job(sandbox.id, job).completed

    def finished() -> BackgroundJobStatus | None:
        status = prime.client.get_background_job(sandbox.id, job)
        return status if status.completed else None

    status = poll(finished)
    assert (status.exit_code, status.stdout, status.stderr) == (4, "/tmp\nv 1\n", "err\n")
    assert (status.stdout_truncated, status.stderr_truncated) == (False, False)


def test_bulk_delete_by_labels_and_by_ids_reports_succeeded_and_failed(prime: Prime) -> None:
    label = unique("t-sdk-bulk")
    a = prime.create(name="sdk-b1", labels=[label, "y"])
    b = prime.create(name="sdk-b2", labels=[label])
    c = prime.create(name="sdk-b3", labels=[label, "y"])
    by_labels = prime.client.bulk_delete(labels=[label, "y"])
    assert sorted(by_labels.succeeded) == sorted([a.id, c.id])
    assert by_labels.failed == []
    assert prime.client.get(b.id).status != "TERMINATED"
    missing = unique("sbx-missing")
    by_ids = prime.client.bulk_delete(sandbox_ids=[b.id, missing])
    assert by_ids.succeeded == [b.id]
    assert [entry["sandbox_id"] for entry in by_ids.failed] == [missing]
    assert {prime.client.get(s.id).status for s in (a, b, c)} == {"TERMINATED"}
    active = prime.client.list(labels=[label], exclude_terminated=True)
    assert active.sandboxes == []


def test_failures_surface_as_the_sdk_exceptions(prime: Prime) -> None:
    sandbox = prime.running(name="sdk-errors")
    with pytest.raises(CommandTimeoutError, match="timed out after 1s"):
        prime.client.execute_command(sandbox.id, "sleep 30", timeout=1)
    with pytest.raises(SandboxFileNotFoundError):
        prime.client.read_file(sandbox.id, "/workspace/none")
    with pytest.raises(APIError, match="HTTP 404"):
        prime.client.get(unique("sbx-missing"))
    stranger = APIClient(api_key="wrong")
    try:
        with pytest.raises(UnauthorizedError):
            SandboxClient(stranger).list()
    finally:
        stranger.client.close()
    prime.client.delete(sandbox.id)
    with pytest.raises(SandboxNotRunningError) as caught:
        prime.client.execute_command(sandbox.id, "true")
    assert caught.value.status == "TERMINATED"


@pytest.mark.anyio
async def test_async_client_creates_waits_executes_and_deletes(
    prime_home: Path, made: list[str]
) -> None:
    async with AsyncSandboxClient() as client:
        created = await client.create(request(name="sdk-async", environment_vars={"A": "a"}))
        made.append(created.id)
        await client.wait_for_creation(created.id)
        result = await client.execute_command(created.id, "echo $A $B", env={"B": "b"})
        assert (result.stdout, result.stderr, result.exit_code) == ("a b\n", "", 0)
        await client.delete(created.id)
        assert (await client.get(created.id)).status == "TERMINATED"


@pytest.mark.since("0.5.1")
@pytest.mark.anyio
async def test_open_process_streams_output_takes_stdin_and_answers_signals(
    prime_home: Path, made: list[str]
) -> None:
    async with AsyncSandboxClient() as client:
        created = await client.create(request(name="sdk-process", environment_vars={"A": "a"}))
        made.append(created.id)
        await client.wait_for_creation(created.id)
        process = await client.open_process(
            created.id, 'echo "ready $A $B"; read line; echo "got $line"; exec sleep 300',
            working_dir="/tmp", env={"B": "b"},
        )  # fmt: skip
        assert process.pid > 0
        seen = b""
        await process.write_stdin(b"hello\n")
        async for chunk in process.stdout:
            seen += chunk
            if b"got hello" in seen:
                break
        assert seen == b"ready a b\ngot hello\n"
        await process.terminate()
        assert await process.wait() == 128 + 15
        assert process.returncode == 128 + 15
        stubborn = await client.open_process(created.id, "trap '' TERM; exec sleep 300")
        await stubborn.kill()
        assert await stubborn.wait() == 128 + 9


@pytest.mark.since("0.5.1")
@pytest.mark.anyio
async def test_open_process_reattaches_after_its_stream_is_cut(
    prime_home: Path, made: list[str], api: httpx.Client
) -> None:
    """The server drops the connection of the process's stream, as a flaky network would:
    the client re-attaches by its session uuid and the process's output and end arrive."""
    async with AsyncSandboxClient() as client:
        created = await client.create(request(name="sdk-reattach"))
        made.append(created.id)
        await client.wait_for_creation(created.id)
        process = await client.open_process(created.id, "echo ready; read x; echo got $x; exit 6")
        seen = b""
        async for chunk in process.stdout:
            seen += chunk
            if b"ready\n" in seen:
                break
        cut = api.post("/_fleetctl/faults/cut-streams", json={"sandbox_id": created.id})
        assert cut.json() == {"cut": 1}
        await process.write_stdin(b"x\n")
        async for chunk in process.stdout:
            seen += chunk
        assert seen == b"ready\ngot x\n"
        assert await process.wait() == 6


@pytest.mark.since("0.5.1")
def test_recorded_shapes_of_todays_api_are_this_releases() -> None:
    """tests/sandboxes/prime-0.5.1.json, which fleetctl's own client is tested against,
    holds what this release sends and takes: checked here with its own models."""
    from prime_sandboxes import models  # noqa: PLC0415 - names of 0.5.1 only

    shapes = json.loads((Path(__file__).parents[1] / "sandboxes" / "prime-0.5.1.json").read_text())
    assert set(models.CreateSandboxRequest.model_fields) == set(shapes["create_fields"])
    models.Sandbox.model_validate(shapes["sandbox"])
    models.SandboxListResponse.model_validate(shapes["sandbox_list"])
    models.BatchSandboxStatusResponse.model_validate(shapes["status_batch"])
    models.BatchBackgroundJobStatusResponse.model_validate(shapes["job_batch"])
    models.SandboxCheckpoint.model_validate(shapes["checkpoint"])
    models.BatchCheckpointResponse.model_validate(
        {"checkpoints": [shapes["checkpoint"]], "errors": shapes["checkpoint_batch_errors"]}
    )
    models.DeleteSandboxCheckpointsResponse.model_validate(shapes["checkpoints_deleted"])
    models.ReadFileResponse.model_validate(shapes["read_file"])
    models.FileUploadResponse.model_validate(shapes["upload"])
    models.BulkDeleteSandboxResponse.model_validate(shapes["bulk_delete"])
    assert set(shapes["auth"]) == {"gateway_url", "user_ns", "job_id", "token", "expires_at"}


@pytest.mark.since("0.5.1")
def test_checkpoint_restores_files_into_new_sandboxes_and_is_kept_while_used(
    prime: Prime,
) -> None:
    source = prime.running(name="sdk-ckpt")
    setup = (
        "echo state > /workspace/s.txt; mkdir -p /usr/local/lib/k; echo kept > /usr/local/lib/k/f"
    )
    prime.client.execute_command(source.id, setup)
    checkpoint = prime.client.checkpoint(source.id)
    assert (checkpoint.sandbox_id, checkpoint.state) == (source.id, "PENDING")
    durable = prime.client.wait_for_checkpoint(checkpoint.id)
    assert durable.state == "DURABLE"
    assert [c.id for c in prime.client.list_checkpoints(source.id)] == [checkpoint.id]
    restored = prime.client.create(CreateSandboxRequest(name="sdk-restored",
                                                        checkpoint_id=checkpoint.id))  # fmt: skip
    prime.made.append(restored.id)
    prime.client.wait_for_creation(restored.id)
    result = prime.client.execute_command(
        restored.id, "cat /workspace/s.txt /usr/local/lib/k/f; echo more >> /workspace/s.txt"
    )
    assert (result.stdout, result.exit_code) == ("state\nkept\n", 0)
    unchanged = prime.client.execute_command(source.id, "cat /workspace/s.txt")
    assert unchanged.stdout == "state\n"
    with pytest.raises(APIError, match="409"):
        prime.client.delete_checkpoint(checkpoint.id)  # restored by a live sandbox
    prime.client.delete(restored.id)
    prime.client.delete_checkpoint(checkpoint.id)
    with pytest.raises(APIError, match="404"):
        prime.client.get_checkpoint(checkpoint.id)


@pytest.mark.since("0.5.1")
def test_background_jobs_report_through_the_probe_and_the_batch_endpoint(prime: Prime) -> None:
    sandbox = prime.running(name="sdk-jobs")
    quick = prime.client.start_background_job(sandbox.id, "echo out; echo err >&2; exit 5")
    slow = prime.client.start_background_job(sandbox.id, "sleep 300")

    def finished() -> BackgroundJobStatus | None:
        status = prime.client.get_background_job(sandbox.id, quick)
        return status if status.completed else None

    status = poll(finished)
    assert (status.exit_code, status.stdout, status.stderr) == (5, "out\n", "err\n")
    snapshots = prime.client.get_background_job_statuses([quick, slow])
    assert [(s.completed, s.exit_code) for s in snapshots] == [(True, 5), (False, None)]


@pytest.mark.since("0.5.1")
def test_the_egress_entry_contract_matches_this_releases() -> None:
    """fleetctl.egress (the server's and fleetctl's check) decides each recorded entry as
    this release's own client-side check does, message for message."""
    from prime_sandboxes.models import _validate_egress_entry  # noqa: PLC0415 - 0.5.1 only

    shapes = json.loads((Path(__file__).parents[1] / "sandboxes" / "prime-0.5.1.json").read_text())
    decided: dict[str, str | None] = {}
    for entry in shapes["egress_entries"]:
        try:
            _validate_egress_entry(entry)
            decided[entry] = None
        except ValueError as exc:
            decided[entry] = str(exc)
    assert decided == shapes["egress_entries"]
