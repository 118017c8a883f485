"""Today's sandbox API through fleetctl.sandboxes: exec over whichever transport a server
offers, batch status calls, background jobs in batches, checkpoints and idle timeouts,
sync and async, against real servers."""

from __future__ import annotations

import time
import uuid

import anyio
import httpx
import pytest
from pydantic import ValidationError

from fleetctl.sandboxes import (
    APIError,
    CreateSandboxRequest,
    SandboxNotRunningError,
    SandboxTimeoutError,
)
from tests.conftest import Server, acontrol
from tests.sandboxes.support import Connect, Dialect, Flavor, New, Sdk, Tap, started

pytestmark = pytest.mark.anyio


# -- exec, over both transports ------------------------------------------------------


async def test_exec_uses_the_command_session_where_offered_and_rest_elsewhere(
    connect: Connect, flavor: Flavor, new: New, target: Server, dialect: Dialect
) -> None:
    tap = Tap()
    sdk = connect(flavor, target, transport=tap)
    sandbox = await started(sdk, new())
    for n in range(3):
        assert (await sdk.execute_command(sandbox.id, f"echo {n}")).stdout == f"{n}\n"
    if dialect == "connect":
        assert (tap.count("/Start"), tap.count("/exec")) == (3, 0)
    else:  # asked once, then REST for good
        assert (tap.count("/Start"), tap.count("/exec")) == (1, 3)


async def test_output_keeps_every_character_and_replaces_bytes_that_are_not_utf8(
    sdk: Sdk, new: New
) -> None:
    sandbox = await started(sdk, new())
    wide = await sdk.execute_command(sandbox.id, "python3 -c \"print('é✓𝄞' * 100000)\"")
    assert wide.stdout == "é✓𝄞" * 100000 + "\n"
    broken = await sdk.execute_command(sandbox.id, "printf 'a\\377b'; printf '\\376' >&2")
    assert (broken.stdout, broken.stderr) == ("a\ufffdb", "\ufffd")


# -- batch status ----------------------------------------------------------------------


async def test_batch_status_reports_every_id_and_unknown_ones_as_errors(
    sdk: Sdk, new: New, target: Server
) -> None:
    running = await started(sdk, new())
    ended = await started(sdk, new())
    await acontrol(target, "DELETE", f"/sandbox/{ended.id}")
    unknown = f"sbx-{uuid.uuid4().hex[:8]}"
    batch = await sdk.get_sandbox_statuses([running.id, ended.id, unknown])
    assert {s.sandbox_id: s.status for s in batch.statuses} == {
        running.id: "RUNNING",
        ended.id: "TERMINATED",
    }
    assert [(e.sandbox_id, e.code) for e in batch.errors] == [(unknown, "NOT_FOUND")]
    for bad in ([], ["a", "a"], [f"s{i}" for i in range(101)]):
        with pytest.raises(ValueError, match="sandbox_ids"):
            await sdk.get_sandbox_statuses(bad)


