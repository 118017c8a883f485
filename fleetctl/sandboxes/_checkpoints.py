"""Checkpoints: a sandbox's files frozen, to start new sandboxes from (today's API)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from fleetctl.sandboxes import errors
from fleetctl.sandboxes._calls import Call, Op, Sleep, model, ok, sandbox_path
from fleetctl.sandboxes._calls import unsupported as unsupported_endpoint
from fleetctl.sandboxes._control import POLL_FIRST, POLL_MAX, ControlOps, batch_ids
from fleetctl.sandboxes.models import (
    BatchCheckpointResponse,
    CheckpointList,
    CheckpointLookupError,
    DeleteSandboxCheckpointsResponse,
    SandboxCheckpoint,
)

#: States a checkpoint never leaves without being DURABLE.
UNRESTORABLE = frozenset({"FAILED", "DELETING"})


class CheckpointOps(ControlOps):
    def checkpoint(self, sandbox_id: str) -> Op[SandboxCheckpoint]:
        """Freeze the sandbox's files (its writable layer and workspace) as a checkpoint;
        it is PENDING at first: `wait_for_checkpoint` before creating from it."""
        response = yield Call("POST", sandbox_path(sandbox_id, "checkpoints"), retryable=False)
        return model(SandboxCheckpoint, ok(response))

    def get_checkpoint(self, checkpoint_id: str) -> Op[SandboxCheckpoint]:
        response = yield Call("GET", _path(checkpoint_id))
        return model(SandboxCheckpoint, ok(response))

    def list_checkpoints(
        self, sandbox_id: str, checkpoint_id: str | None = None
    ) -> Op[list[SandboxCheckpoint]]:
        """The sandbox's checkpoints, oldest first (or only `checkpoint_id`)."""
        params = {"checkpoint_id": checkpoint_id} if checkpoint_id else None
        response = yield Call("GET", sandbox_path(sandbox_id, "checkpoints"), params=params)
        return model(CheckpointList, ok(response)).checkpoints

    def delete_checkpoint(self, checkpoint_id: str) -> Op[None]:
        """Delete a checkpoint (HTTP 409 while it is pending, or while a running sandbox
        started from it needs its files)."""
        ok((yield Call("DELETE", _path(checkpoint_id))))

    def delete_sandbox_checkpoints(self, sandbox_id: str) -> Op[DeleteSandboxCheckpointsResponse]:
        """Delete every checkpoint of the sandbox; those kept are in `errors` with why."""
        response = yield Call("DELETE", sandbox_path(sandbox_id, "checkpoints"))
        return model(DeleteSandboxCheckpointsResponse, ok(response))

    def get_checkpoints(self, checkpoint_ids: Sequence[str]) -> Op[BatchCheckpointResponse]:
        """Up to 100 checkpoints of any sandboxes in one call; unknown ids are in `errors`."""
        ids = batch_ids(checkpoint_ids, "checkpoint_ids")
        body = {"checkpoint_ids": ids}
        response = yield Call("POST", "/sandbox/checkpoints:batchGet", json=body)
        if not unsupported_endpoint(response):
            return model(BatchCheckpointResponse, ok(response))
        found = BatchCheckpointResponse(checkpoints=[], errors=[])
        for checkpoint_id in ids:  # an API without the batch call: one by one
            try:
                found.checkpoints.append((yield from self.get_checkpoint(checkpoint_id)))
            except errors.APIError as exc:
                if exc.status_code != 404:
                    raise
                missing = CheckpointLookupError(
                    checkpoint_id=checkpoint_id, code="NOT_FOUND", message=str(exc)
                )
                found.errors.append(missing)
        return found

    def wait_for_checkpoint(
        self, checkpoint_id: str, timeout_seconds: float = 300
    ) -> Op[SandboxCheckpoint]:
        """Poll until the checkpoint is DURABLE and return it; RuntimeError if it FAILED,
        TimeoutError after `timeout_seconds`."""
        if not math.isfinite(timeout_seconds) or timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be finite and greater than zero")
        deadline, delay = time.monotonic() + timeout_seconds, POLL_FIRST
        while True:
            checkpoint = yield from self.get_checkpoint(checkpoint_id)
            if checkpoint.state == "DURABLE":
                return checkpoint
            if checkpoint.state in UNRESTORABLE:
                detail = checkpoint.error or "no detail"
                raise RuntimeError(f"checkpoint {checkpoint_id} cannot become durable (state "
                                   f"{checkpoint.state}): {detail}")  # fmt: skip
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"checkpoint {checkpoint_id} was not DURABLE within "
                                   f"{timeout_seconds:g}s (state {checkpoint.state})")  # fmt: skip
            yield Sleep(min(delay, left))
            delay = min(delay * 1.5, POLL_MAX)


def _path(checkpoint_id: str) -> str:
    return sandbox_path("checkpoints", checkpoint_id)
