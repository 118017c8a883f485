"""Checkpoints: a sandbox's writable layer and workspace, frozen, to start new sandboxes from.

Taking one pauses the sandbox while its files are copied (the runtime's `checkpoint`);
the checkpoint is PENDING until then, DURABLE after (or FAILED). A sandbox created from
it starts with those files, stacked under its own writable layer, never copied: "set up
one environment, start 300 from it" costs one copy. A checkpoint of a sandbox that was
itself created from one is made on top of it (`parent_id`, `depth`).

A checkpoint cannot be deleted while it is PENDING, while a live sandbox starts from it
(directly or through a later checkpoint), or while another checkpoint is made on it.
"""

from __future__ import annotations

import logging
import secrets

import anyio
from anyio.abc import TaskGroup

from fleetctl.server.runtime.base import MAX_CHECKPOINT_DEPTH as MAX_DEPTH
from fleetctl.server.runtime.base import Handle, RuntimeFailure
from fleetctl.server.service.lifecycle import Lifecycle, Restore
from fleetctl.server.service.state import Busy, NotFound, Refused, Shared
from fleetctl.server.store import CheckpointRecord

log = logging.getLogger("fleetctl.server")


class Checkpoints:
    def __init__(self, shared: Shared, lifecycle: Lifecycle) -> None:
        self.shared = shared
        self.lifecycle = lifecycle
        self.store = shared.store.checkpoints
        self._group: TaskGroup | None = None

    def run(self, group: TaskGroup) -> None:
        self._group = group

    async def take(self, sandbox_id: str) -> CheckpointRecord:
        """Start a checkpoint of a running sandbox; it is PENDING until its copy is done."""
        record, handle = self.lifecycle.running(sandbox_id)
        parent_id = record.request.get("checkpoint_id")
        parent = self.store.get(parent_id) if parent_id else None
        depth = parent.depth + 1 if parent else 0
        if depth >= MAX_DEPTH:
            raise Refused(f"checkpoints can stand {MAX_DEPTH} deep at most")
        now = self.shared.clock()
        checkpoint = CheckpointRecord(
            id=f"ckpt-{secrets.token_hex(8)}", sandbox_id=sandbox_id, parent_id=parent_id,
            depth=depth, state="PENDING", docker_image=record.request["docker_image"],
            disk_size_gb=float(record.request["disk_size_gb"]), layer=None, stored_bytes=None,
            error=None, created_at=now, updated_at=now,
        )  # fmt: skip
        self.store.add(checkpoint)
        assert self._group is not None, "checkpoints not started"
        self._group.start_soon(self._copy, checkpoint.id, sandbox_id, handle)
        return checkpoint

    async def _copy(self, checkpoint_id: str, sandbox_id: str, handle: Handle) -> None:
        runtime = self.shared.runtime
        try:
            layer, size = await anyio.to_thread.run_sync(
                runtime.checkpoint, sandbox_id, handle, checkpoint_id
            )
        except (RuntimeFailure, OSError) as exc:
            log.warning("checkpoint %s of %s failed: %s", checkpoint_id, sandbox_id, exc)
            self.store.update(checkpoint_id, state="FAILED", error=str(exc))
            return
        self.store.update(checkpoint_id, state="DURABLE", layer=dict(layer), stored_bytes=size)

    def get(self, checkpoint_id: str) -> CheckpointRecord:
        found = self.store.get(checkpoint_id)
        if found is None:
            raise NotFound(f"checkpoint {checkpoint_id} not found")
        return found

    def of(self, sandbox_id: str) -> list[CheckpointRecord]:
        self.lifecycle.get(sandbox_id)
        return self.store.of(sandbox_id)

    def restore(self, checkpoint_id: str) -> Restore:
        """What a sandbox created from the checkpoint starts on; Refused unless DURABLE."""
        chain = self.store.chain(checkpoint_id)
        if not chain:
            raise NotFound(f"checkpoint {checkpoint_id} not found")
        newest = chain[-1]
        if newest.state != "DURABLE":
            raise Refused(f"checkpoint {checkpoint_id} is {newest.state}; only a DURABLE "
                          "checkpoint can be restored")  # fmt: skip
        layers = tuple(c.layer for c in chain if c.layer is not None)
        return Restore(layers, newest.docker_image, newest.disk_size_gb)

    def delete(self, checkpoint_id: str) -> None:
        """Remove a checkpoint and its files; Busy while it is in use."""
        checkpoint = self.get(checkpoint_id)
        if checkpoint.state == "PENDING":
            raise Busy(f"checkpoint {checkpoint_id} is still being taken")
        if self.store.children(checkpoint_id):
            raise Busy(f"checkpoint {checkpoint_id} has checkpoints made on top of it")
        live, _ = self.shared.store.query(active_only=True)
        for record in live:
            restored = record.request.get("checkpoint_id")
            if restored and checkpoint_id in (c.id for c in self.store.chain(restored)):
                raise Busy(f"checkpoint {checkpoint_id} is restored by sandbox {record.id}")
        if checkpoint.layer is not None:
            self.shared.runtime.drop_layer(checkpoint.layer)
        self.store.remove(checkpoint_id)

    def delete_of(self, sandbox_id: str) -> tuple[list[str], list[tuple[str, str, str]]]:
        """Delete every checkpoint of a sandbox that can go, newest first; (deleted,
        [(id, code, message)] for the rest)."""
        deleted: list[str] = []
        errors: list[tuple[str, str, str]] = []
        for checkpoint in reversed(self.of(sandbox_id)):
            try:
                self.delete(checkpoint.id)
                deleted.append(checkpoint.id)
            except Busy as exc:
                errors.append((checkpoint.id, "CONFLICT", str(exc)))
        return deleted, errors
