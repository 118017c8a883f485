"""The control plane, /api/v1: sandboxes, their logs and exposures, and gateway auth.

Requests arrive in snake_case; sandbox and list responses go out in camelCase,
as the official SDK parses them (see `fleetctl.server.api`).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from fleetctl import __version__
from fleetctl.contract import SandboxStatus
from fleetctl.server import api
from fleetctl.server.asgi import CONTROL_PREFIX, DATA_PREFIX, bearer, key_id
from fleetctl.server.faults import FaultMiddleware
from fleetctl.server.routes.connect import ConnectGateway
from fleetctl.server.routes.deps import Service, api_key
from fleetctl.server.service import Unsupported
from fleetctl.server.store import CheckpointRecord, ExposureRecord, SandboxRecord

USER_NS = "local"

public = APIRouter(prefix=CONTROL_PREFIX)
router = APIRouter(prefix=CONTROL_PREFIX, dependencies=[Depends(api_key)])
camel: dict[str, Any] = {"response_model_by_alias": True}


@public.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


#: Parts of today's sandbox API this server does not offer, by what they are for. They
#: answer 501 with a message (before any route they could be mistaken for).
UNSUPPORTED: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "volumes": (
        ("/sandbox/volumes", ("GET", "POST")),
        ("/sandbox/volumes/{name}", ("GET", "DELETE")),
        ("/sandbox/{sandbox_id}/volumes/{name}/publish", ("POST",)),
    ),
    "LAN networks": (
        ("/sandbox/networks", ("GET", "POST")),
        ("/sandbox/networks/{network_id}", ("GET", "DELETE")),
        ("/sandbox/networks/{network_id}/rules", ("PUT",)),
        ("/sandbox/networks/{network_id}/members/{sandbox_id}", ("PUT", "DELETE")),
    ),
    "SSH sessions": (
        ("/sandbox/{sandbox_id}/ssh-session", ("POST",)),
        ("/sandbox/{sandbox_id}/ssh-session/{session_id}", ("DELETE",)),
    ),
    "image builds": (
        ("/images", ("GET", "PATCH")),
        ("/images/build", ("POST",)),
        ("/images/build/{build_id}", ("GET",)),
        ("/images/build/{build_id}/start", ("POST",)),
    ),
}


def _unsupported(feature: str) -> Callable[[], None]:
    def refuse() -> None:
        raise Unsupported(f"{feature} are not offered by the local sandbox server")

    return refuse


for _feature, _routes in UNSUPPORTED.items():
    for _path, _methods in _routes:
        router.add_api_route(_path, _unsupported(_feature), methods=list(_methods),
                             include_in_schema=False)  # fmt: skip


@router.post("/sandbox", response_model=api.Sandbox, **camel)
async def create(service: Service, body: api.CreateSandbox, request: Request) -> api.Sandbox:
    return sandbox_view(await service.create(body), client_release(request))


@router.get("/sandbox", response_model=api.SandboxList, **camel)
def list_sandboxes(
    service: Service,
    request: Request,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = 50,
    labels: Annotated[list[str] | None, Query()] = None,
    status: str | None = None,
    is_active: bool | None = None,
) -> api.SandboxList:
    records, total = service.store.query(
        labels=labels or [],
        status=status,
        active_only=bool(is_active),
        offset=(page - 1) * per_page,
        limit=per_page,
    )
    release = client_release(request)  # one row the client cannot read fails the whole list
    return api.SandboxList(
        sandboxes=[sandbox_view(r, release) for r in records],
        total=total,
        page=page,
        per_page=per_page,
        has_next=page * per_page < total,
    )


@router.get("/sandbox/expose/all", response_model=api.ExposedPortList)
def all_exposures(service: Service, request: Request) -> api.ExposedPortList:
    return api.ExposedPortList(
        exposures=[exposure_view(e, request) for e in service.store.exposures()]
    )


@router.post("/sandbox/status:batchGet", response_model=api.BatchStatusResponse)
def batch_status(service: Service, body: api.BatchStatus) -> api.BatchStatusResponse:
    statuses, errors = [], []
    for sandbox_id in dict.fromkeys(body.sandbox_ids):
        record = service.store.get(sandbox_id)
        if record is None:
            errors.append(api.BatchError(sandbox_id=sandbox_id, code="NOT_FOUND",
                                         message=f"sandbox {sandbox_id} not found"))  # fmt: skip
        else:
            statuses.append(api.SandboxStatusItem(
                sandbox_id=sandbox_id, status=SandboxStatus(record.status),
                error_type=record.error_type, error_message=record.error_message,
            ))  # fmt: skip
    return api.BatchStatusResponse(statuses=statuses, errors=errors)


@router.post("/sandbox/background-jobs/status:batchGet", response_model=api.BatchJobStatusResponse)
async def batch_job_status(
    service: Service, body: api.BatchJobStatus
) -> api.BatchJobStatusResponse:
    return await service.jobs.statuses(body.jobs)


# -- checkpoints (before /sandbox/{sandbox_id}, which "checkpoints" would match) ----------


@router.post("/sandbox/checkpoints:batchGet", response_model=api.CheckpointBatch)
def batch_checkpoints(service: Service, body: api.CheckpointIds) -> api.CheckpointBatch:
    found, errors = [], []
    for checkpoint_id in dict.fromkeys(body.checkpoint_ids):
        record = service.store.checkpoints.get(checkpoint_id)
        if record is None:
            message = f"checkpoint {checkpoint_id} not found"
            errors.append(api.CheckpointError(checkpoint_id=checkpoint_id, code="NOT_FOUND",
                                              message=message))  # fmt: skip
        else:
            found.append(checkpoint_view(record))
    return api.CheckpointBatch(checkpoints=found, errors=errors)


@router.get("/sandbox/checkpoints/{checkpoint_id}", response_model=api.Checkpoint)
def get_checkpoint(service: Service, checkpoint_id: str) -> api.Checkpoint:
    return checkpoint_view(service.checkpoints.get(checkpoint_id))


@router.delete("/sandbox/checkpoints/{checkpoint_id}")
def delete_checkpoint(service: Service, checkpoint_id: str) -> dict[str, Any]:
    service.checkpoints.delete(checkpoint_id)
    return {"success": True, "checkpoint_id": checkpoint_id}


@router.post("/sandbox/{sandbox_id}/checkpoints", response_model=api.Checkpoint)
async def take_checkpoint(service: Service, sandbox_id: str) -> api.Checkpoint:
    return checkpoint_view(await service.checkpoints.take(sandbox_id))


@router.get("/sandbox/{sandbox_id}/checkpoints", response_model=api.CheckpointList)
def list_checkpoints(
    service: Service, sandbox_id: str, checkpoint_id: str | None = None
) -> api.CheckpointList:
    found = service.checkpoints.of(sandbox_id)
    wanted = [c for c in found if checkpoint_id in (None, c.id)]
    return api.CheckpointList(checkpoints=[checkpoint_view(c) for c in wanted])


@router.delete("/sandbox/{sandbox_id}/checkpoints", response_model=api.CheckpointsDeleted)
def delete_checkpoints(service: Service, sandbox_id: str) -> api.CheckpointsDeleted:
    deleted, errors = service.checkpoints.delete_of(sandbox_id)
    return api.CheckpointsDeleted(deleted=deleted, errors=[
        api.CheckpointError(checkpoint_id=cid, code=code, message=message)
        for cid, code, message in errors
    ])  # fmt: skip


def checkpoint_view(record: CheckpointRecord) -> api.Checkpoint:
    return api.Checkpoint(
        id=record.id, sandbox_id=record.sandbox_id,
        state=record.state,
        depth=record.depth, docker_image=record.docker_image, created_at=record.created_at,
        updated_at=record.updated_at, parent_id=record.parent_id,
        stored_bytes=record.stored_bytes, occupied_bytes=record.stored_bytes or 0,
        error=record.error,
    )  # fmt: skip


# -- one sandbox ------------------------------------------------------------------------------


@router.get("/sandbox/{sandbox_id}", response_model=api.Sandbox, **camel)
def get(service: Service, sandbox_id: str, request: Request) -> api.Sandbox:
    return sandbox_view(service.sandboxes.get(sandbox_id), client_release(request))


@router.delete("/sandbox/{sandbox_id}")
async def delete(service: Service, sandbox_id: str) -> dict[str, Any]:
    record = await service.sandboxes.delete(sandbox_id)
    return {"success": True, "id": record.id, "status": record.status}


@router.delete("/sandbox", response_model=api.BulkDeleteResponse)
async def bulk_delete(service: Service, body: api.BulkDelete) -> api.BulkDeleteResponse:
    succeeded, failed = await service.sandboxes.bulk_delete(body.sandbox_ids, body.labels)
    return api.BulkDeleteResponse(
        succeeded=succeeded,
        failed=failed,
        message=f"deleted {len(succeeded)} sandbox(es), {len(failed)} failed",
    )


@router.get("/sandbox/{sandbox_id}/logs", response_model=api.Logs)
def logs(service: Service, sandbox_id: str) -> api.Logs:
    return api.Logs(logs=service.sandboxes.logs(sandbox_id))


@router.post("/sandbox/{sandbox_id}/background-jobs", response_model=api.JobStarted)
async def start_job(service: Service, sandbox_id: str, body: api.StartJob) -> api.JobStarted:
    return await service.jobs.start(sandbox_id, body)


@router.get("/sandbox/{sandbox_id}/background-jobs", response_model=api.JobList)
async def list_jobs(service: Service, sandbox_id: str) -> api.JobList:
    return await service.jobs.of(sandbox_id)


@router.get("/sandbox/{sandbox_id}/egress-policy", response_model=api.EgressPolicyStatus)
def egress_policy(service: Service, sandbox_id: str) -> api.EgressPolicyStatus:
    return service.sandboxes.egress(sandbox_id)


@router.put("/sandbox/{sandbox_id}/egress-policy", response_model=api.EgressPolicyStatus)
async def set_egress_policy(
    service: Service, sandbox_id: str, body: api.EgressLists
) -> api.EgressPolicyStatus:
    return await service.sandboxes.set_egress(sandbox_id, body)


@router.get("/sandbox/{sandbox_id}/error-context", response_model=api.ErrorContext, **camel)
def error_context(service: Service, sandbox_id: str) -> api.ErrorContext:
    record = service.sandboxes.get(sandbox_id)
    return api.ErrorContext(
        status=SandboxStatus(record.status),
        error_type=record.error_type,
        error_message=record.error_message,
    )


@router.post("/sandbox/{sandbox_id}/auth", response_model=api.GatewayAuth)
def auth(service: Service, sandbox_id: str, request: Request) -> api.GatewayAuth:
    token, expires = service.data.issue_token(sandbox_id)
    return api.GatewayAuth(
        token=token,
        gateway_url=str(request.base_url).rstrip("/") + DATA_PREFIX,
        user_ns=USER_NS,
        job_id=sandbox_id,
        expires_at=expires.isoformat().replace("+00:00", "Z"),
        # 0.2 releases read it to choose the command session (vm) or REST exec
        is_vm=service.sandboxes.get(sandbox_id).request.get("vm") is True,
    )


@router.post("/sandbox/{sandbox_id}/expose", response_model=api.ExposedPort)
async def expose(
    service: Service, sandbox_id: str, body: api.ExposeRequest, request: Request
) -> api.ExposedPort:
    return exposure_view(await service.data.expose(sandbox_id, body), request)


@router.get("/sandbox/{sandbox_id}/expose", response_model=api.ExposedPortList)
def list_exposures(service: Service, sandbox_id: str, request: Request) -> api.ExposedPortList:
    exposures = service.data.exposures(sandbox_id)
    return api.ExposedPortList(exposures=[exposure_view(e, request) for e in exposures])


@router.delete("/sandbox/{sandbox_id}/expose/{exposure_id}")
async def unexpose(service: Service, sandbox_id: str, exposure_id: str) -> dict[str, Any]:
    service.data.unexpose(sandbox_id, exposure_id)
    return {"success": True, "exposure_id": exposure_id}


@router.get("/_fleetctl/faults")
def fault_stats(request: Request) -> dict[str, Any]:
    """Faults injected so far: in total, per API key (by `key_id`), and for the caller."""
    middleware = _fault_middleware(request.app.middleware_stack)
    if middleware is None:
        return {"total": {}, "by_key": {}, "caller": {}}
    by_key = {name: dataclasses.asdict(stats) for name, stats in middleware.stats.items()}
    return {"total": dataclasses.asdict(middleware.total()), "by_key": by_key,
            "caller": by_key.get(key_id(bearer(request.scope)), {})}  # fmt: skip


@router.post("/_fleetctl/faults/cut-streams", response_model=api.StreamsCut)
async def cut_streams(service: Service, body: api.CutStreams, request: Request) -> api.StreamsCut:
    """Fault injection: drop the connections of the sandbox's command-session calls in
    flight, as a flaky network would (their clients must re-attach)."""
    service.sandboxes.get(body.sandbox_id)  # 404 for a sandbox it does not know
    gateway: ConnectGateway | None = request.app.state.command_session
    return api.StreamsCut(cut=await gateway.cut(body.sandbox_id) if gateway else 0)


def _fault_middleware(current: Any) -> FaultMiddleware | None:
    while current is not None:
        if isinstance(current, FaultMiddleware):
            return current
        current = getattr(current, "app", None)
    return None


def client_release(request: Request) -> tuple[int, ...] | None:
    """The official SDK's release from its User-Agent (`prime-sandboxes/0.5.1 ...`)."""
    agent = request.headers.get("user-agent", "")
    match = re.match(r"prime-sandboxes/(\d+)\.(\d+)", agent)
    return (int(match.group(1)), int(match.group(2))) if match else None


