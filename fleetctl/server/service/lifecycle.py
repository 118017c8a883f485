"""The sandbox lifecycle: PENDING → PROVISIONING → RUNNING → TERMINATED | ERROR | TIMEOUT.

`Lifecycle` records sandboxes, provisions them through the runtime, and ends them
(`finish`): every way a sandbox ends, whoever notices it, goes through `finish`,
which calls the hooks other pieces registered to drop what they hold for it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup

from fleetctl import contract
from fleetctl.contract import FINAL_STATUSES, ErrorType, SandboxStatus
from fleetctl.server import api
from fleetctl.server.runtime.base import (
    EgressPolicy,
    Handle,
    LaunchSpec,
    Layer,
    Limits,
    RuntimeFailure,
)
from fleetctl.server.service.images import ImageFailed, root_for
from fleetctl.server.service.state import (
    NotFound,
    NotRunning,
    Refused,
    Shared,
    Unsupported,
    handle_of,
    shell_command,
)
from fleetctl.server.store import SandboxRecord

PIDS_LIMIT = 1024
LOG_TAIL = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Restore:
    """A checkpoint to create a sandbox from: its layers (oldest first), image and disk."""

    layers: tuple[Layer, ...]
    docker_image: str
    disk_size_gb: float


class Lifecycle:
    """Creates, finds and ends sandboxes."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.store = shared.store
        self.runtime = shared.runtime
        self._provisioning = anyio.CapacityLimiter(8)
        self._group: TaskGroup | None = None
        self._on_end: list[Callable[[str], None]] = []

    def run(self, group: TaskGroup) -> None:
        """Provision in `group` from now on."""
        self._group = group

    def on_end(self, hook: Callable[[str], None]) -> None:
        """Call `hook(sandbox_id)` whenever a sandbox ends."""
        self._on_end.append(hook)

    async def create(
        self, request: api.CreateSandbox, restore: Restore | None = None
    ) -> SandboxRecord:
        """Record a new sandbox (or return the one with the same idempotency key) and
        start provisioning it in the background (from `restore`, the checkpoint named by
        the request, if any)."""
        if not self.runtime.can_limit:
            raise Refused(
                "this host cannot enforce cpu, memory and process limits (see `fleetctl "
                "doctor`); refusing to create a sandbox without them"
            )
        if request.volumes:
            raise Unsupported("volumes are not offered by the local sandbox server")
        wants_network = request.network_access is not False
        problem = self.runtime.network_problem
        if wants_network and problem:
            raise Refused(
                f"this server cannot give a sandbox a network of its own ({problem}): run it "
                "as root with nftables and iproute2 installed (apt-get install nftables "
                "iproute2), start it with --insecure-host-network to let sandboxes share the "
                "machine's network, or create the sandbox with network_access false"
            )
        lists = request.network_allowlist is not None or request.network_denylist is not None
        if lists and wants_network and not self.runtime.filters_egress:
            raise Refused(
                "this server lets sandboxes share its network (--insecure-host-network), so "
                "it cannot enforce egress allow/deny lists; create the sandbox without them"
            )
        now = self.shared.clock()
        stored = request.model_dump(exclude={"secrets", "idempotency_key", "volumes"})
        if restore is not None:
            stored["docker_image"] = restore.docker_image
        if stored["disk_size_gb"] is None:
            disk = restore.disk_size_gb if restore else contract.DEFAULT_DISK_SIZE_GB
            stored["disk_size_gb"] = float(disk)
        stored["vm"] = bool(stored["vm"])
        record = SandboxRecord(
            id=secrets.token_hex(10),
            seq=0,
            name=request.name,
            status=SandboxStatus.PENDING,
            request=stored,
            labels=tuple(request.labels),
            idempotency_key=request.idempotency_key,
            created_at=now,
            updated_at=now,
        )
        saved = self.store.insert(record)
        if saved.id == record.id:
            self.shared.env[saved.id] = {
                **(request.environment_vars or {}), **(request.secrets or {}),
            }  # fmt: skip
            assert self._group is not None, "service not started"
            self._group.start_soon(self._provision, saved, restore.layers if restore else ())
        return saved

    async def _provision(self, record: SandboxRecord, layers: tuple[Layer, ...]) -> None:
        self.store.update(record.id, status=SandboxStatus.PROVISIONING)
        request = record.request
        try:
            settings = self.shared.settings
            root = await root_for(
                self.shared.images,
                settings.image_policy,
                request["docker_image"],
                self.runtime.max_image_layers(),
            )
        except ImageFailed as exc:
            self.runtime.append_log(record.id, f"[fleetctl] {exc}\n")
            await self.finish(record.id, SandboxStatus.ERROR,
                              error_type=exc.error_type, message=str(exc))  # fmt: skip
            return
        if root.warning:
            self.runtime.append_log(record.id, f"[fleetctl] {root.warning}\n")
        env = {**root.env, **self.shared.env.get(record.id, {})}
        self.shared.env[record.id] = env
        spec = LaunchSpec(
            id=record.id,
            seq=record.seq,
            start_command=shell_command(request.get("start_command")),
            env=env,
            network=bool(request["network_access"]),
            limits=Limits(
                memory_bytes=int(float(request["memory_gb"]) * 1024**3),
                cpu_cores=float(request["cpu_cores"]),
                pids=PIDS_LIMIT,
            ),
            image=root.layers,
            layers=layers,
            egress=egress_policy(request.get("network_allowlist"), request.get("network_denylist")),
        )
        self.runtime.append_log(record.id, f"[fleetctl] starting sandbox on the {root.source}\n")
        try:
            async with self._provisioning:
                handle = await anyio.to_thread.run_sync(self.runtime.start, spec)
        except (RuntimeFailure, OSError) as exc:
            await self.finish(
                record.id, SandboxStatus.ERROR, error_type=ErrorType.START_FAILED, message=str(exc)
            )
            return
        current = self.store.get(record.id)
        if current is None or current.status != SandboxStatus.PROVISIONING:  # deleted meanwhile
            await anyio.to_thread.run_sync(self.runtime.stop, record.id, handle)
            return
        self.store.update(
            record.id,
            status=SandboxStatus.RUNNING,
            started_at=self.shared.clock(),
            runtime=dict(handle),
            image_source=root.source,
            request={**request, "image": root.image} if root.image else request,
        )

    def get(self, sandbox_id: str) -> SandboxRecord:
        record = self.store.get(sandbox_id)
        if record is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return record

    def running(self, sandbox_id: str) -> tuple[SandboxRecord, Handle]:
        """The record and runtime handle of a RUNNING sandbox; NotRunning otherwise."""
        record = self.get(sandbox_id)
        handle = handle_of(record)
        if record.status != SandboxStatus.RUNNING or record.deleted_at or handle is None:
            raise NotRunning(record)
        return record, handle

    async def delete(self, sandbox_id: str) -> SandboxRecord:
        record = self.get(sandbox_id)
        if record.deleted_at is None:
            await self.finish(sandbox_id, SandboxStatus.TERMINATED, reason="deleted", deleted=True)
        return self.get(sandbox_id)

    async def bulk_delete(
        self, ids: Sequence[str] | None, labels: Sequence[str] | None
    ) -> tuple[list[str], list[dict[str, str]]]:
        if labels:
            ids = [r.id for r in self.store.query(labels=labels)[0]]
        succeeded: list[str] = []
        failed: list[dict[str, str]] = []

        async def one(sandbox_id: str) -> None:
            try:
                await self.delete(sandbox_id)
                succeeded.append(sandbox_id)
            except NotFound as exc:
                failed.append({"sandbox_id": sandbox_id, "error": str(exc)})

        async with anyio.create_task_group() as group:
            for sandbox_id in dict.fromkeys(ids or []):
                group.start_soon(one, sandbox_id)
        return succeeded, failed

    async def finish(
        self,
        sandbox_id: str,
        status: SandboxStatus,
        *,
        error_type: ErrorType | None = None,
        message: str | None = None,
        reason: str | None = None,
        deleted: bool = False,
    ) -> None:
        """Move a sandbox to a final status and remove everything it holds on the host."""
        record = self.store.get(sandbox_id)
        if record is None:
            return
        now = self.shared.clock()
        # A deleted sandbox releases its idempotency key: a later create with the same
        # key (say, applying a fleet again after destroying it) means a new sandbox.
        changes: dict[str, object] = {"deleted_at": now, "idempotency_key": None} if deleted else {}
        if record.status not in FINAL_STATUSES:
            changes.update(
                status=status,
                terminated_at=now,
                error_type=error_type,
                error_message=message,
                termination_reason=reason or message,
            )
        self.store.update(sandbox_id, **changes)
        self.shared.env.pop(sandbox_id, None)
        for hook in self._on_end:
            hook(sandbox_id)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.runtime.stop, sandbox_id, handle_of(record))

    def logs(self, sandbox_id: str) -> str:
        """The sandbox's log tail, and how many connections its network refused."""
        record = self.get(sandbox_id)
        text = self.runtime.logs(sandbox_id, LOG_TAIL)
        if record.status == SandboxStatus.RUNNING and record.request.get("network_access"):
            denied = self.runtime.egress_denied(sandbox_id)
            if denied:
                text += f"[fleetctl] egress: {denied} connection attempt(s) refused so far\n"
        return text

    def egress(self, sandbox_id: str) -> api.EgressPolicyStatus:
        """The sandbox's egress policy, as recorded."""
        request = self.get(sandbox_id).request
        generation = int(request.get("egress_generation", 1))
        lists = api.EgressLists(allowlist=request.get("network_allowlist"),
                                denylist=request.get("network_denylist"))  # fmt: skip
        return api.EgressPolicyStatus(policy=lists, generation=generation,
                                      applied_generation=generation, applied=True)  # fmt: skip

    async def set_egress(self, sandbox_id: str, lists: api.EgressLists) -> api.EgressPolicyStatus:
        """Replace a running sandbox's egress policy; applied before this returns."""
        record, _ = self.running(sandbox_id)
        if not record.request.get("network_access"):
            raise Refused(f"sandbox {sandbox_id} has no network access: no egress to govern")
        policy = egress_policy(lists.allowlist, lists.denylist)
        try:
            await anyio.to_thread.run_sync(self.runtime.set_egress, sandbox_id, policy)
        except RuntimeFailure as exc:
            raise Refused(str(exc)) from None
        generation = int(record.request.get("egress_generation", 1)) + 1
        self.store.update(sandbox_id, request={
            **record.request, "network_allowlist": lists.allowlist,
            "network_denylist": lists.denylist, "egress_generation": generation,
        })  # fmt: skip
        return self.egress(sandbox_id)


def egress_policy(allow: Sequence[str] | None, deny: Sequence[str] | None) -> EgressPolicy | None:
    """The runtime's form of a sandbox's allow or deny list (validated by the API models)."""
    if allow is not None:
        return EgressPolicy("allow", tuple(allow))
    return EgressPolicy("deny", tuple(deny)) if deny is not None else None
