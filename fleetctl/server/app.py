"""The ASGI app of the local server: routers per plane, middlewares, errors, lifespan.

    control plane   /api/v1                   (fleetctl.server.routes.control)
    data plane      /gw/{user_ns}/{job_id}    (fleetctl.server.routes.gateway: REST;
                                               fleetctl.server.routes.connect: Connect RPC)

The app keeps the service and the accepted API keys in `app.state`; the routes
reach them through `routes.deps`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fleetctl import __version__
from fleetctl.server.asgi import DATA_PREFIX
from fleetctl.server.faults import FaultMiddleware, parse_faults
from fleetctl.server.ratelimit import RateLimitMiddleware, parse_rate_limits
from fleetctl.server.routes import control, gateway, images
from fleetctl.server.routes.connect import ConnectGateway
from fleetctl.server.routes.deps import Unauthorized
from fleetctl.server.service import (
    Busy,
    Failed,
    NotFound,
    NotRunning,
    Refused,
    SandboxService,
    Unsupported,
)

#: Service errors and the statuses they answer with.
STATUSES: dict[type[Exception], int] = {Unauthorized: 401, NotFound: 404, NotRunning: 409,
                                        Busy: 409, Refused: 400, Unsupported: 501,
                                        Failed: 500}  # fmt: skip


def create_app(
    service: SandboxService,
    api_keys: Sequence[str],
    *,
    rate_limits: str = "",
    faults: str = "",
    monitor_interval: float = 0.2,
    command_session: bool = True,
) -> FastAPI:
    """The app serving `service`; the control plane accepts any of `api_keys` as a bearer
    token; without `command_session`, the gateway has no Connect RPC (a 0.2 API's).
    Raises ValueError for a bad `rate_limits` or `faults` value."""

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
        # an API answers the path it was asked, never a redirect to another resource
        # (`GET /sandbox/` with an empty id is a 404, not the list)
        redirect_slashes=False,
    )
    app.state.service = service
    app.state.api_keys = tuple(api_keys)
    app.add_middleware(RateLimitMiddleware, limits=parse_rate_limits(rate_limits))
    fault_config = parse_faults(faults)
    if fault_config != parse_faults(""):
        app.add_middleware(
            FaultMiddleware,
            config=fault_config,
            kill_random_sandbox=service.monitor.kill_random_sandbox,
        )
    for kind in STATUSES:
        app.add_exception_handler(kind, _detail)
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    for router in (control.public, images.router, control.router, gateway.router):
        app.include_router(router)
    app.state.command_session = ConnectGateway(service) if command_session else None
    if app.state.command_session:  # after the gateway's REST routes, which it must not shadow
        app.mount(f"{DATA_PREFIX}/{{user_ns}}/{{job_id}}", app.state.command_session)
    return app


async def _detail(_: Request, exc: Exception) -> JSONResponse:
    status = STATUSES[type(exc)]
    body: dict[str, str] = {"detail": str(exc)}
    if status == 501:  # what today's SDK shows, and a Connect-style code for others
        body |= {"code": "unimplemented", "message": str(exc)}
    return JSONResponse(body, status_code=status)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 that never echoes its input: pydantic's default body carries `input`, which
    may be a secret's value."""
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)