def start_command_for(stored: object, release: tuple[int, ...] | None) -> object:
    """The start command in the form the client reads: 0.4 and later accept only an
    object, 0.2 and 0.3 only a string; other clients get it as it was given."""
    if stored is None or release is None:
        return stored
    if release >= (0, 4) and isinstance(stored, str):
        return {"executable": "/bin/sh", "args": ["-c", stored]}
    if release < (0, 4) and isinstance(stored, dict):
        return shlex.join([stored["executable"], *stored["args"]])
    return stored


def sandbox_view(record: SandboxRecord, release: tuple[int, ...] | None) -> api.Sandbox:
    request = record.request
    return api.Sandbox(
        id=record.id,
        name=record.name,
        docker_image=request["docker_image"],
        start_command=start_command_for(request.get("start_command"), release),
        cpu_cores=request["cpu_cores"],
        memory_gb=request["memory_gb"],
        disk_size_gb=request["disk_size_gb"],
        vm=bool(request.get("vm")),
        network_access=request["network_access"],
        network_allowlist=request.get("network_allowlist"),
        network_denylist=request.get("network_denylist"),
        checkpoint_id=request.get("checkpoint_id"),
        status=SandboxStatus(record.status),
        timeout_minutes=request["timeout_minutes"],
        idle_timeout_minutes=request.get("idle_timeout_minutes"),
        termination_reason=record.termination_reason,
        environment_vars=request.get("environment_vars"),
        labels=list(record.labels),
        created_at=record.created_at,
        updated_at=record.updated_at,
        started_at=record.started_at,
        terminated_at=record.terminated_at,
        exit_code=record.exit_code,
        error_type=record.error_type,
        error_message=record.error_message,
        image_source=record.image_source,
    )


def exposure_view(exposure: ExposureRecord, request: Request) -> api.ExposedPort:
    host = request.url.hostname or "127.0.0.1"
    endpoint = f"{host}:{exposure.listen_port}"
    tcp = exposure.protocol == "TCP"
    return api.ExposedPort(
        exposure_id=exposure.id,
        sandbox_id=exposure.sandbox_id,
        port=exposure.port,
        name=exposure.name,
        url=f"tcp://{endpoint}" if tcp else f"http://{endpoint}",
        tls_socket=endpoint,
        protocol=exposure.protocol,
        external_port=exposure.listen_port if tcp else None,
        external_endpoint=endpoint if tcp else None,
        created_at=exposure.created_at.isoformat(),
    )
