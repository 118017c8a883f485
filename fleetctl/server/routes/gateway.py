"""The data plane, /gw/{user_ns}/{job_id}: exec and files of one sandbox.

Authenticated by the sandbox's gateway token (from POST /api/v1/sandbox/{id}/auth),
valid for that sandbox only. Responses stay snake_case, as the official SDK reads them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Annotated

import anyio
from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from fleetctl.contract import MAX_UPLOAD_BYTES
from fleetctl.server import api
from fleetctl.server.asgi import DATA_PREFIX
from fleetctl.server.routes.deps import SandboxId, Service

CHUNK = 1024 * 1024
router = APIRouter(prefix=DATA_PREFIX + "/{user_ns}/{job_id}")


@router.post("/exec", response_model=api.ExecResponse)
async def exec_command(
    service: Service, sandbox_id: SandboxId, body: api.ExecRequest
) -> api.ExecResponse | JSONResponse:
    result = await service.data.exec(sandbox_id, body)
    if result.timed_out:
        return JSONResponse(
            {"detail": f"command timed out after {body.timeout}s; its processes were killed"},
            status_code=408,
        )
    return api.ExecResponse(
        stdout=result.stdout.decode("utf-8", "replace"),
        stderr=result.stderr.decode("utf-8", "replace"),
        exit_code=result.exit_code,
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
    )


@router.post("/upload", response_model=api.UploadResponse)
async def upload(
    service: Service,
    sandbox_id: SandboxId,
    path: Annotated[str, Query(min_length=1)],
    file: Annotated[UploadFile, File()],
) -> api.UploadResponse | JSONResponse:
    if file.size is not None and file.size > MAX_UPLOAD_BYTES:
        return JSONResponse(
            {"detail": f"file exceeds the {MAX_UPLOAD_BYTES // 2**20} MB upload limit"},
            status_code=413,
        )

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await file.read(CHUNK):
            yield chunk

    size = await service.data.upload(sandbox_id, path, chunks())
    return api.UploadResponse(success=True, path=path, size=size, timestamp=service.shared.clock())


@router.get("/download")
async def download(
    service: Service, sandbox_id: SandboxId, path: Annotated[str, Query(min_length=1)]
) -> StreamingResponse:
    stack = AsyncExitStack()
    size, stream = await stack.enter_async_context(service.data.download(sandbox_id, path))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):
                await stack.aclose()

    return StreamingResponse(
        body(), media_type="application/octet-stream", headers={"Content-Length": str(size)}
    )


@router.get("/read-file", response_model=api.ReadFileResponse)
async def read_file(
    service: Service,
    sandbox_id: SandboxId,
    path: Annotated[str, Query(min_length=1)],
    offset: int = 0,
    length: Annotated[int | None, Query(ge=0)] = None,
) -> api.ReadFileResponse:
    return await service.data.read_file(sandbox_id, path, offset, length)
