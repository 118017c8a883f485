"""A sandbox group's `prepare:` step: run once, checkpointed, its checkpoint shared.

The setup runs in a sandbox of its own, made with the group's image (or checkpoint),
size, network, environment and secrets, but none of fleetctl's ownership labels: no
plan counts it, and it is deleted once its files are checkpointed (its lifetime is the
setup's timeout, should an apply die meanwhile). The command runs as a background job,
so a setup may take longer than one exec may. The group's sandboxes then start from
the checkpoint and carry its id and the setup digest (`SETUP_LABEL`), which is how a
later apply finds the checkpoint again instead of preparing anew.

Checkpoints a run leaves unused (the sandboxes that stood on them were deleted or
replaced) are deleted after it; the API keeps one that is still in use (409).
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterable, Sequence

import anyio

from fleetctl.apply.events import Emit, Kind, event
from fleetctl.apply.request import sandbox_request
from fleetctl.plan.identity import CHECKPOINT_LABEL, SETUP_LABEL, fleet_label
from fleetctl.sandboxes import (
    APIError,
    AsyncSandboxClient,
    BackgroundJobStatus,
)
from fleetctl.spec.expand import DesiredSandbox

#: The background job id of a setup inside its sandbox.
SETUP_JOB = "fleetctl-prepare"
#: Minutes a setup sandbox may outlive its command's timeout (to be checkpointed).
MARGIN_MINUTES = 10
POLL_FIRST, POLL_MAX = 0.2, 2.0


class SetupFailed(RuntimeError):
    """A `prepare:` command failed; its group's sandboxes are not created."""


def setup_labels(setup: str, checkpoint: str) -> list[str]:
    """The labels of a sandbox started from a setup's checkpoint."""
    return [SETUP_LABEL + setup, CHECKPOINT_LABEL + checkpoint]


async def checkpoint_for(
    client: AsyncSandboxClient,
    desired: DesiredSandbox,
    secrets: dict[str, str],
    setup: str,
    emit: Emit,
) -> str:
    """The id of a DURABLE checkpoint of `desired`'s setup: an earlier apply's, or a new
    one. Raises SetupFailed, or the SDK's errors."""
    key = f"{desired.group} (prepare)"
    reused = await _reusable(client, desired.fleet, setup)
    if reused is not None:
        emit(event(Kind.PREPARED, key, checkpoint=reused, reused=True))
        return reused
    prepare = desired.prepare
    assert prepare is not None
    request = sandbox_request(
        desired, secrets, checkpoint=desired.from_checkpoint,
        name=f"{desired.fleet}-{desired.group}-prepare", labels=[SETUP_LABEL + setup],
        timeout_minutes=prepare.timeout_minutes + MARGIN_MINUTES,
    )  # fmt: skip
    sandbox = await client.create(request)
    emit(event(Kind.PREPARING, key, id=sandbox.id, command=prepare.command))
    try:
        await client.wait_for_creation(sandbox.id)
        status = await _run(client, sandbox.id, prepare.command, prepare.timeout_minutes)
        if status.exit_code != 0:
            tail = (status.stderr or status.stdout or "").strip()[-800:]
            raise SetupFailed(f"prepare of group {desired.group} exited with code "
                              f"{status.exit_code}{': ' + tail if tail else ''}")  # fmt: skip
        pending = await client.checkpoint(sandbox.id)
        durable = await client.wait_for_checkpoint(pending.id, timeout_seconds=30 * 60)
    finally:
        with anyio.CancelScope(shield=True):
            await _discard(client, sandbox.id)
    emit(event(Kind.PREPARED, key, checkpoint=durable.id, reused=False))
    return durable.id


async def _run(
    client: AsyncSandboxClient, sandbox_id: str, command: str, minutes: int
) -> BackgroundJobStatus:
    job = await client.start_background_job(
        sandbox_id, f"timeout {minutes * 60} sh -c {shlex.quote(command)}", job_id=SETUP_JOB
    )
    delay = POLL_FIRST
    with anyio.fail_after(minutes * 60 + 60):  # the job's own timeout ends it first
        while not (status := await client.get_background_job(sandbox_id, job)).completed:
            await anyio.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX)
    return status


async def _reusable(client: AsyncSandboxClient, fleet: str, setup: str) -> str | None:
    """A durable checkpoint of this setup that an earlier apply made, if one is left."""
    listed = await client.list(labels=[fleet_label(fleet), SETUP_LABEL + setup], per_page=20)
    for checkpoint_id in dict.fromkeys(_checkpoints(s.labels for s in listed.sandboxes)):
        try:
            if (await client.get_checkpoint(checkpoint_id)).state == "DURABLE":
                return checkpoint_id
        except APIError as exc:
            if exc.status_code != 404:
                raise
    return None


def _checkpoints(label_lists: Iterable[Sequence[str]]) -> list[str]:
    return [label.removeprefix(CHECKPOINT_LABEL) for labels in label_lists for label in labels
            if label.startswith(CHECKPOINT_LABEL)]  # fmt: skip


async def release(client: AsyncSandboxClient, removed: Iterable[Sequence[str]],
                  kept: set[str], emit: Emit) -> None:  # fmt: skip
    """Delete the setup checkpoints of removed sandboxes that nothing of this run uses;
    the API refuses (409) one that a sandbox still stands on, which is then kept."""
    for checkpoint_id in dict.fromkeys(_checkpoints(removed)):
        if checkpoint_id in kept:
            continue
        try:
            await client.delete_checkpoint(checkpoint_id)
        except APIError as exc:
            if exc.status_code not in (404, 409):
                raise
            continue
        emit(event(Kind.RELEASED, checkpoint_id))


async def _discard(client: AsyncSandboxClient, sandbox_id: str) -> None:
    with contextlib.suppress(APIError):  # its lifetime ends it anyway
        await client.delete(sandbox_id)