async def test_waiting_on_an_api_without_batch_status_reads_each_sandbox(
    connect: Connect, flavor: Flavor, new: New
) -> None:
    def no_batch(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith("status:batchGet"):  # an API older than batch status
            return httpx.Response(404, json={"detail": "Not Found"})
        return None

    tap = Tap(no_batch)
    sdk = connect(flavor, transport=tap)
    sandboxes = [await sdk.create(new()) for _ in range(2)]
    await sdk.bulk_wait_for_creation([s.id for s in sandboxes])
    statuses = await sdk.get_sandbox_statuses([s.id for s in sandboxes])
    assert {s.status for s in statuses.statuses} == {"RUNNING"}
    assert all(tap.count(f"/sandbox/{s.id}") for s in sandboxes)


# -- background jobs in batches --------------------------------------------------------


async def test_job_batches_keep_the_order_given_and_read_output_of_finished_jobs(
    sdk: Sdk, new: New
) -> None:
    first, second = await started(sdk, new()), await started(sdk, new())
    quick = await sdk.start_background_job(first.id, "echo out; echo err >&2; exit 5")
    slow = await sdk.start_background_job(second.id, "sleep 300")

    async def settled() -> bool:
        snapshots = await sdk.get_background_job_statuses([slow, quick])
        return snapshots[1].completed

    deadline = time.monotonic() + 30
    while not await settled():
        assert time.monotonic() < deadline, "the quick job did not finish in 30 s"
        await anyio.sleep(0.05)
    snapshots = await sdk.get_background_job_statuses([slow, quick])
    assert [(s.sandbox_id, s.completed, s.exit_code) for s in snapshots] == [
        (second.id, False, None),
        (first.id, True, 5),
    ]
    jobs = await sdk.get_background_jobs([quick, slow])
    assert (jobs[0].exit_code, jobs[0].stdout, jobs[0].stderr) == (5, "out\n", "err\n")
    assert (jobs[1].completed, jobs[1].stdout) == (False, None)
    with pytest.raises(ValueError, match="repeat"):
        await sdk.get_background_jobs([quick, quick])


async def test_a_job_whose_sandbox_ended_raises_not_running(
    sdk: Sdk, new: New, target: Server
) -> None:
    sandbox = await started(sdk, new())
    job = await sdk.start_background_job(sandbox.id, "sleep 300")
    await acontrol(target, "DELETE", f"/sandbox/{sandbox.id}")
    with pytest.raises(SandboxNotRunningError):
        await sdk.get_background_job_statuses([job])


# -- checkpoints -----------------------------------------------------------------------


async def test_a_sandbox_created_from_a_checkpoint_starts_with_its_files(
    sdk: Sdk, new: New, label: str
) -> None:
    source = await started(sdk, new())
    setup = (
        "echo state > /workspace/s.txt; mkdir -p /usr/local/lib/k; echo kept > /usr/local/lib/k/f"
    )
    assert (await sdk.execute_command(source.id, setup)).exit_code == 0
    pending = await sdk.checkpoint(source.id)
    assert (pending.sandbox_id, pending.state, pending.docker_image) == (
        source.id, "PENDING", "python:3.11-slim",
    )  # fmt: skip
    durable = await sdk.wait_for_checkpoint(pending.id)
    assert (durable.id, durable.state, durable.depth) == (pending.id, "DURABLE", 0)
    restored = await sdk.create(
        CreateSandboxRequest(name="restored", checkpoint_id=durable.id, memory_gb=0.25,
                             labels=[label])
    )  # fmt: skip
    assert restored.docker_image == "python:3.11-slim"
    await sdk.wait_for_creation(restored.id)
    files = await sdk.execute_command(restored.id, "cat /workspace/s.txt /usr/local/lib/k/f")
    assert (files.stdout, files.exit_code) == ("state\nkept\n", 0)
    assert [c.id for c in await sdk.list_checkpoints(source.id)] == [durable.id]
    batch = await sdk.get_checkpoints([durable.id, "ckpt-none"])
    assert [c.id for c in batch.checkpoints] == [durable.id]
    assert [(e.checkpoint_id, e.code) for e in batch.errors] == [("ckpt-none", "NOT_FOUND")]
    with pytest.raises(APIError) as busy:
        await sdk.delete_checkpoint(durable.id)  # a running sandbox stands on it
    assert busy.value.status_code == 409
    await sdk.delete(restored.id)
    removed = await sdk.delete_sandbox_checkpoints(source.id)
    assert (removed.deleted, removed.errors) == ([durable.id], [])
    with pytest.raises(APIError) as gone:
        await sdk.get_checkpoint(durable.id)
    assert gone.value.status_code == 404


async def test_a_checkpoint_request_is_checked_before_any_call(sdk: Sdk) -> None:
    with pytest.raises(ValueError, match="timeout_seconds"):
        await sdk.wait_for_checkpoint("ckpt-x", timeout_seconds=0)
    with pytest.raises(ValueError, match="checkpoint_ids"):
        await sdk.get_checkpoints([])


def test_a_create_names_an_image_or_a_checkpoint_and_valid_egress_lists() -> None:
    for fields in ({}, {"docker_image": "a", "checkpoint_id": "b"}):
        with pytest.raises(ValidationError, match="exactly one of docker_image or checkpoint_id"):
            CreateSandboxRequest(name="n", **fields)
    with pytest.raises(ValidationError, match="mutually exclusive"):
        CreateSandboxRequest(name="n", docker_image="i", network_allowlist=[],
                             network_denylist=[])  # fmt: skip
    with pytest.raises(ValidationError, match="only ports 80 and 443"):
        CreateSandboxRequest(name="n", docker_image="i", network_allowlist=["example.com:22"])
    with pytest.raises(ValidationError, match="cannot exceed timeout_minutes"):
        CreateSandboxRequest(name="n", docker_image="i", timeout_minutes=5,
                             idle_timeout_minutes=6)  # fmt: skip


# -- idle timeout ----------------------------------------------------------------------


async def test_an_idle_sandbox_times_out_but_not_while_a_command_runs(
    connect: Connect, flavor: Flavor, fast_clock: Server, new: New
) -> None:
    """On the fast clock an idle minute lasts 0.6 s and the lifetime 36 s."""
    sdk = connect(flavor, fast_clock)
    sandbox = await started(sdk, new(timeout_minutes=60, idle_timeout_minutes=1))
    assert (await sdk.execute_command(sandbox.id, "sleep 2; echo busy")).stdout == "busy\n"
    deadline = time.monotonic() + 30
    while (current := await sdk.get(sandbox.id)).status == "RUNNING":
        assert time.monotonic() < deadline, "the idle sandbox kept running"
        await anyio.sleep(0.1)
    assert (current.status, current.error_type) == ("TIMEOUT", "TIMEOUT")
    assert "idle" in (current.error_message or "")
    with pytest.raises(SandboxTimeoutError):
        await sdk.execute_command(sandbox.id, "true")
