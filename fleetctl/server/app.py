"""HTTP routes of the local server: the sandbox REST API, as the official SDK speaks it.

(No `from __future__ import annotations` here: FastAPI must resolve the route
closures' `Depends(...)` annotations at definition time.)

Control plane under /api/v1 (API key), data plane under /gw/{user_ns}/{job_id}
(per-sandbox gateway token from POST /sandbox/{id}/auth, valid for that sandbox only).
"""

import dataclasses
import hmac
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any, cast

import anyio
from fastapi import Depends, FastAPI, File, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from fleetctl import __version__
from fleetctl.server import api
from fleetctl.server.limits import (
    FaultMiddleware,
    RateLimitMiddleware,
    parse_faults,
    parse_rate_limits,
)
from fleetctl.server.service import NotFound, NotRunning, Refused, SandboxService
from fleetctl.server.store import ExposureRecord, SandboxRecord

GATEWAY_PREFIX = "/gw"
USER_NS = "local"
UPLOAD_SLACK = 64 * 1024  # multipart framing on top of the file itself


class Unauthorized(Exception):
    pass


def create_app(  # noqa: PLR0915 - one closure per route keeps routes next to their deps
    service: SandboxService,
    api_key: str,
    *,
    rate_limits: str = "",
    faults: str = "",
    monitor_interval: float = 0.2,
) -> FastAPI:
    """The ASGI app serving `service`; `api_key` is the bearer token the control plane accepts."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as group:
            await service.run(group, monitor_interval=monitor_interval)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await service.shutdown()
                group.cancel_scope.cancel()

    app = FastAPI(
        title="fleetctl local sandbox server",
        version=__version__,
        description="Real isolated sandboxes on this machine, behind the sandbox REST API.",
        lifespan=lifespan,
    )
    app.add_middleware(RateLimitMiddleware, limits=parse_rate_limits(rate_limits))
    fault_config = parse_faults(faults)
    if fault_config != parse_faults(""):
        app.add_middleware(
            FaultMiddleware, config=fault_config, kill_random_sandbox=service.kill_random_sandbox
        )
    _errors(app)

    def control(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), api_key.encode()):
            raise Unauthorized("invalid or missing API key")

    def gateway(
        user_ns: str, job_id: str, authorization: Annotated[str | None, Header()] = None
    ) -> str:
        del user_ns  # one namespace here; declared so the OpenAPI document names it
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not service.token_valid(job_id, token):
            raise Unauthorized("invalid or expired gateway token for this sandbox")
        return job_id

    v1 = "/api/v1"
    authed = [Depends(control)]

    @app.get(f"{v1}/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.post(
        f"{v1}/sandbox",
        dependencies=authed,
        response_model=api.Sandbox,
        response_model_by_alias=True,
    )
    async def create(body: api.CreateSandbox) -> api.Sandbox:
        return sandbox_view(await service.create(body))

    @app.get(
        f"{v1}/sandbox",
        dependencies=authed,
        response_model=api.SandboxList,
        response_model_by_alias=True,
    )
    def list_sandboxes(
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
        return api.SandboxList(
            sandboxes=[sandbox_view(r) for r in records],
            total=total,
            page=page,
            per_page=per_page,
            has_next=page * per_page < total,
        )

    @app.get(f"{v1}/sandbox/expose/all", dependencies=authed, response_model=api.ExposedPortList)
    def all_exposures(request: Request) -> api.ExposedPortList:
        return api.ExposedPortList(
            exposures=[exposure_view(e, request) for e in service.store.exposures()]
        )

    @app.post(
        f"{v1}/sandbox/status:batchGet",
        dependencies=authed,
        response_model=api.BatchStatusResponse,
        response_model_by_alias=True,
    )
    def batch_status(body: api.BatchStatus) -> api.BatchStatusResponse:
        items = []
        for sandbox_id in body.sandbox_ids:
            record = service.store.get(sandbox_id)
            if record is None:
                items.append(api.BatchStatusItem(id=sandbox_id, error="not found"))
            else:
                items.append(
                    api.BatchStatusItem(
                        id=sandbox_id,
                        status=record.status,
                        error_type=record.error_type,
                        error_message=record.error_message,
                    )
                )
        return api.BatchStatusResponse(sandboxes=items)

    @app.get(
        f"{v1}/sandbox/{{sandbox_id}}",
        dependencies=authed,
        response_model=api.Sandbox,
        response_model_by_alias=True,
    )
    def get(sandbox_id: str) -> api.Sandbox:
        return sandbox_view(service.get(sandbox_id))

    @app.delete(f"{v1}/sandbox/{{sandbox_id}}", dependencies=authed)
    async def delete(sandbox_id: str) -> dict[str, Any]:
        record = await service.delete(sandbox_id)
        return {"success": True, "id": record.id, "status": record.status}

    @app.delete(f"{v1}/sandbox", dependencies=authed, response_model=api.BulkDeleteResponse)
    async def bulk_delete(body: api.BulkDelete) -> api.BulkDeleteResponse:
        succeeded, failed = await service.bulk_delete(body.sandbox_ids, body.labels)
        return api.BulkDeleteResponse(
            succeeded=succeeded,
            failed=failed,
            message=f"deleted {len(succeeded)} sandbox(es), {len(failed)} failed",
        )

    @app.get(f"{v1}/sandbox/{{sandbox_id}}/logs", dependencies=authed, response_model=api.Logs)
    def logs(sandbox_id: str) -> api.Logs:
        return api.Logs(logs=service.logs(sandbox_id))

    @app.get(
        f"{v1}/sandbox/{{sandbox_id}}/error-context",
        dependencies=authed,
        response_model=api.ErrorContext,
        response_model_by_alias=True,
    )
    def error_context(sandbox_id: str) -> api.ErrorContext:
        record = service.get(sandbox_id)
        return api.ErrorContext(
            status=record.status, error_type=record.error_type, error_message=record.error_message
        )

    @app.post(
        f"{v1}/sandbox/{{sandbox_id}}/auth", dependencies=authed, response_model=api.GatewayAuth
    )
    def auth(sandbox_id: str, request: Request) -> api.GatewayAuth:
        token, expires = service.issue_token(sandbox_id)
        return api.GatewayAuth(
            token=token,
            gateway_url=str(request.base_url).rstrip("/") + GATEWAY_PREFIX,
            user_ns=USER_NS,
            job_id=sandbox_id,
            expires_at=expires.isoformat().replace("+00:00", "Z"),
        )

    @app.post(
        f"{v1}/sandbox/{{sandbox_id}}/expose", dependencies=authed, response_model=api.ExposedPort
    )
    async def expose(sandbox_id: str, body: api.ExposeRequest, request: Request) -> api.ExposedPort:
        return exposure_view(await service.expose(sandbox_id, body), request)

    @app.get(
        f"{v1}/sandbox/{{sandbox_id}}/expose",
        dependencies=authed,
        response_model=api.ExposedPortList,
    )
    def list_exposures(sandbox_id: str, request: Request) -> api.ExposedPortList:
        return api.ExposedPortList(
            exposures=[exposure_view(e, request) for e in service.exposures(sandbox_id)]
        )

    @app.delete(f"{v1}/sandbox/{{sandbox_id}}/expose/{{exposure_id}}", dependencies=authed)
    async def unexpose(sandbox_id: str, exposure_id: str) -> dict[str, Any]:
        service.unexpose(sandbox_id, exposure_id)
        return {"success": True, "exposure_id": exposure_id}

    gw = f"{GATEWAY_PREFIX}/{{user_ns}}/{{job_id}}"

    @app.post(f"{gw}/exec", response_model=api.ExecResponse)
    async def exec_command(
        body: api.ExecRequest, sandbox_id: Annotated[str, Depends(gateway)]
    ) -> api.ExecResponse | JSONResponse:
        result = await service.exec(sandbox_id, body)
        if result.timed_out:
            return JSONResponse(
                {"detail": f"command timed out after {body.timeout}s; its processes were killed"},
                status_code=408,
            )
        return api.ExecResponse(
            stdout=result.stdout.decode("utf-8", "replace"),
            stderr=result.stderr.decode("utf-8", "replace"),
            exit_code=result.exit_code,
        )

    @app.post(f"{gw}/upload", response_model=api.UploadResponse)
    async def upload(
        sandbox_id: Annotated[str, Depends(gateway)],
        path: Annotated[str, Query(min_length=1)],
        file: Annotated[UploadFile, File()],
    ) -> api.UploadResponse | JSONResponse:
        if file.size is not None and file.size > api.MAX_UPLOAD_BYTES:
            return _too_large()

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await file.read(1024 * 1024):
                yield chunk

        size = await service.upload(sandbox_id, path, chunks())
        return api.UploadResponse(success=True, path=path, size=size, timestamp=service.clock())

    @app.get(f"{gw}/download")
    async def download(
        sandbox_id: Annotated[str, Depends(gateway)], path: Annotated[str, Query(min_length=1)]
    ) -> StreamingResponse:
        stack = AsyncExitStack()
        size, stream = await stack.enter_async_context(service.download(sandbox_id, path))

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                with anyio.CancelScope(shield=True):
                    await stack.aclose()

        return StreamingResponse(
            body(),
            media_type="application/octet-stream",
            headers={"Content-Length": str(size)},
        )

    @app.get(f"{gw}/read-file", response_model=api.ReadFileResponse)
    async def read_file(
        sandbox_id: Annotated[str, Depends(gateway)],
        path: Annotated[str, Query(min_length=1)],
        offset: int = 0,
        length: Annotated[int | None, Query(ge=0)] = None,
    ) -> api.ReadFileResponse:
        return await service.read_file(sandbox_id, path, offset, length)

    @app.get(f"{v1}/_fleetctl/faults", dependencies=authed)
    def fault_stats() -> dict[str, int]:
        middleware = _find_fault_middleware(app)
        return dataclasses.asdict(middleware.stats) if middleware else {}

    return app


def _find_fault_middleware(app: FastAPI) -> FaultMiddleware | None:
    current: Any = app.middleware_stack
    while current is not None:
        if isinstance(current, FaultMiddleware):
            return current
        current = getattr(current, "app", None)
    return None


def _too_large() -> JSONResponse:
    return JSONResponse(
        {"detail": f"file exceeds the {api.MAX_UPLOAD_BYTES // (1024 * 1024)} MB upload limit"},
        status_code=413,
    )


def sandbox_view(record: SandboxRecord) -> api.Sandbox:
    request = record.request
    return api.Sandbox(
        id=record.id,
        name=record.name,
        docker_image=request["docker_image"],
        start_command=request.get("start_command"),
        cpu_cores=request["cpu_cores"],
        memory_gb=request["memory_gb"],
        disk_size_gb=request["disk_size_gb"],
        network_access=request["network_access"],
        status=cast(api.Status, record.status),
        timeout_minutes=request["timeout_minutes"],
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


def _errors(app: FastAPI) -> None:
    """Map service errors to status codes; validation errors never echo their input."""

    statuses: dict[type[Exception], int] = {
        Unauthorized: 401, NotFound: 404, NotRunning: 409, Refused: 400,
    }  # fmt: skip

    async def detail(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=statuses[type(exc)])

    for kind in statuses:
        app.add_exception_handler(kind, detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic's default body carries `input`, which may be a secret's value
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)
